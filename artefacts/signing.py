"""Optional authenticity for index versions: an HMAC-SHA256 of the manifest's exact bytes.

Digests in the manifest prove that the files are the ones the manifest lists; they do not
prove who wrote the manifest. With ``cbir index --signing-key FILE`` the build writes
``MANIFEST.json.hmac`` (hex HMAC-SHA256 of ``MANIFEST.json`` under the key) next to the
manifest, before the manifest itself (the commit point); a searcher given the same key
refuses a version that is unsigned or signed with another key. The key is a file of at
least 16 bytes that only builders and readers of the index hold.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_FILE = "MANIFEST.json.hmac"
MIN_KEY_BYTES = 16


class SignatureError(ValueError):
    """A version that is unsigned, or signed with another key, opened by a reader that holds a key."""


def load_key(path: str) -> bytes:
    with open(path, "rb") as f:
        key = f.read().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the signing key {path} holds {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes")
    return key


def sign(manifest_bytes: bytes, key: bytes) -> str:
    return hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def check(manifest_bytes: bytes, signature: str | None, key: bytes, where: str) -> None:
    if signature is None:
        raise SignatureError(f"{where} is not signed, and a signing key was given: refusing it (rebuild it with "
                             "cbir index --signing-key)")
    if not hmac.compare_digest(sign(manifest_bytes, key), signature.strip()):
        raise SignatureError(f"{where} is signed with another key, or its manifest was changed after signing")
