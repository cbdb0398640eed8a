"""Which vector space an index lives in: pure functions of its manifest.

Vectors can be searched in an index only when they come from the same backbone (model
fingerprint) and the same transform (transform fingerprint). These two digests, and
their combination (the *space* fingerprint), are computed here and nowhere else;
``search.compatibility`` holds the checks that use them.
"""

from __future__ import annotations

from artefacts import layout
from artefacts.manifests import IndexManifest, fingerprint


def transform_fingerprint(manifest: IndexManifest) -> str:
    """Digest of the transform's files (by their digests) and settings.

    Two indexes share it only when queries are transformed by byte-identical data,
    which is what makes their vectors comparable.
    """
    prefixes = (layout.TRANSFORM_DIR + "/", layout.TRANSFORM_DATA_DIR + "/")
    files = sorted((p, m.sha256) for p, m in manifest.files.items() if p.startswith(prefixes))
    transform = {"steps": manifest.transform.steps, "dims": manifest.transform.dims}
    dimension = {"input": manifest.dimension.input, "output": manifest.dimension.output}
    return fingerprint({"files": files, "transform": transform, "dimension": dimension})


def space_fingerprint(manifest: IndexManifest) -> str:
    """The vector space of an index: model fingerprint and transform fingerprint together.

    An embedder opened on one version and a searcher on another agree on it only when
    vectors from the first can be searched in the second.
    """
    return fingerprint(f"{manifest.model_fingerprint}:{transform_fingerprint(manifest)}")


def encoder_fingerprint(source_fingerprint: str | None, encoder_digest: str) -> str:
    """Model fingerprint of autoencoder codes: the backbone's features and the encoder together."""
    return fingerprint({"source": source_fingerprint, "encoder": encoder_digest})


def backbone_fingerprint(manifest: IndexManifest) -> str:
    """The fingerprint a query *backbone* must have: the index's, or for an index of autoencoder
    codes the fingerprint of the features the encoder was trained on.

    Raises ValueError when an encoder record does not match the index's fingerprint.
    """
    encoder = manifest.model.get("encoder")
    if not encoder:
        return manifest.model_fingerprint
    if encoder_fingerprint(encoder.get("source_fingerprint"), encoder.get("weights_digest")) \
            != manifest.model_fingerprint:
        raise ValueError("the index's encoder record does not match its model fingerprint: rebuild it")
    return encoder["source_fingerprint"]
