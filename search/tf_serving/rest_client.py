"""TF Serving's REST API: ``POST /v1/models/NAME[/versions/N]:predict``; port 8501 by default.

Row ("instances") format with binary inputs as ``{"b64": ...}``, TF Serving's convention for
binary strings; plain ``urllib``, no extra dependency.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

from models.backbone.export import BYTES_SIGNATURE, FEATURES_OUTPUT
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


class RestClient(ServingClient):
    """TF Serving's REST API, row ("instances") format, binary inputs as ``{"b64": ...}``."""

    protocol = "rest"

    def __init__(self, address: str, model_name: str = DEFAULT_MODEL_NAME, signature: str = BYTES_SIGNATURE,
                 version: int | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        super().__init__(address, model_name, signature, version, timeout)
        base = address if address.startswith(("http://", "https://")) else f"http://{address}"
        path = f"/v1/models/{model_name}" + (f"/versions/{version}" if version is not None else "")
        self.model_url = base.rstrip("/") + path
        self.url = self.model_url + ":predict"

    def predict_images(self, blobs: list[bytes]) -> Prediction:
        body = json.dumps({
            "signature_name": self.signature,
            "instances": [{"b64": base64.b64encode(b).decode("ascii")} for b in blobs],
        }).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        payload = self._send(request)
        return read_outputs(_rows_to_columns(payload, len(blobs)), len(blobs))

    def signature_info(self) -> SignatureInfo:
        payload = self._send(urllib.request.Request(self.model_url + "/metadata", method="GET"))
        defs = payload.get("metadata", {}).get("signature_def", {}).get("signature_def", {})
        return read_signature(defs, self.signature, self.describe())

    def _send(self, request: urllib.request.Request) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            message = _error_message(exc)
            if exc.code == 400:
                raise rejected(message, self.describe()) from None
            if exc.code in (502, 503, 504):
                raise ServingUnavailableError(f"{self.describe()}: HTTP {exc.code}: {message}") from None
            raise ServingError(f"{self.describe()}: HTTP {exc.code}: {message}") from None
        except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServingUnavailableError(f"{self.describe()}: {reason}") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))
    except Exception:
        return str(exc.reason)


def _rows_to_columns(payload: dict[str, Any], n: int) -> dict[str, Any]:
    """``{"predictions": [...]}`` (row format) or ``{"outputs": ...}`` (columnar) → output name → array."""
    if "predictions" in payload:
        rows = payload["predictions"]
        if len(rows) != n:
            raise ServingError(f"expected {n} predictions, got {len(rows)}")
        if rows and isinstance(rows[0], dict):
            return {k: [r[k] for r in rows] for k in rows[0]}
        return {FEATURES_OUTPUT: rows}  # a single-output signature returns bare values
    if "outputs" in payload:
        out = payload["outputs"]
        return out if isinstance(out, dict) else {FEATURES_OUTPUT: out}
    raise ServingError(f"unexpected REST response keys {sorted(payload)}")
