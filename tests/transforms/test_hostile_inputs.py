"""Hostile and odd inputs: each becomes a failure row with its reason, quickly, and the rest completes.

Every file here is made by the test: FIFOs, links, crafted tars, Parquet uris that point
outside their shard, files larger than the limit. The accounting holds throughout: per
shard, records + failure rows = the shard's tally.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import uuid
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.runner import pipeline_options
from plumbing import fsutil
from transforms.readers import InputSpec, ReadImages, write_listing


@pytest.fixture(scope="module")
def jpeg(flowers) -> bytes:
    return next(iter(sorted((flowers / "4").glob("*.jpg")))).read_bytes()


def read(spec: InputSpec, tmp_path: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """ReadImages alone: (record rows, failure rows, tallies)."""
    out = tmp_path / f"collected-{uuid.uuid4().hex[:6]}"
    listed = spec.list()
    p = beam.Pipeline(options=pipeline_options([]))  # the jobs' own local runner
    got = p | ReadImages(spec, write_listing(str(out / "staging"), listed))
    got["records"] | "R" >> beam.Map(lambda r: json.dumps({"image_id": r.image_id, "bytes": len(r.data)})) \
        | "WR" >> beam.io.WriteToText(str(out / "records"))
    got["failures"] | "F" >> beam.Map(json.dumps) | "WF" >> beam.io.WriteToText(str(out / "failures"))
    if "tallies" in got:
        got["tallies"] | "T" >> beam.Map(json.dumps) | "WT" >> beam.io.WriteToText(str(out / "tallies"))
    p.run().wait_until_finish()

    def lines(prefix: str) -> list[dict]:
        return [json.loads(line) for f in out.glob(f"{prefix}*") for line in f.read_text().splitlines() if line]

    records, failures, tallies = lines("records"), lines("failures"), lines("tallies")
    if spec.is_shards:
        assert sum(t["entries"] for t in tallies) == len(records) + len(failures)
        assert sorted(t["unit"] for t in tallies) == sorted(f.path for f in listed)
    return records, failures, tallies


def test_fifo_links_and_a_directory_named_like_an_image_are_failure_rows(tmp_path, jpeg):
    root = tmp_path / "photos" / "a"
    root.mkdir(parents=True)
    (root / "good.jpg").write_bytes(jpeg)
    os.mkfifo(root / "pipe.jpg")
    (root / "link.jpg").symlink_to("/etc/passwd")
    (root / "dir.jpg").mkdir()
    started = time.monotonic()
    records, failures, _ = read(InputSpec.parse(str(tmp_path / "photos")), tmp_path)
    assert time.monotonic() - started < 60  # a FIFO must never block a worker
    assert [r["image_id"] for r in records] == ["a/good.jpg"]
    reasons = {f["image_id"]: (f["error"], f["message"]) for f in failures}
    assert reasons["a/pipe.jpg"][0] == "NotRegularFileError" and "FIFO" in reasons["a/pipe.jpg"][1]
    assert reasons["a/link.jpg"][0] == "NotRegularFileError" and "symbolic link" in reasons["a/link.jpg"][1]
    assert "a/dir.jpg" not in reasons  # directories are not inputs at all


def test_a_file_over_the_limit_is_refused_without_reading_it(tmp_path):
    big = tmp_path / "huge.jpg"
    with open(big, "wb") as f:
        f.truncate((fsutil.MAX_INPUT_BYTES + 1) * 4)  # 1 GiB, sparse: costs no disk and no read
    started = time.monotonic()
    with pytest.raises(fsutil.RecordTooLargeError, match="more than the limit"):
        fsutil.read_input(str(big))
    assert time.monotonic() - started < 0.5


def _tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def test_a_tar_header_claiming_a_terabyte_ends_its_shard_at_once(tmp_path, jpeg):
    shards = tmp_path / "wds"
    shards.mkdir()
    good = _tar_bytes([("000.jpg", jpeg), ("000.cls", b"4")])
    first = tarfile.TarInfo("000.jpg")
    first.size = len(jpeg)
    header = tarfile.TarInfo("001.jpg")
    header.size = 1 << 40
    padding = b"\0" * (-len(jpeg) % 512)
    liar = first.tobuf(format=tarfile.GNU_FORMAT) + jpeg + padding + header.tobuf(format=tarfile.GNU_FORMAT)
    liar += b"\x01" * 96_000  # a 96 KB file whose second header claims a terabyte
    (shards / "good.tar").write_bytes(good)
    (shards / "liar.tar").write_bytes(liar)
    started = time.monotonic()
    records, failures, tallies = read(InputSpec.parse(f"wds:{shards}"), tmp_path)
    assert time.monotonic() - started < 30  # stream mode took 1 min 49 s on such a header
    assert sorted(r["image_id"] for r in records) == ["good.tar#000", "liar.tar#000"]
    assert len(failures) == 1 and "claims 1099511627776 bytes" in failures[0]["message"]
    assert {t["unit"].rsplit("/", 1)[-1]: t["entries"] for t in tallies} == {"good.tar": 1, "liar.tar": 2}


def test_link_members_and_repeated_names_are_failure_rows(tmp_path, jpeg):
    shards = tmp_path / "wds"
    shards.mkdir()
    sym = tarfile.TarInfo("001.jpg")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("002.jpg")
    hard.type, hard.linkname = tarfile.LNKTYPE, "000.jpg"
    fifo = tarfile.TarInfo("003.jpg")
    fifo.type = tarfile.FIFOTYPE
    members = [("000.jpg", jpeg), sym, hard, fifo, ("004.jpg", jpeg), ("004.jpg", jpeg), ("005.jpg", jpeg)]
    (shards / "s.tar").write_bytes(_tar_bytes(members))
    records, failures, tallies = read(InputSpec.parse(f"wds:{shards}"), tmp_path)
    assert sorted(r["image_id"] for r in records) == ["s.tar#000", "s.tar#005"]
    errors = {f["image_id"]: f["error"] for f in failures}
    assert errors == {"s.tar#001": "LinkMemberError", "s.tar#002": "LinkMemberError",
                      "s.tar#003": "SpecialMemberError", "s.tar#004": "DuplicateMemberError"}
    assert tallies[0]["entries"] == 6  # every sample accounted for: 2 records + 4 failure rows


def test_parquet_uris_are_confined_to_the_shard_folder_and_allowed_prefixes(tmp_path, jpeg):
    shard_dir = tmp_path / "pq"
    (shard_dir / "imgs").mkdir(parents=True)
    (shard_dir / "imgs" / "ok.jpg").write_bytes(jpeg)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "photo.jpg").write_bytes(jpeg)
    os.mkfifo(shard_dir / "imgs" / "pipe.jpg")
    uris = ["imgs/ok.jpg", "../elsewhere/photo.jpg", "/etc/passwd", str(outside / "photo.jpg"), "imgs/pipe.jpg",
            "imgs/../imgs/ok.jpg"]
    pq.write_table(pa.table({"image_id": [f"r{i}" for i in range(len(uris))], "uri": uris}), shard_dir / "p.parquet")
    records, failures, _ = read(InputSpec.parse(f"parquet:{shard_dir}/*.parquet"), tmp_path)
    assert sorted(r["image_id"] for r in records) == ["r0", "r5"]
    errors = {f["image_id"]: f["error"] for f in failures}
    assert errors == {"r1": "UriNotAllowedError", "r2": "UriNotAllowedError", "r3": "UriNotAllowedError",
                      "r4": "NotRegularFileError"}
    records, failures, _ = read(InputSpec.parse(f"parquet:{shard_dir}/*.parquet", (str(outside),)), tmp_path)
    assert sorted(r["image_id"] for r in records) == ["r0", "r3", "r5"]
