"""``cbir shard``: pack a folder of images into TFRecord or WebDataset *input* shards.

(Input shards are packs of images for readers; index shards are partitions of an
index, built by ``cbir index``: the module names say which.)

For users whose cluster prefers a few thousand large files to millions of small
ones. The output reads back with ``cbir extract --input tfrecord:OUT`` (or
``wds:OUT``) and gives the same feature rows as the folder itself: the same ids
(path relative to the input root), labels (parent folder name) and bytes.

Deterministic: files are listed, sorted by id and cut into shards on the launcher,
and every shard's bytes depend only on its files (protobuf serialized
deterministically, tar headers with fixed owner, mode and time), so two runs over
the same folder write identical shards. Only files with an image extension are
packed; hidden files and folders are skipped, as the folder reader skips them.
Broken images are packed as they are, to fail at extract time like the folder would.

Publishing: shards are written under ``OUT/_staging/<run>/``, moved into ``OUT``,
then ``OUT/_SHARDS.json`` is replaced atomically (the commit point); shards that the
previous manifest listed and this run did not write are deleted afterwards.
Shard readers skip ``_*`` names, so the manifest and staging never read as shards.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import posixpath
import re
import tarfile
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from artefacts.manifests import PackedShard, ShardsCounts, ShardsManifest, new_run_id, utc_now
from pipelines.runner import pipeline_options
from plumbing import fsutil
from plumbing import publish as protocol
from transforms.readers.common import IMAGE_EXTENSIONS, is_visible, label_from_id, relative_id
from transforms.readers.tfrecord import encode_example, write_tfrecord

log = logging.getLogger(__name__)

MANIFEST = "_SHARDS.json"
SHARD_FORMATS = {"tfrecord": "tfrecord", "wds": "tar"}  # format → file extension
DEFAULT_SHARD_SIZE_MB = 256.0
_SHARD_NAME = re.compile(r"^shard-\d{5}-of-\d{5}\.(tfrecord|tar)$")
_TAR_BLOCK = 512


class ShardItem(NamedTuple):
    path: str
    image_id: str
    label: str | None
    size: int


class ShardPlan(NamedTuple):
    name: str
    first_key: int  # global index of the first item: WebDataset keys run over the whole dataset
    items: tuple[ShardItem, ...]


@dataclasses.dataclass
class ShardConfig:
    input: str
    output: str
    format: str = "tfrecord"
    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB


def list_images(root: str) -> tuple[list[ShardItem], list[str]]:
    """Every visible file under ``root`` sorted by id: ``(images, skipped ids)``."""
    root = root.rstrip("/")
    matched = FileSystems.match([FileSystems.join(root, "**")])[0].metadata_list
    images, skipped = [], []
    for m in matched:
        if not is_visible(m.path, root):
            continue
        image_id = relative_id(m.path, root)
        if image_id.lower().endswith(IMAGE_EXTENSIONS):
            images.append(ShardItem(m.path, image_id, label_from_id(image_id), m.size_in_bytes))
        else:
            skipped.append(image_id)
    images.sort(key=lambda item: item.image_id)
    return images, sorted(skipped)


def _padded(n: int) -> int:
    return -(-n // _TAR_BLOCK) * _TAR_BLOCK


def _wds_meta(item: ShardItem) -> bytes:
    meta = {"image_id": item.image_id}
    if item.label is not None:
        meta["label"] = item.label
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def estimated_bytes(item: ShardItem, fmt: str) -> int:
    """What one item adds to a shard: its bytes plus the container's framing."""
    if fmt == "wds":
        return 2 * _TAR_BLOCK + _padded(item.size) + _padded(len(_wds_meta(item)))
    return item.size + 16 + 64 + len(item.image_id) + len(item.label or "")


def plan_shards(items: Sequence[ShardItem], fmt: str, shard_size_mb: float) -> list[ShardPlan]:
    """Cuts the sorted items into consecutive shards of at most ``shard_size_mb`` MiB.

    An image larger than the limit gets a shard of its own. Depends only on the
    sorted list, so the same folder always gives the same shards.
    """
    limit = max(1, int(shard_size_mb * 1024 * 1024))
    groups: list[list[ShardItem]] = []
    current: list[ShardItem] = []
    size = 0
    for item in items:
        cost = estimated_bytes(item, fmt)
        if current and size + cost > limit:
            groups.append(current)
            current, size = [], 0
        current.append(item)
        size += cost
    if current:
        groups.append(current)
    ext = SHARD_FORMATS[fmt]
    plans, first = [], 0
    for i, group in enumerate(groups):
        plans.append(ShardPlan(f"shard-{i:05d}-of-{len(groups):05d}.{ext}", first, tuple(group)))
        first += len(group)
    return plans


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _WriteShardFn(beam.DoFn):
    """Writes one planned shard to the staging folder, plus a small JSON summary of it.

    Re-running a plan rewrites the same bytes, so a retried bundle is harmless.
    """

    def __init__(self, fmt: str, staging: str):
        self._fmt = fmt
        self._staging = staging
        self._images = Metrics.counter("cbir", "shard_images_written")
        self._unreadable = Metrics.counter("cbir", "shard_images_unreadable")
        self._bytes = Metrics.counter("cbir", "shard_bytes_written")

    def process(self, plan: ShardPlan):
        path = fsutil.join(self._staging, plan.name)
        digest = hashlib.sha256()
        unreadable: list[dict[str, str]] = []
        written = 0

        class _Hashing:
            """A write-only stream that hashes what passes through it."""

            def __init__(self, f):
                self.f, self.n = f, 0

            def write(self, b):
                digest.update(b)
                self.n += len(b)
                return self.f.write(b)

        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
            out = _Hashing(raw)
            tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) if self._fmt == "wds" else None
            for offset, item in enumerate(plan.items):
                try:
                    data = fsutil.read_input(item.path, size=item.size)
                except Exception as exc:  # vanished or unreadable since listing
                    unreadable.append({"image_id": item.image_id, "error": type(exc).__name__,
                                       "message": str(exc)[:500]})
                    continue
                if tar is not None:
                    key = f"{plan.first_key + offset:09d}"
                    ext = posixpath.splitext(item.image_id)[1].lstrip(".").lower()
                    _tar_member(tar, f"{key}.{ext}", data)
                    _tar_member(tar, f"{key}.json", _wds_meta(item))
                else:
                    write_tfrecord(out, encode_example(data, item.image_id, item.label))
                written += 1
            if tar is not None:
                tar.close()
            size = out.n
        self._images.inc(written)
        self._unreadable.inc(len(unreadable))
        self._bytes.inc(size)
        log.info("shard %s: %d images, %.1f MB", plan.name, written, size / 1e6)
        summary = {"name": plan.name, "images": written, "bytes": size, "sha256": digest.hexdigest(),
                   "first_id": plan.items[0].image_id, "last_id": plan.items[-1].image_id,
                   "unreadable": unreadable}
        fsutil.write_json_atomic(path + ".summary.json", summary)
        yield plan.name


def run(cfg: ShardConfig, beam_args: list[str] | None = None) -> ShardsManifest:
    """Lists, plans, writes and publishes the shards; returns the manifest."""
    if cfg.format not in SHARD_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(SHARD_FORMATS)}")
    if cfg.shard_size_mb <= 0:
        raise ValueError("--shard-size-mb must be positive")
    started = time.time()
    root = cfg.input.rstrip("/")
    items, skipped = list_images(root)
    if not items:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
    plans = plan_shards(items, cfg.format, cfg.shard_size_mb)
    run_id = new_run_id()
    staging = protocol.staging_dir(cfg.output, run_id)
    log.info("shard %s -> %s: %d images in %d %s shard(s), %d other files skipped (run %s)",
             root, cfg.output, len(items), len(plans), cfg.format, len(skipped), run_id)
    p = beam.Pipeline(options=pipeline_options(beam_args))
    (
        p
        | "Plans" >> beam.Create(plans)
        | "Spread" >> beam.Reshuffle()
        | "WriteShards" >> beam.ParDo(_WriteShardFn(cfg.format, staging))
    )
    try:
        p.run().wait_until_finish()
        return publish(cfg, root, run_id, staging, plans, skipped, time.time() - started)
    except BaseException:
        protocol.discard_staging(staging)
        raise


def publish(cfg: ShardConfig, root: str, run_id: str, staging: str, plans: list[ShardPlan],
            skipped: list[str], elapsed: float) -> ShardsManifest:
    """Checks that every listed image was written or reported unreadable, then commits ``_SHARDS.json``."""
    shards, unreadable = [], []
    missing = [plan.name for plan in plans if not fsutil.exists(fsutil.join(staging, plan.name + ".summary.json"))]
    if missing:
        raise protocol.PublishRefusedError("shard", {"shards planned": len(plans),
                                                     "shards written": len(plans) - len(missing)},
                                           f"not written: {missing[:3]}")
    for plan in plans:
        summary = fsutil.read_json(fsutil.join(staging, plan.name + ".summary.json"))
        unreadable += summary.pop("unreadable")
        shards.append(PackedShard(**summary))
    listed = sum(len(plan.items) for plan in plans)
    images = sum(s.images for s in shards)
    protocol.check_counts("shard", {"images listed": listed, "written + unreadable": images + len(unreadable)})
    manifest = ShardsManifest(
        format=cfg.format,
        run_id=run_id,
        created_utc=utc_now(),
        input=root,
        input_spec=f"{cfg.format}:{cfg.output.rstrip('/')}",
        shard_size_mb=cfg.shard_size_mb,
        counts=ShardsCounts(listed=listed, written=images, unreadable=len(unreadable),
                            skipped_not_image=len(skipped)),
        bytes=sum(s.bytes for s in shards),
        elapsed_seconds=round(elapsed, 3),
        shards=shards,
        unreadable=unreadable,
        skipped=skipped[:1000],
    )
    keep = {s.name for s in shards}
    stale = [n for n in _previous_shards(cfg.output) if n not in keep]
    moves = [(fsutil.join(staging, s.name), fsutil.join(cfg.output, s.name)) for s in shards]
    protocol.commit(cfg.output, manifest, moves, staging, stale=stale, manifest_name=MANIFEST)
    return manifest


def _previous_shards(output: str) -> list[str]:
    """Shard names the committed manifest lists: only plain names this command writes.

    The manifest is read back from storage, so its names are checked against our own
    naming pattern before anything is deleted.
    """
    path = fsutil.join(output, MANIFEST)
    if not fsutil.exists(path):
        return []
    try:
        names = [s.name for s in protocol.read_manifest(path, ShardsManifest).shards]
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return []
    return [n for n in names if isinstance(n, str) and _SHARD_NAME.match(n)]


def print_summary(m: ShardsManifest) -> None:
    c = m.counts
    print(f"shard: {c.written} images in {len(m.shards)} {m.format} shard(s), {m.bytes / 1e6:.1f} MB, "
          f"{m.elapsed_seconds:.1f}s; skipped {c.skipped_not_image} non-image file(s), {c.unreadable} unreadable")
    for u in m.unreadable[:10]:
        print(f"  unreadable  {u['image_id']}  {u['error']}: {u['message']}")
    print(f"read them with: cbir extract --input {m.input_spec} --output DIR")


def main(args: argparse.Namespace, beam_args: list[str]) -> int:
    cfg = ShardConfig(input=args.input, output=args.output, format=args.format, shard_size_mb=args.shard_size_mb)
    manifest = run(cfg, beam_args)
    print_summary(manifest)
    return 3 if manifest.counts.unreadable else 0


def register(subparsers: Any) -> None:
    sp = subparsers.add_parser("shard", help="folder of images → TFRecord or WebDataset shards")
    sp.add_argument("--input", required=True, help="folder of images (labels are the parent folder names)")
    sp.add_argument("--output", required=True, help="folder for shard-NNNNN-of-NNNNN.{tfrecord,tar} + _SHARDS.json")
    sp.add_argument("--format", choices=sorted(SHARD_FORMATS), default="tfrecord")
    sp.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_SIZE_MB,
                    help=f"target shard size in MiB (default {DEFAULT_SHARD_SIZE_MB:g})")
    sp.set_defaults(handler=main, beam=True)
