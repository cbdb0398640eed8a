"""The TF Serving client (gRPC and REST) and ``cbir query --serving``.

``tensorflow_model_server`` cannot be installed here, so both transports are tested
against in-process servers that do what it does for Predict: load the newest numeric
version under a model base path, replay its warm-up records, look the signature up,
check the input alias, run the SavedModel, and answer with TF Serving's status codes
(NOT_FOUND for an unknown model; INVALID_ARGUMENT for an unknown signature, a wrong
input or an op error) and REST conventions (``{"b64": ...}`` binary inputs, row-format
``predictions``, ``{"error": ...}`` bodies).
"""

from __future__ import annotations

import base64
import copy
import http.server
import json
import os
import re
import socket
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from models.backbone import export
from pipelines import cli
from pipelines.export_model import index_transform
from pipelines.query import run_query
from search.compatibility import ModelMismatchError
from search.embedder import open_embedder
from search.options import SearchOptions
from search.tf_serving import (
    GrpcClient,
    RestClient,
    ServingEmbedder,
    ServingError,
    ServingRequestError,
    ServingUnavailableError,
    check_prediction,
    make_client,
)

MODEL = "cbir"
MIN_COSINE = 0.999  # served (in-graph decode) vs local (Pillow decode): see tests/test_export.py


class _Status(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


_HTTP = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400}


class ModelServerEmulator:
    """The Predict and GetModelMetadata paths of tensorflow_model_server for one model base path."""

    def __init__(self, base_path: str, name: str):
        versions = sorted(int(v) for v in os.listdir(base_path) if v.isdigit())
        self.name = name
        self.version = versions[-1]
        path = os.path.join(base_path, str(self.version))
        self.model = tf.saved_model.load(path)
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved_model = saved_model_pb2.SavedModel.FromString(f.read())
        self.signature_defs = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in saved_model.meta_graphs[0].signature_def.items():
            self.signature_defs.signature_def[key].CopyFrom(sig)
        self.requests = 0
        self.warmup_outputs = self._replay_warmup(path)

    def _replay_warmup(self, path: str) -> list[dict[str, np.ndarray]]:
        warmup = os.path.join(path, "assets.extra", export.WARMUP_FILE)
        outputs = []
        for record in tf.data.TFRecordDataset(warmup):
            request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            outputs.append(self.run(self.name, None, request.model_spec.signature_name, inputs))
        return outputs

    def input_names(self, signature_name: str) -> list[str]:
        return sorted(self._signature(signature_name).structured_input_signature[1])

    def _signature(self, signature_name: str):
        name = signature_name or "serving_default"
        if name not in self.model.signatures:
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT, f'Serving signature key "{name}" not found.')
        return self.model.signatures[name]

    def find(self, model_name: str, version: int | None) -> None:
        if model_name != self.name or version not in (None, self.version):
            wanted = f"Specific({model_name}, {version})" if version is not None else f"Latest({model_name})"
            raise _Status(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {wanted}")

    def run(self, model_name: str, version: int | None, signature_name: str,
            inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.find(model_name, version)
        fn = self._signature(signature_name)
        expected = set(self.input_names(signature_name))
        for alias in inputs:
            if alias not in expected:
                raise _Status(grpc.StatusCode.INVALID_ARGUMENT,
                              f"input tensor alias not found in signature: {alias}. Inputs expected to be in the "
                              f"set {{{','.join(sorted(expected))}}}.")
        self.requests += 1
        try:
            out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
        except tf.errors.InvalidArgumentError as exc:
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT, exc.message) from None
        return {k: v.numpy() for k, v in out.items()}


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, emulator: ModelServerEmulator):
        self.emulator = emulator

    def Predict(self, request, context):  # noqa: N802 (the gRPC method name)
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        try:
            outputs = self.emulator.run(spec.name, version, spec.signature_name,
                                        {k: tf.make_ndarray(v) for k, v in request.inputs.items()})
        except _Status as status:
            context.abort(status.code, status.message)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = self.emulator.version
        response.model_spec.signature_name = spec.signature_name or "serving_default"
        for key, value in outputs.items():
            if not request.output_filter or key in request.output_filter:
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):  # noqa: N802
        spec = request.model_spec
        try:
            self.emulator.find(spec.name, spec.version.value if spec.HasField("version") else None)
            if list(request.metadata_field) != ["signature_def"]:
                raise _Status(grpc.StatusCode.INVALID_ARGUMENT, "only signature_def metadata is supported")
        except _Status as status:
            context.abort(status.code, status.message)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = self.emulator.version
        response.metadata["signature_def"].Pack(self.emulator.signature_defs)
        return response


def _json_value(key: str, value):
    if isinstance(value, bytes):  # TF Serving returns DT_STRING as text unless the name ends in _bytes
        return {"b64": base64.b64encode(value).decode()} if key.endswith("_bytes") else value.decode("utf-8")
    return value.tolist() if isinstance(value, np.ndarray) else value


def _rest_handler(emulator: ModelServerEmulator):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's method name)
            m = re.fullmatch(r"/v1/models/([^/:]+)(?:/versions/(\d+))?/metadata", self.path)
            if not m:
                return self._reply(404, {"error": f"Malformed request: GET {self.path}"})
            try:
                emulator.find(m.group(1), int(m.group(2)) if m.group(2) else None)
            except _Status as status:
                return self._reply(_HTTP.get(status.code, 500), {"error": status.message})
            return self._reply(200, {
                "model_spec": {"name": m.group(1), "signature_name": "", "version": str(emulator.version)},
                "metadata": {"signature_def": json_format.MessageToDict(emulator.signature_defs,
                                                                        preserving_proto_field_name=True)},
            })

        def do_POST(self):  # noqa: N802
            m = re.fullmatch(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:predict", self.path)
            if not m:
                return self._reply(404, {"error": f"Malformed request: POST {self.path}"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            signature = body.get("signature_name", "serving_default")
            try:
                names = emulator.input_names(signature)
                instances = body["instances"]

                def value(v):
                    return base64.b64decode(v["b64"]) if isinstance(v, dict) and "b64" in v else v

                if len(names) == 1 and not (instances and isinstance(instances[0], dict) and "b64" not in instances[0]):
                    inputs = {names[0]: np.array([value(v) for v in instances], dtype=object)}
                else:
                    inputs = {k: np.array([value(i[k]) for i in instances], dtype=object) for k in instances[0]}
                outputs = emulator.run(m.group(1), int(m.group(2)) if m.group(2) else None, signature, inputs)
            except _Status as status:
                return self._reply(_HTTP.get(status.code, 500), {"error": status.message})
            n = len(instances)
            if len(outputs) == 1:
                (key, values), = outputs.items()
                predictions = [_json_value(key, values[i]) for i in range(n)]
            else:
                predictions = [{k: _json_value(k, v[i]) for k, v in outputs.items()} for i in range(n)]
            return self._reply(200, {"predictions": predictions})

    return Handler


# -- fixtures -------------------------------------------------------------------------------------------


SHARED_EXPORT_DIR = "flowers_savedmodel"  # where tests/models/backbone/test_export.py exports the same model


@pytest.fixture(scope="module")
def model_base(tmp_path_factory, mobilenet_spec, flowers_index):
    """cbir's export of MobileNet with this session's flowers_index transform, as version 1.

    tests/models/backbone/test_export.py makes exactly this export (same call, same arguments) and
    leaves it untouched; when it already ran in this session its folder is served, else
    the export is made here."""
    shared = tmp_path_factory.getbasetemp() / SHARED_EXPORT_DIR / MODEL
    if sorted(os.listdir(shared) if shared.is_dir() else []) == ["1"]:
        info = export.read_export_info(str(shared / "1"))
        transform = index_transform(str(flowers_index[0]))
        if info is not None and (info.index or {}).get("transform_fingerprint") == transform.transform_fingerprint \
                and info.model_fingerprint == mobilenet_spec.fingerprint() \
                and os.path.isfile(shared / "1" / "assets.extra" / export.WARMUP_FILE):
            return str(shared)
    base = tmp_path_factory.mktemp("served") / MODEL
    export.export_savedmodel(mobilenet_spec, str(base), version=1, index=index_transform(str(flowers_index[0])))
    return str(base)


@pytest.fixture(scope="module")
def emulator(model_base):
    return ModelServerEmulator(model_base, MODEL)


@pytest.fixture(scope="module")
def grpc_address(emulator):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(emulator), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def rest_address(emulator):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(emulator))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module", params=["grpc", "rest"])
def address(request, grpc_address, rest_address):
    return request.param, grpc_address if request.param == "grpc" else rest_address


@pytest.fixture(scope="module")
def index_version(flowers_index):
    manifest = flowers_index[1]
    return os.path.join(str(flowers_index[0]), manifest.version), manifest


@pytest.fixture(scope="module")
def local_embedder(index_version, weights_dir):
    return open_embedder(*index_version, weights_dir)


@pytest.fixture(scope="module")
def queries(flowers, imagenette) -> list[str]:
    return [str(p) for p in sorted(flowers.glob("*/image_00[0-1]1.jpg"))] + \
        [str(p) for p in sorted(imagenette.rglob("*"))[:200:50] if p.is_file()]


def _read(paths: list[str]) -> list[bytes]:
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append(f.read())
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- the clients ----------------------------------------------------------------------------------------


def test_the_emulator_replayed_the_exported_warmup_request(emulator):
    assert len(emulator.warmup_outputs) == 1
    assert emulator.warmup_outputs[0]["features"].shape == (1, 256)


def test_client_returns_what_the_signature_computes(address, emulator, queries, mobilenet_spec):
    protocol, addr = address
    blobs = _read(queries)
    direct = emulator.model.signatures["serving_default"](images=tf.constant(blobs))
    with make_client(addr, protocol, MODEL) as client:
        prediction = client.predict_images(blobs)
    assert isinstance(client, GrpcClient if protocol == "grpc" else RestClient)
    assert prediction.features.dtype == np.float32 and prediction.features.shape == (len(blobs), 256)
    np.testing.assert_allclose(prediction.features, direct["features"].numpy(), rtol=1e-6, atol=1e-6)
    assert prediction.model_fingerprints == [mobilenet_spec.fingerprint()] * len(blobs)
    assert not prediction.transformed
    with make_client(addr, protocol, MODEL, "transformed") as client:
        info = client.signature_info()
    assert info.inputs == {"images": "DT_STRING"}
    assert info.outputs == {"features": "DT_FLOAT", "model_fingerprint": "DT_STRING", "index_version": "DT_STRING",
                            "transform_fingerprint": "DT_STRING"}


def test_client_names_a_version(address, emulator, queries):
    protocol, addr = address
    with make_client(addr, protocol, MODEL, version=emulator.version) as client:
        assert client.predict_images(_read(queries[:1])).features.shape == (1, 256)
    with make_client(addr, protocol, MODEL, version=emulator.version + 1) as client, \
            pytest.raises(ServingError, match="Servable not found"):
        client.predict_images(_read(queries[:1]))


def test_serving_embedder_equals_the_local_query_path(address, index_version, local_embedder, queries):
    """serving_default + the index's transform_fn applied here, and the transformed signature, both
    give the vectors the local embedder gives (within the decode tolerance)."""
    protocol, addr = address
    local, ok, _ = local_embedder.embed_files(queries)
    assert ok == queries
    for signature in ("serving_default", "transformed"):
        embedder = ServingEmbedder(*index_version, make_client(addr, protocol, MODEL, signature), batch_size=5)
        vectors, served_ok, failures = embedder.embed_files(queries)
        embedder.close()
        assert served_ok == queries and not failures
        assert vectors.shape == local.shape
        assert _cosine(vectors, local).min() >= MIN_COSINE, signature
        assert embedder.space_fingerprint == local_embedder.space_fingerprint


def test_a_bad_image_fails_alone(address, index_version, queries, tmp_path):
    protocol, addr = address
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"this is not an image" * 20)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [queries[0], str(bad), queries[1], str(empty)]
    embedder = ServingEmbedder(*index_version, make_client(addr, protocol, MODEL))
    vectors, ok, failures = embedder.embed_files(paths)
    embedder.close()
    assert ok == [queries[0], queries[1]] and vectors.shape[0] == 2
    assert [f.path for f in failures] == [str(bad), str(empty)]
    assert all(f.error == "ServingRequestError" for f in failures)
    assert "Unknown image file format" in failures[0].message and "empty file" in failures[1].message
    assert "function_node" not in failures[0].message


def test_vectors_of_another_model_or_index_are_refused(address, index_version, queries):
    protocol, addr = address
    version_dir, manifest = index_version
    other_model = copy.deepcopy(manifest)
    other_model.model_fingerprint = "00000000deadbeef"
    embedder = ServingEmbedder(version_dir, other_model, make_client(addr, protocol, MODEL))
    with pytest.raises(ModelMismatchError, match="00000000deadbeef"):
        embedder.embed_files(queries[:2])
    embedder.close()

    other_transform = copy.deepcopy(manifest)
    some_file = next(k for k in other_transform.files if k.startswith("transform_fn/"))
    other_transform.files[some_file].sha256 = "0" * 64  # as if the index had been rebuilt
    transformed = ServingEmbedder(version_dir, other_transform, make_client(addr, protocol, MODEL, "transformed"))
    with pytest.raises(ModelMismatchError, match=manifest.version):
        transformed.embed_files(queries[:2])
    transformed.close()


def test_prediction_without_fingerprint_is_refused(index_version):
    from search.tf_serving import Prediction

    with pytest.raises(ModelMismatchError, match="model_fingerprint"):
        check_prediction(Prediction(np.zeros((1, 256), np.float32), None), index_version[1], "somewhere")


def test_configuration_errors_are_not_image_failures(address, index_version, queries):
    protocol, addr = address
    for model, signature, message in (("other", "serving_default", "Servable not found"),
                                      (MODEL, "no_such_signature", "no_such_signature"),
                                      (MODEL, "pixels", "not encoded images")):  # a signature taking pixels
        embedder = ServingEmbedder(*index_version, make_client(addr, protocol, model, signature))
        with pytest.raises(ServingError, match=message) as info:
            embedder.embed_files(queries[:2])
        assert not isinstance(info.value, ServingRequestError)
        embedder.close()


def test_unreachable_endpoint(index_version, queries):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    for protocol in ("grpc", "rest"):
        with make_client(f"127.0.0.1:{port}", protocol, MODEL, timeout=5) as client, \
                pytest.raises(ServingUnavailableError, match=str(port)):
            client.predict_images(_read(queries[:1]))
    with pytest.raises(ValueError, match="protocol"):
        make_client("127.0.0.1:1", "carrier-pigeon")


# -- cbir query --serving ----------------------------------------------------------------------------------


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_cbir_query_through_serving_matches_the_local_query(address, flowers_index, flowers, weights_dir, capsys):
    protocol, addr = address
    images = [str(flowers / "0" / "image_0001.jpg"), str(flowers / "5" / "image_0401.jpg")]
    local_rows, _, _ = run_query(str(flowers_index[0]), images, SearchOptions(k=5), weights_dir=weights_dir)
    for signature in ("serving_default", "transformed"):
        code = cli.main(["query", "--index", str(flowers_index[0]), "-k", "5", "--json", "--serving", addr,
                         "--serving-protocol", protocol, "--serving-signature", signature, *images])
        assert code == 0
        rows = _json_lines(capsys.readouterr().out)
        assert [r["query"] for r in rows] == images
        for served, local in zip(rows, local_rows, strict=True):
            assert abs(served["results"][0]["score"] - local["results"][0]["score"]) < 1e-3
            overlap = {r["image_id"] for r in served["results"]} & {r["image_id"] for r in local["results"]}
            assert len(overlap) >= 4, (served, local)


def test_cbir_query_serving_errors_exit_cleanly(address, flowers_index, flowers, capsys):
    protocol, addr = address
    image = str(flowers / "0" / "image_0001.jpg")
    code = cli.main(["query", "--index", str(flowers_index[0]), "--serving", addr, "--serving-protocol", protocol,
                     "--serving-model", "not_served", image])
    assert code == 2
    assert "Servable not found" in capsys.readouterr().err
