"""TF Serving's ``PredictionService`` over gRPC (``tensorflow-serving-api``); port 8500 by default.

Image bytes travel as a ``DT_STRING`` tensor built by ``tf.make_tensor_proto``; gRPC and TensorFlow
are imported only when a gRPC client is made, so the REST path needs neither.
"""

from __future__ import annotations

from models.backbone.export import BYTES_SIGNATURE, IMAGES_INPUT
from search.tf_serving.client import (
    DEFAULT_MODEL_NAME,
    DEFAULT_TIMEOUT_S,
    Prediction,
    ServingClient,
    ServingError,
    ServingUnavailableError,
    SignatureInfo,
    read_outputs,
    read_signature,
    rejected,
)

MAX_MESSAGE_BYTES = 256 << 20  # a batch of full-size photos exceeds gRPC's 4 MiB default


class GrpcClient(ServingClient):
    """PredictionService over gRPC (insecure channel: put TLS in front of TF Serving if needed)."""

    protocol = "grpc"

    def __init__(self, address: str, model_name: str = DEFAULT_MODEL_NAME, signature: str = BYTES_SIGNATURE,
                 version: int | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        super().__init__(address, model_name, signature, version, timeout)
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def predict_images(self, blobs: list[bytes]) -> Prediction:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = self.signature
        if self.version is not None:
            request.model_spec.version.value = self.version
        request.inputs[IMAGES_INPUT].CopyFrom(tf.make_tensor_proto(list(blobs), dtype=tf.string, shape=[len(blobs)]))
        response = self._call(self._stub.Predict, request)
        return read_outputs({k: tf.make_ndarray(v) for k, v in response.outputs.items()}, len(blobs))

    def signature_info(self) -> SignatureInfo:
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = self.model_name
        if self.version is not None:
            request.model_spec.version.value = self.version
        response = self._call(self._stub.GetModelMetadata, request)
        defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(defs)
        as_json = json_format.MessageToDict(defs, preserving_proto_field_name=True).get("signature_def", {})
        return read_signature(as_json, self.signature, self.describe())

    def _call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise rejected(details, self.describe()) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ServingUnavailableError(f"{self.describe()}: {code.name}: {details}") from None
            raise ServingError(f"{self.describe()}: {code.name}: {details}") from None

    def close(self) -> None:
        self._channel.close()
