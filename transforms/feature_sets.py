"""An extract output as other jobs read it: its checked manifest and the part files it lists.

Readers never glob the feature folder: a crashed or refused run can leave parts there
that no manifest lists, and they must stay invisible.
"""

from __future__ import annotations

from artefacts.manifests import FeaturesManifest
from plumbing import fsutil
from plumbing.publish import MANIFEST, read_manifest


def read_features_manifest(features_dir: str) -> FeaturesManifest:
    """The committed manifest of an extract (or autoencode) output."""
    path = fsutil.join(features_dir, MANIFEST)
    if not fsutil.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {features_dir} is not a finished extract output (run cbir extract)"
        )
    return read_manifest(path, FeaturesManifest)


def feature_files(features_dir: str, manifest: FeaturesManifest | None = None, kind: str = "features") -> list[str]:
    """Paths of the parts of one kind (``features``, ``failures``, ``local``) the manifest lists."""
    manifest = manifest or read_features_manifest(features_dir)
    return [fsutil.join(features_dir, f.path) for f in manifest.parts(kind)]
