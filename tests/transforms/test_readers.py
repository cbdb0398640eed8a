"""The shard readers (TFRecord, WebDataset, Parquet) on the DirectRunner, and the parity of all four inputs.

Shards are written here from real flowers17 photos with the libraries that write them in
the wild (``tf.io.TFRecordWriter``, ``tarfile`` in img2dataset's layout, pyarrow), then
damaged on purpose: every damaged record must come out as a failure row with stage
``read`` while the rest of the shard is still read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import uuid
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from pipelines import extract
from pipelines import shard_inputs as shard
from pipelines.runner import pipeline_options
from transforms.readers import InputSpec, ListedFile, ReadImages, RecordTooLargeError, read_limited, write_listing
from transforms.readers.common import TALLIES_TAG, _AccountFn
from transforms.readers.parquet import parquet_columns
from transforms.readers.tfrecord import encode_example, iter_tfrecord_frames
from transforms.readers.webdataset import _ReadTarShardFn, split_wds_name
from transforms.records import FAILURES_TAG


@pytest.fixture(scope="module")
def photos(flowers) -> list[tuple[str, str, bytes]]:
    """Eight real photos as (id, label, bytes), two from each of four labels."""
    out = []
    for label in ("0", "2", "5", "7"):
        for p in sorted((flowers / label).glob("*.jpg"))[:2]:
            out.append((f"{label}/{p.name}", label, p.read_bytes()))
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record_row(r) -> str:
    return json.dumps({"image_id": r.image_id, "uri": r.uri, "label": r.label, "sha256": sha(r.data)})


def read_spec(spec: str, tmp_path: Path, allow_uri_prefixes: tuple[str, ...] = ()
              ) -> tuple[dict[str, dict], list[dict], dict[str, int]]:
    """Runs ReadImages alone: ``({image_id: record row}, failure rows, cbir counters)``.

    Also checks the accounting invariant of shard readers: one tally per listed shard,
    adding up to the records and failure rows they produced.
    """
    out = tmp_path / f"collected-{uuid.uuid4().hex[:6]}"
    parsed = InputSpec.parse(spec, allow_uri_prefixes)
    listed = parsed.list()
    p = beam.Pipeline(options=pipeline_options([]))  # the jobs' own local runner
    read = p | ReadImages(parsed, write_listing(str(out / "staging"), listed))
    read["records"] | "R" >> beam.Map(_record_row) | "WR" >> beam.io.WriteToText(str(out / "records"))
    read["failures"] | "F" >> beam.Map(json.dumps) | "WF" >> beam.io.WriteToText(str(out / "failures"))
    if "tallies" in read:
        read["tallies"] | "T" >> beam.Map(json.dumps) | "WT" >> beam.io.WriteToText(str(out / "tallies"))
    result = p.run()
    result.wait_until_finish()

    def lines(prefix: str) -> list[dict]:
        return [json.loads(line) for f in out.glob(f"{prefix}*") for line in f.read_text().splitlines() if line]

    records = lines("records")
    by_id = {r["image_id"]: r for r in records}
    assert len(by_id) == len(records), "duplicate ids"
    if parsed.is_shards:
        tallies = lines("tallies")
        assert sorted(t["unit"] for t in tallies) == sorted(f.path for f in listed)
        assert sum(t["entries"] for t in tallies) == len(records) + len(lines("failures"))
    counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
                if c.key.metric.namespace == "cbir"}
    return by_id, lines("failures"), counters


def _example(data: bytes | None = None, **fields) -> bytes:
    feature = {}
    if data is not None:
        feature["image/encoded"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
    for key, value in fields.items():
        key = "image/" + key.replace("__", "/")
        if isinstance(value, int):
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        else:
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_tf(path: Path, payloads: list[bytes], options: str | None = None) -> list[int]:
    """Writes with TensorFlow's own writer; returns each record's byte offset."""
    with tf.io.TFRecordWriter(str(path), options=options) as w:
        for payload in payloads:
            w.write(payload)
    offsets, at = [], 0
    for payload in payloads:
        offsets.append(at)
        at += 16 + len(payload)
    return offsets


# ---------------------------------------------------------------- TFRecord


def test_tfrecord_shards_good_and_damaged(photos, tmp_path):
    d = tmp_path / "tfr"
    d.mkdir()
    good = [_example(data, id=i, label=lab, uri=f"gs://bucket/{i}") for i, lab, data in photos[:4]]
    _write_tf(d / "a-00000.tfrecord", good)
    # Fallback keys (TensorFlow's build_image_data.py layout), an id-less record, one without bytes, garbage.
    _write_tf(d / "b-00000.tfrecord", [
        _example(photos[4][2], filename="classic/x.jpg", class__label=3),
        _example(photos[5][2]),
        _example(None, id="no-bytes", label="7"),
        b"\x08\x96\x01 definitely not an Example",
        _example(photos[6][2], id="after-garbage", class__text="daisy"),
    ])
    # A payload byte flipped: its CRC fails, the records around it are still read.
    offsets = _write_tf(d / "c-00000.tfrecord", [_example(data, id=f"c/{i}") for i, _, data in photos[:3]])
    raw = bytearray((d / "c-00000.tfrecord").read_bytes())
    raw[offsets[1] + 12 + 50] ^= 0xFF
    (d / "c-00000.tfrecord").write_bytes(bytes(raw))
    # Truncated in the middle of record 2: records 0-1 read, the rest is one failure row.
    offsets = _write_tf(d / "d-00000.tfrecord", [_example(data, id=f"d/{i}") for i, _, data in photos[:4]])
    raw = (d / "d-00000.tfrecord").read_bytes()
    (d / "d-00000.tfrecord").write_bytes(raw[: offsets[2] + 300])
    # A corrupt length field: framing is lost from record 1 on.
    offsets = _write_tf(d / "e-00000.tfrecord", [_example(data, id=f"e/{i}") for i, _, data in photos[:3]])
    raw = bytearray((d / "e-00000.tfrecord").read_bytes())
    raw[offsets[1] + 2] ^= 0x01
    (d / "e-00000.tfrecord").write_bytes(bytes(raw))
    # Not a TFRecord at all; gzip-compressed shard; files every shard glob must skip.
    (d / "f-00000.tfrecord").write_bytes(photos[0][2])
    _write_tf(d / "g-00000.tfrecord.gz", [_example(photos[7][2], id="gz/one", label="7")], options="GZIP")
    (d / "_SUCCESS").write_bytes(b"")
    (d / ".a-00000.tfrecord.crc").write_bytes(b"\0" * 8)

    records, failures, counters = read_spec(f"tfrecord:{d}", tmp_path)

    for i, lab, data in photos[:4]:
        assert records[i] == {"image_id": i, "uri": f"gs://bucket/{i}", "label": lab, "sha256": sha(data)}
    assert records["classic/x.jpg"]["label"] == "3"
    assert records["b-00000.tfrecord#1"]["uri"] == f"{d}/b-00000.tfrecord#1"
    assert records["b-00000.tfrecord#1"]["label"] is None
    assert records["after-garbage"]["label"] == "daisy"
    assert sorted(k for k in records if k.startswith("c/")) == [f"c/{photos[0][0]}", f"c/{photos[2][0]}"]
    assert sorted(k for k in records if k.startswith("d/")) == [f"d/{photos[0][0]}", f"d/{photos[1][0]}"]
    assert sorted(k for k in records if k.startswith("e/")) == [f"e/{photos[0][0]}"]
    assert records["gz/one"]["sha256"] == sha(photos[7][2])

    by_id = {f["image_id"]: f for f in failures}
    assert all(f["stage"] == "read" and f["message"] for f in failures)
    assert by_id["no-bytes"]["error"] == "MissingImageError"
    assert by_id["b-00000.tfrecord#3"]["error"] == "CorruptRecordError"
    assert by_id["c-00000.tfrecord#1"]["error"] == "CorruptRecordError"
    assert by_id["d-00000.tfrecord#2"]["error"] == "CorruptShardError"
    assert "from record 2 on" in by_id["d-00000.tfrecord#2"]["message"]
    assert by_id["e-00000.tfrecord#1"]["error"] == "CorruptShardError"
    assert by_id["f-00000.tfrecord#0"]["error"] == "CorruptShardError"
    assert len(failures) == 6
    assert counters["read"] == len(records) + len(failures) == 13 + 6
    assert counters["failed_read"] == 6 and counters["failed_read_CorruptShardError"] == 3
    assert counters["shards_read"] == 7


def test_our_frames_match_tensorflows(photos, tmp_path):
    """Frames written by Beam's helper read back with tf.data, and TF's frames with ours."""
    payloads = [encode_example(data, i, lab) for i, lab, data in photos[:3]]
    path = tmp_path / "ours.tfrecord"
    with path.open("wb") as f:
        for payload in payloads:
            shard.write_tfrecord(f, payload)
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == payloads
    _write_tf(tmp_path / "theirs.tfrecord", payloads)
    with (tmp_path / "theirs.tfrecord").open("rb") as f:
        assert [fr.payload for fr in iter_tfrecord_frames(f)] == payloads
    parsed = tf.train.Example.FromString(payloads[0]).features.feature
    assert parsed["image/id"].bytes_list.value[0].decode() == photos[0][0]
    assert parsed["image/encoded"].bytes_list.value[0] == photos[0][2]


def test_oversized_record_is_skipped_not_allocated(photos, tmp_path):
    payloads = [_example(data, id=i) for i, _, data in photos[:3]]
    path = tmp_path / "big.tfrecord"
    _write_tf(path, payloads)
    with path.open("rb") as f:
        frames = list(iter_tfrecord_frames(f, max_record_bytes=len(payloads[1]) - 1))
    assert [type(fr.error).__name__ if fr.error else None for fr in frames] == [
        "RecordTooLargeError" if len(p) > len(payloads[1]) - 1 else None for p in payloads]
    assert frames[-1].index == 2


# ---------------------------------------------------------------- WebDataset


def _tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> None:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_wds_tars_in_img2dataset_layout(photos, tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    meta = {"url": "https://example.com/a.jpg", "key": "000000000", "status": "success", "caption": "a flower"}
    _tar(d / "00000.tar", [
        ("000000000.jpg", photos[0][2]), ("000000000.txt", b"a flower"), ("000000000.json", json.dumps(meta).encode()),
        ("000000001.jpg", photos[1][2]), ("000000001.cls", b"5\n"),
        ("000000002.png", photos[2][2]), ("000000002.json", b'{"image_id": "mine/2", "label": "tulip"}'),
        ("000000003.txt", b"caption without an image"),
        ("000000004.seg.png", b"not ours"), ("000000004.npy", b"\x93NUMPY"), ("000000004.webp", photos[3][2]),
        ("000000005.jpg", photos[4][2]), ("000000005.json", b"{broken json"),
        ("../../escape.jpg", photos[5][2]),
        ("README", b"no extension: not a sample"),
    ])
    # Keys with folders, and a gzip-compressed tar.
    _tar(d / "00001.tar.gz", [("train/a.jpeg", photos[6][2]), ("train/a.cls", b"7")], mode="w:gz")
    # A tar cut in the middle of its second sample.
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for i, (_, _, data) in enumerate(photos[:3]):
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (d / "00002.tar").write_bytes(whole.getvalue()[: 512 + len(photos[0][2]) + 2000])
    (d / "00003.tar").write_bytes(b"\x00" * 100 + b"not a tar")

    records, failures, counters = read_spec(f"wds:{d}/*", tmp_path)

    r0 = records["00000.tar#000000000"]
    assert r0 == {"image_id": "00000.tar#000000000", "uri": meta["url"], "label": "a flower",
                  "sha256": sha(photos[0][2])}
    assert records["00000.tar#000000001"]["label"] == "5"
    assert records["00000.tar#000000001"]["uri"] == f"{d}/00000.tar#000000001"
    assert records["mine/2"]["label"] == "tulip" and records["mine/2"]["sha256"] == sha(photos[2][2])
    assert records["00000.tar#000000004"]["sha256"] == sha(photos[3][2])
    assert records["00000.tar#../../escape"]["sha256"] == sha(photos[5][2])  # a name, never a path
    assert not (tmp_path.parent / "escape.jpg").exists() and not (d.parent / "escape.jpg").exists()
    assert records["00001.tar.gz#train/a"]["label"] == "7"
    assert records["00002.tar#000000000"]["sha256"] == sha(photos[0][2])

    by_id = {f["image_id"]: f for f in failures}
    assert by_id["00000.tar#000000003"]["error"] == "MissingImageError"
    assert by_id["00000.tar#000000005"]["error"] == "CorruptRecordError"
    assert by_id["00002.tar#000000001"]["error"] == "CorruptShardError"  # its header claims more than is there
    assert "from member" in by_id["00002.tar#000000001"]["message"]
    assert by_id["00003.tar"]["error"] == "ReadError"
    assert len(failures) == 4 and all(f["stage"] == "read" for f in failures)
    assert counters["read"] == len(records) + len(failures) == 7 + 4
    assert counters["wds_members_ignored"] == 1


def test_wds_key_split_follows_webdataset():
    assert split_wds_name("a/b/000123.jpg") == ("a/b/000123", "jpg")
    assert split_wds_name("x.seg.PNG") == ("x", "seg.png")
    assert split_wds_name("dir.v2/x.json") == ("dir.v2/x", "json")
    assert split_wds_name("README") is None and split_wds_name(".hidden") is None


def test_oversized_inputs_are_refused_unread(photos, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(photos[0][2])
    assert read_limited(str(path), len(photos[0][2])) == photos[0][2]
    with pytest.raises(RecordTooLargeError):
        read_limited(str(path), len(photos[0][2]) - 1)
    small = encode_example(b"x", "unused")  # any short payload will do as the small member
    _tar(tmp_path / "s.tar", [("a.jpg", photos[0][2]), ("a.cls", b"1"), ("b.png", small)])
    out = list(_ReadTarShardFn(str(tmp_path), max_member_bytes=len(small)).process(
        ListedFile(str(tmp_path / "s.tar"), (tmp_path / "s.tar").stat().st_size)))
    assert out[0]["image_id"] == "s.tar#a" and out[0]["error"] == "RecordTooLargeError"
    assert out[1].image_id == "s.tar#b" and out[1].data == small
    assert out[2].tag == TALLIES_TAG and out[2].value == {"unit": str(tmp_path / "s.tar"), "entries": 2}


def test_account_logs_progress_with_a_rate(photos, caplog):
    fn = _AccountFn("files", every_seconds=0)
    fn.setup()
    from transforms.records import ImageRecord, failure

    with caplog.at_level("INFO", logger="cbir.progress"):
        out = list(fn.process(ImageRecord("a", "a", None, b"x")))
        out += list(fn.process(failure("b", "b", "read", OSError("gone"))))
    assert out[0].image_id == "a" and out[1].tag == FAILURES_TAG
    assert any("read files: 2 inputs in this worker" in r.getMessage() and "/s" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------- Parquet


def test_parquet_bytes_struct_and_uri_columns(photos, tmp_path):
    d = tmp_path / "pq"
    (d / "imgs").mkdir(parents=True)
    # Bytes column, int labels, three row groups, one row without bytes.
    pq.write_table(pa.table({
        "image_id": [i for i, _, _ in photos[:4]] + ["no-bytes"],
        "label": [int(lab) for _, lab, _ in photos[:4]] + [1],
        "image": [data for _, _, data in photos[:4]] + [None],
    }), d / "bytes.parquet", row_group_size=2)
    # A Hugging Face datasets Image column: struct<bytes, path>.
    pq.write_table(pa.table({
        "image": [{"bytes": photos[4][2], "path": "x.jpg"}],
        "label": ["hf"],
    }), d / "hf.parquet")
    # Uris: absolute (allowed by prefix below), relative to the Parquet file, and missing.
    (d / "imgs" / "one.jpg").write_bytes(photos[5][2])
    pq.write_table(pa.table({
        "image_id": ["abs", "rel", "gone"],
        "uri": [str(tmp_path / "abs.jpg"), "imgs/one.jpg", "imgs/missing.jpg"],
        "label": ["a", "b", None],
    }), d / "uris.parquet")
    (tmp_path / "abs.jpg").write_bytes(photos[6][2])
    # No image column at all: every row is a failure, none is lost.
    pq.write_table(pa.table({"image_id": ["c1", "c2"], "caption": ["x", "y"]}), d / "captions.parquet")
    (d / "broken.parquet").write_bytes(b"PAR1" + b"\x00" * 64)

    records, failures, counters = read_spec(f"parquet:{d}/*.parquet", tmp_path, allow_uri_prefixes=(str(tmp_path),))

    for i, lab, data in photos[:4]:
        assert records[i]["label"] == lab and records[i]["sha256"] == sha(data)
        assert records[i]["uri"].startswith(f"{d}/bytes.parquet#")
    hf = records["hf.parquet#0"]
    assert hf["label"] == "hf" and hf["sha256"] == sha(photos[4][2])
    assert records["abs"]["sha256"] == sha(photos[6][2]) and records["abs"]["label"] == "a"
    assert records["rel"]["uri"] == f"{d}/imgs/one.jpg" and records["rel"]["sha256"] == sha(photos[5][2])
    by_id = {f["image_id"]: f for f in failures}
    assert by_id["no-bytes"]["error"] == "MissingImageError"
    assert by_id["gone"]["uri"] == f"{d}/imgs/missing.jpg" and by_id["gone"]["stage"] == "read"
    assert by_id["c1"]["error"] == by_id["c2"]["error"] == "MissingImageError"
    assert "no image-bytes column" in by_id["c1"]["message"]
    assert by_id["broken.parquet"]["stage"] == "read"
    assert len(failures) == 5 and len(records) == 7
    assert counters["read"] == 12


def test_parquet_column_detection():
    cols = parquet_columns(pa.schema([("key", pa.string()), ("jpg", pa.large_binary()), ("url", pa.string())]))
    assert (cols.image, cols.uri, cols.image_id, cols.label) == ("jpg", "url", "key", None)
    cols = parquet_columns(pa.schema([("id", pa.string()), ("payload", pa.binary()), ("label", pa.int64())]))
    assert cols.image == "payload" and cols.label == "label" and cols.image_id is None
    cols = parquet_columns(pa.schema([("a", pa.binary()), ("b", pa.binary())]))
    assert cols.image is None  # ambiguous: no guessing


# ---------------------------------------------------------------- the four inputs give identical rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, flowers) -> Path:
    """Six photos in each of three labels, plus two broken files that must fail the same way everywhere."""
    root = tmp_path_factory.mktemp("corpus")
    for label in ("1", "3", "6"):
        (root / label).mkdir()
        for p in sorted((flowers / label).glob("*.jpg"))[2:8]:
            (root / label / p.name).write_bytes(p.read_bytes())
    (root / "broken").mkdir()
    good = next((flowers / "1").glob("*.jpg")).read_bytes()
    (root / "broken" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "broken" / "empty.jpg").write_bytes(b"")
    return root


def _rows(out: Path) -> tuple[pa.Table, list[tuple]]:
    features = pa.concat_tables([pq.read_table(p) for p in (out / "features").glob("*.parquet")]).sort_by("image_id")
    failures = pa.concat_tables([pq.read_table(p) for p in (out / "failures").glob("*.parquet")])
    return features, sorted((f["image_id"], f["stage"], f["error"]) for f in failures.to_pylist())


@pytest.mark.slow
def test_four_inputs_give_identical_feature_rows(corpus, tmp_path, mobilenet_spec):
    files = sorted(p for p in corpus.rglob("*.jpg"))
    ids = [str(p.relative_to(corpus)) for p in files]
    labels = [p.parent.name for p in files]
    # Shards written by cbir shard; Parquet written here, one with bytes (two files) and one with uris.
    shard.run(shard.ShardConfig(str(corpus), str(tmp_path / "tfr"), "tfrecord", shard_size_mb=0.25))
    shard.run(shard.ShardConfig(str(corpus), str(tmp_path / "wds"), "wds", shard_size_mb=0.25))
    assert len(list((tmp_path / "tfr").glob("*.tfrecord"))) > 1
    (tmp_path / "pq").mkdir()
    half = len(files) // 2
    for name, part in (("a", slice(0, half)), ("b", slice(half, None))):
        pq.write_table(pa.table({"image_id": ids[part], "label": labels[part],
                                 "image_bytes": [p.read_bytes() for p in files[part]]}),
                       tmp_path / "pq" / f"{name}.parquet", row_group_size=4)
    pq.write_table(pa.table({"image_id": ids, "uri": [str(p) for p in files], "label": labels}),
                   tmp_path / "uris.parquet")

    specs = {
        "folder": str(corpus),
        "tfrecord": f"tfrecord:{tmp_path}/tfr/*.tfrecord",
        "wds": f"wds:{tmp_path}/wds",
        "parquet": f"parquet:{tmp_path}/pq/*.parquet",
        "parquet-uri": f"parquet:{tmp_path}/uris.parquet",
    }
    results = {}
    for name, spec in specs.items():
        out = tmp_path / f"out-{name}"
        manifest = extract.run(extract.ExtractConfig(input=spec, output=str(out), model=mobilenet_spec,
                                                     allow_uri_prefixes=(str(corpus),)))
        c = manifest.counts
        assert (c.inputs, c.read, c.ok, c.failed) == (len(files), len(files), len(files) - 2, 2), name
        results[name] = _rows(out)

    base, base_failures = results["folder"]
    assert base_failures == [("broken/empty.jpg", "decode", "ImageDecodeError"),
                             ("broken/truncated.jpg", "decode", "OSError")]
    columns = ["image_id", "label", "sha256", "width", "height"]
    for name, (table, fails) in results.items():
        assert fails == base_failures, name
        for col in columns:
            assert table.column(col).to_pylist() == base.column(col).to_pylist(), (name, col)
        a = np.asarray(table.column("feature").to_pylist(), np.float32)
        b = np.asarray(base.column("feature").to_pylist(), np.float32)
        assert np.allclose(a, b, atol=1e-5, rtol=0), (name, float(np.abs(a - b).max()))
    assert base.column("image_id").to_pylist() == sorted(i for i in ids if not i.startswith("broken/"))
    assert set(results["wds"][0].column("uri").to_pylist()[0].split("#")[0:1]) <= {
        str(p) for p in (tmp_path / "wds").glob("*.tar")}


def test_gzip_tfrecord_through_beam_filesystems(photos, tmp_path):
    """Compression follows the extension, as Beam's own TFRecord source does."""
    path = tmp_path / "one.tfrecord.gz"
    buf = io.BytesIO()
    for payload in [_example(photos[0][2], id="z")]:
        shard.write_tfrecord(buf, payload)
    path.write_bytes(gzip.compress(buf.getvalue()))
    records, failures, _ = read_spec(f"tfrecord:{path}", tmp_path)
    assert list(records) == ["z"] and not failures


def test_a_local_folder_is_listed_as_beam_lists_it(tmp_path):
    """The walk that lists a local folder gives Beam's own listing: same paths, sizes and times."""
    import os

    from apache_beam.io.filesystems import FileSystems

    from transforms.readers.spec import _match

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel, size in [("x.jpg", 3), ("a/y.png", 5), ("a/b/z.jpg", 0), (".hidden/h.jpg", 1), ("a/.DS_Store", 2)]:
        (tmp_path / rel).write_bytes(b"\0" * size)
    os.symlink(tmp_path / "x.jpg", tmp_path / "a" / "link.jpg")
    pattern = f"{tmp_path}/**"

    def as_tuples(found):
        return sorted((m.path, m.size_in_bytes, m.last_updated_in_seconds) for m in found)

    assert as_tuples(_match(pattern)) == as_tuples(FileSystems.match([pattern])[0].metadata_list)
    assert len(_match(pattern)) == 6
