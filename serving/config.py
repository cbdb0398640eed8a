"""The limits and access of the ``cbir serve`` HTTP service, checked once when the service starts."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Limits and access of the HTTP service (the index side is in ``versions.OpenOptions``)."""

    workers: int = 2  # threads running searches, embeddings and thumbnails
    queue: int = 32  # requests that may wait for a worker; beyond workers + queue: 503 at once
    max_upload_bytes: int = 16 << 20  # request body limit (aiohttp client_max_size): larger is 413
    timeout_seconds: float = 30.0  # per request: 504 beyond it
    max_k: int = 100
    max_feedback: int = 200  # like + unlike ids per request
    max_qe: int = 50
    token: str | None = None  # bearer token for /api/ (None: no token)
    thumbnail_cache_mb: int = 32
    thumbnail_max_input_bytes: int = 64 << 20

    def validate(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, not {self.workers}")
        if self.queue < 0:
            raise ValueError(f"--queue must not be negative, not {self.queue}")
        if self.timeout_seconds <= 0:
            raise ValueError(f"--timeout must be positive, not {self.timeout_seconds}")
        if self.max_upload_bytes < 1024:
            raise ValueError(f"--max-upload-mb is too small: {self.max_upload_bytes} bytes")
        if self.max_k < 1:
            raise ValueError(f"--max-k must be at least 1, not {self.max_k}")
        if self.token is not None and len(self.token) < 16:
            raise ValueError("the token must be at least 16 characters long")
