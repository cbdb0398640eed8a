"""Never search in the wrong vector space: every check that refuses vectors an index cannot take.

The fingerprints themselves are pure functions of the index manifest
(``artefacts.vector_space``); the checks that compare them with a query model, an
embedder, or what TF Serving returned all live here, so each refusal reads the same
whichever path a query took (local model, searcher API, TF Serving).
"""

from __future__ import annotations

import logging
from typing import Any

from artefacts.manifests import IndexManifest
from artefacts.vector_space import backbone_fingerprint, space_fingerprint, transform_fingerprint

log = logging.getLogger(__name__)


class ModelMismatchError(ValueError):
    """The query model is not the one the index was built with."""


class TransformMismatchError(ValueError):
    """Query vectors come from another vector space (model or transform) than the index's."""


def _where(manifest: IndexManifest, version_dir: str | None) -> str:
    return version_dir or manifest.version


def check_model(spec: Any, manifest: IndexManifest) -> None:
    """Refuses a query backbone (a ``ModelSpec``) whose features are not interchangeable with the index's.

    For an index of autoencoder codes the backbone must match the encoder's source
    features (the encoder itself is checked by digest when the embedder loads it).
    """
    try:
        expected = backbone_fingerprint(manifest)
    except ValueError as exc:
        raise ModelMismatchError(str(exc)) from None
    got = spec.fingerprint()
    if got != expected:
        ours = spec.describe()
        theirs = manifest.model
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k) and k != "encoder")
        raise ModelMismatchError(
            f"the index was built with model {manifest.preset} (fingerprint {expected}); the query model "
            f"{spec.name} has fingerprint {got} (differs in: {', '.join(diff) or 'unknown'}). "
            "Query with the index's model and weights, or rebuild the index."
        )


def check_model_fingerprint(fingerprint: str, manifest: IndexManifest, version_dir: str | None = None) -> None:
    """Refuses a model fingerprint other than the index's (a service pinning its backbone)."""
    if fingerprint != manifest.model_fingerprint:
        raise ModelMismatchError(
            f"the index {_where(manifest, version_dir)} was built with model {manifest.preset} "
            f"(fingerprint {manifest.model_fingerprint}), not the requested model fingerprint {fingerprint}. "
            "Query with the index's model and weights, or rebuild the index."
        )


def check_space(fingerprint: str, manifest: IndexManifest, version_dir: str | None = None) -> None:
    """Refuses query vectors of another space (an embedder made for another version)."""
    ours = space_fingerprint(manifest)
    if fingerprint != ours:
        raise TransformMismatchError(
            f"query vectors of space {fingerprint} cannot be searched in {_where(manifest, version_dir)} "
            f"(space {ours}: model {manifest.model_fingerprint}, transform {transform_fingerprint(manifest)}). "
            "Embed queries with this version's transform (Searcher.open_embedder) or open the version the "
            "embedder was made for."
        )


def check_expected(manifest: IndexManifest, version_dir: str, expected_fingerprint: str | None = None,
                   expected_model: Any = None) -> None:
    """What a searcher checks when it opens: the pinned model (fingerprint or ModelSpec) and space."""
    if expected_model is not None:
        if isinstance(expected_model, str):
            check_model_fingerprint(expected_model, manifest, version_dir)
        else:
            check_model(expected_model, manifest)
    if expected_fingerprint is not None:
        check_space(expected_fingerprint, manifest, version_dir)


def accepted_served_fingerprints(manifest: IndexManifest, export_card: Any = None) -> set[str]:
    """Model fingerprints whose served vectors the index can search.

    The index's own; and when the index was extracted through an exported SavedModel
    (``savedmodel:DIR/N``), the fingerprint that export recorded (``export_card``, read
    by the caller), which is the preset's.
    """
    accepted = {manifest.model_fingerprint}
    if export_card is not None:
        accepted.add(export_card.model_fingerprint)
    return accepted


def check_served(
    manifest: IndexManifest,
    endpoint: str,
    dim: int,
    model_fingerprints: list[str] | None,
    transform_fingerprints: list[str] | None = None,
    index_versions: list[str] | None = None,
    export_card: Any = None,
    fingerprint_output: str = "model_fingerprint",
) -> None:
    """Refuses vectors TF Serving computed with another model, or transformed for another index version.

    ``transform_fingerprints`` is None when the served signature returns raw backbone
    features (the index's transform is applied here), else one per vector.
    """
    fingerprints = set(model_fingerprints or [])
    if not fingerprints:
        raise ModelMismatchError(
            f"{endpoint} returns no {fingerprint_output!r}: it was not exported by cbir export-model, so its "
            "vectors cannot be checked against the index"
        )
    if not fingerprints <= accepted_served_fingerprints(manifest, export_card):
        raise ModelMismatchError(
            f"{endpoint} serves model fingerprint {', '.join(sorted(fingerprints))}; the index "
            f"{manifest.version} was built with {manifest.preset} (fingerprint {manifest.model_fingerprint}). "
            f"Export the index's model (cbir export-model --model {manifest.preset}) and serve it, or query "
            "without --serving."
        )
    if transform_fingerprints is not None:
        expected = transform_fingerprint(manifest)
        got = set(transform_fingerprints)
        if got != {expected}:
            served = ", ".join(sorted(set(index_versions or []))) or "unknown"
            raise ModelMismatchError(
                f"{endpoint} applies the transform of index version {served} (transform fingerprint "
                f"{', '.join(sorted(got))}), not that of {manifest.version} ({expected}). Re-export with "
                "--index pointing at this version, or use the serving_default signature (transformed locally)."
            )
        want = manifest.dimension.output
    else:
        want = manifest.dimension.input
    if dim != want:
        raise ModelMismatchError(f"{endpoint} returned {dim}-d vectors; the index expects {want}-d here")
