"""``cbir shard``: a folder of real photos packed into TFRecord / WebDataset shards, deterministically."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
import tensorflow as tf

from pipelines import shard_inputs as shard
from pipelines.cli import build_parser, main


@pytest.fixture(scope="module")
def tree(tmp_path_factory, flowers) -> Path:
    """Three labels of five photos, a nested folder, a root-level photo, and files that are not inputs."""
    root = tmp_path_factory.mktemp("tree")
    for label in ("2", "4", "8"):
        (root / label).mkdir()
        for p in sorted((flowers / label).glob("*.jpg"))[:5]:
            (root / label / p.name).write_bytes(p.read_bytes())
    nested = root / "extra" / "tulip"
    nested.mkdir(parents=True)
    src = sorted((flowers / "1").glob("*.jpg"))
    (nested / "Upper.JPG").write_bytes(src[0].read_bytes())
    (root / "at_root.jpeg").write_bytes(src[1].read_bytes())
    (root / "README.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(src[2].read_bytes())
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.jpg").write_bytes(src[3].read_bytes())
    return root


def _expected(root: Path) -> list[tuple[str, str | None, bytes]]:
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg") and not any(s.startswith(".") for s in rel.parts):
            out.append((str(rel), rel.parts[-2] if len(rel.parts) > 1 else None, p.read_bytes()))
    return sorted(out)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*"))}


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["shard", *argv])
    return code, capsys.readouterr().out


def test_cli_registers_shard():
    args = build_parser().parse_args(["shard", "--input", "a", "--output", "b", "--format", "wds"])
    assert args.format == "wds" and args.shard_size_mb == shard.DEFAULT_SHARD_SIZE_MB and args.beam is True


def test_tfrecord_shards_hold_every_image_once(tree, tmp_path, capsys):
    out = tmp_path / "tfr"
    code, stdout = _run(capsys, "--input", str(tree), "--output", str(out), "--format", "tfrecord",
                        "--shard-size-mb", "0.15")
    assert code == 0
    manifest = json.loads((out / shard.MANIFEST).read_text())
    expected = _expected(tree)
    names = sorted(p.name for p in out.glob("shard-*"))
    assert len(names) == len(manifest["shards"]) > 2
    assert names == [f"shard-{i:05d}-of-{len(names):05d}.tfrecord" for i in range(len(names))]
    assert manifest["counts"] == {"listed": len(expected), "written": len(expected), "unreadable": 0,
                                  "skipped_not_image": 1}
    assert manifest["skipped"] == ["README.txt"]
    assert f"{len(expected)} images in {len(names)} tfrecord shard(s)" in stdout
    assert f"--input tfrecord:{out}" in stdout
    assert not (out / "_staging").exists()
    got = []
    for name in names:  # read with TensorFlow itself: the shards are standard TFRecord files
        for raw in tf.data.TFRecordDataset(str(out / name)):
            f = tf.train.Example.FromString(raw.numpy()).features.feature
            label = f["image/label"].bytes_list.value[0].decode() if "image/label" in f else None
            got.append((f["image/id"].bytes_list.value[0].decode(), label, f["image/encoded"].bytes_list.value[0]))
    assert got == expected  # sorted by id across shards, labels from folder names, bytes untouched
    assert ("extra/tulip/Upper.JPG", "tulip", (tree / "extra/tulip/Upper.JPG").read_bytes()) in got
    for s in manifest["shards"]:
        assert s["bytes"] <= 0.15 * 1024 * 1024 or s["images"] == 1
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]


def test_wds_shards_in_webdataset_layout(tree, tmp_path):
    out = tmp_path / "wds"
    manifest = shard.run(shard.ShardConfig(str(tree), str(out), "wds", shard_size_mb=0.2))
    expected = _expected(tree)
    samples = []
    for s in manifest.shards:
        with tarfile.open(out / s.name) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.mode == 0o644 for m in members)
            names = [m.name for m in members]
            for img, meta in zip(names[::2], names[1::2], strict=True):
                key, ext = img.split(".", 1)
                assert meta == f"{key}.json" and ext in ("jpg", "jpeg")
                info = json.loads(tar.extractfile(meta).read())
                samples.append((key, info["image_id"], info.get("label"), tar.extractfile(img).read()))
    keys = [k for k, *_ in samples]
    assert keys == [f"{i:09d}" for i in range(len(expected))]  # keys run on across shards
    assert [(i, lab, data) for _, i, lab, data in samples] == expected


def test_runs_are_deterministic(tree, tmp_path):
    for fmt in ("tfrecord", "wds"):
        a = shard.run(shard.ShardConfig(str(tree), str(tmp_path / f"{fmt}-a"), fmt, shard_size_mb=0.2))
        b = shard.run(shard.ShardConfig(str(tree), str(tmp_path / f"{fmt}-b"), fmt, shard_size_mb=0.2))
        assert a.run_id != b.run_id
        assert _digests(tmp_path / f"{fmt}-a") == _digests(tmp_path / f"{fmt}-b") != {}
        assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_rerun_replaces_stale_shards_and_keeps_other_files(tree, tmp_path):
    out = tmp_path / "out"
    first = shard.run(shard.ShardConfig(str(tree), str(out), "tfrecord", shard_size_mb=0.1))
    (out / "notes.md").write_text("mine")
    second = shard.run(shard.ShardConfig(str(tree), str(out), "wds", shard_size_mb=100))
    assert len(first.shards) > 1 and len(second.shards) == 1
    assert sorted(p.name for p in out.iterdir()) == [shard.MANIFEST, "notes.md", "shard-00000-of-00001.tar"]


def test_manifest_names_are_checked_before_deleting(tree, tmp_path):
    """The manifest is read back from storage: a name that is not ours is never deleted."""
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / shard.MANIFEST).write_text(json.dumps({"shards": [{"name": "../victim.txt"}, {"name": str(victim)}]}))
    shard.run(shard.ShardConfig(str(tree), str(out), "wds", shard_size_mb=100))
    assert victim.read_text() == "keep me"


def test_unreadable_file_is_reported_not_packed(tree, tmp_path):
    items, _ = shard.list_images(str(tree))
    gone = shard.ShardItem(str(tree / "2" / "vanished.jpg"), "2/vanished.jpg", "2", 1000)
    plan = shard.plan_shards([items[0], gone, items[1]], "tfrecord", 100)[0]
    staging = tmp_path / "staging"
    staging.mkdir()
    assert list(shard._WriteShardFn("tfrecord", str(staging)).process(plan)) == [plan.name]
    summary = json.loads((staging / f"{plan.name}.summary.json").read_text())
    assert summary["images"] == 2
    assert [u["image_id"] for u in summary["unreadable"]] == ["2/vanished.jpg"]
    ids = [tf.train.Example.FromString(r.numpy()).features.feature["image/id"].bytes_list.value[0].decode()
           for r in tf.data.TFRecordDataset(str(staging / plan.name))]
    assert ids == [items[0].image_id, items[1].image_id]


def test_plan_is_stable_and_bounded():
    items = [shard.ShardItem(f"/r/{i}.jpg", f"{i:03d}.jpg", None, 40_000) for i in range(50)]
    plans = shard.plan_shards(items, "wds", 0.5)
    assert sum(len(p.items) for p in plans) == 50
    assert all(sum(shard.estimated_bytes(i, "wds") for i in p.items) <= 0.5 * 1024 * 1024 for p in plans)
    assert [p.first_key for p in plans] == [sum(len(q.items) for q in plans[:k]) for k in range(len(plans))]
    assert plans == shard.plan_shards(items, "wds", 0.5)
    huge = shard.ShardItem("/r/huge.jpg", "huge.jpg", None, 10 * 1024 * 1024)
    assert [len(p.items) for p in shard.plan_shards([huge, *items[:2]], "tfrecord", 1)] == [1, 2]


def test_bad_arguments(tree, tmp_path):
    with pytest.raises(ValueError, match="--format"):
        shard.run(shard.ShardConfig(str(tree), str(tmp_path), "zip"))
    with pytest.raises(ValueError, match="positive"):
        shard.run(shard.ShardConfig(str(tree), str(tmp_path), "wds", shard_size_mb=0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        shard.run(shard.ShardConfig(str(tmp_path / "empty"), str(tmp_path / "o"), "wds"))
