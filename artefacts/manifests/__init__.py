"""The manifests every job writes, as typed records with one reader and one writer; one module per kind.

Seven kinds (ARCHITECTURE.md, "Artefacts"), and one record that is not a manifest:

=====================  ==========================================  ===========================================
kind (module)          written by                                  file
=====================  ==========================================  ===========================================
``features``           ``cbir extract``, ``cbir autoencode``       ``<out>/MANIFEST.json``
``index``              ``cbir index``                              ``<index>/<version>/MANIFEST.json``
``neighbors``          ``cbir neighbors``                          ``<out>/MANIFEST.json``
``shards``             ``cbir shard`` (packed input shards)        ``<out>/_SHARDS.json``
``cbir-savedmodel``    ``cbir export-model`` (``export_card``)     ``<N>/assets.extra/cbir_export.json``
``pixel-autoencoder``  ``cbir train-autoencoder``                  ``<out>/MANIFEST.json``
``top-patches``        ``cbir top-patches``                        ``<out>/MANIFEST.json``
(``shard_record``)     the index shard builder                     ``<version>/shards/shard-NNNNN/SHARD.json``
=====================  ==========================================  ===========================================

Each is a dataclass; what they share (the base class, the JSON converter, run ids and
fingerprints) is in :mod:`artefacts.manifests.base`. Nothing here does I/O: the jobs read
and write through Beam filesystems (``plumbing.publish``), the searcher through
``search.index_files``. Import the names from this package; the modules are how the code is
kept, not a contract.
"""

from artefacts.manifests.base import (
    Accounting,
    FileDigest,
    Manifest,
    ManifestError,
    PartFile,
    fingerprint,
    new_run_id,
    record_from_dict,
    record_to_json,
    utc_now,
)
from artefacts.manifests.export_card import ExportCard
from artefacts.manifests.features import ExtractCounts, FeaturesManifest
from artefacts.manifests.index import AnnoyParams, Dimension, HnswParams, IndexManifest, LshParams, TransformInfo
from artefacts.manifests.neighbors import NeighborsCounts, NeighborsIndexRef, NeighborsManifest
from artefacts.manifests.pixel_autoencoder import (
    KIND_AUTOENCODER,
    KIND_DENOISING,
    PixelAutoencoderManifest,
    PixelCounts,
    PixelShards,
    SavedModelInfo,
    WeightsInfo,
)
from artefacts.manifests.shard_record import LEGACY_INDEX_TYPES, ShardAnnoy, ShardHnsw, ShardRecord
from artefacts.manifests.shards import PackedShard, ShardsCounts, ShardsManifest
from artefacts.manifests.top_patches import TopPatchesManifest

__all__ = [
    "KIND_AUTOENCODER",
    "KIND_DENOISING",
    "LEGACY_INDEX_TYPES",
    "Accounting",
    "AnnoyParams",
    "Dimension",
    "ExportCard",
    "ExtractCounts",
    "FeaturesManifest",
    "FileDigest",
    "HnswParams",
    "IndexManifest",
    "LshParams",
    "Manifest",
    "ManifestError",
    "NeighborsCounts",
    "NeighborsIndexRef",
    "NeighborsManifest",
    "PackedShard",
    "PartFile",
    "PixelAutoencoderManifest",
    "PixelCounts",
    "PixelShards",
    "SavedModelInfo",
    "ShardAnnoy",
    "ShardHnsw",
    "ShardRecord",
    "ShardsCounts",
    "ShardsManifest",
    "TopPatchesManifest",
    "TransformInfo",
    "WeightsInfo",
    "fingerprint",
    "new_run_id",
    "record_from_dict",
    "record_to_json",
    "utc_now",
]
