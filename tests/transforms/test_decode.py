"""DecodeFn inside a pipeline: the thread pool changes nothing but speed, failures keep their reason."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from models.backbone.imaging import decode_and_resize
from pipelines.runner import pipeline_options
from transforms.decode import DecodeFn
from transforms.records import FAILURES_TAG, ImageRecord

SIZE = 32


def _records(flowers, n: int = 40) -> list[ImageRecord]:
    paths = sorted((flowers / "3").glob("*.jpg"))[:n]
    out = [ImageRecord(f"3/{p.name}", str(p), "3", p.read_bytes()) for p in paths]
    out.insert(7, ImageRecord("bad/text.jpg", "bad/text.jpg", "bad", b"not an image"))
    out.insert(20, ImageRecord("bad/empty.jpg", "bad/empty.jpg", "bad", b""))
    return out


def _with_bytes(record: ImageRecord) -> ImageRecord:
    """The photo's bytes read in the pipeline: ``beam.Create`` pickles (and bz2s) its elements several times."""
    return record._replace(data=Path(record.uri).read_bytes()) if record.data is None else record


def _summary(element):
    meta, pixels = element
    return meta.image_id, meta.sha256, hashlib.sha256(pixels.tobytes()).hexdigest()


def test_pool_gives_the_same_rows_and_failures_as_one_thread(flowers):
    records = _records(flowers)
    expected = []
    for r in records:
        try:
            px = decode_and_resize(r.data, SIZE).pixels
        except Exception:
            continue
        expected.append((r.image_id, hashlib.sha256(r.data).hexdigest(), hashlib.sha256(px.tobytes()).hexdigest()))
    assert len(expected) == len(records) - 2
    for threads, window in ((1, 0), (3, 4)):
        with BeamTestPipeline(options=pipeline_options([])) as p:
            out = (
                p
                | beam.Create([r._replace(data=None) if r.label == "3" else r for r in records])
                | beam.Map(_with_bytes)
                | beam.ParDo(DecodeFn(SIZE, threads=threads, window=window)).with_outputs(FAILURES_TAG, main="images")
            )
            assert_that(out.images | beam.Map(_summary), equal_to(expected), label="rows")
            assert_that(out[FAILURES_TAG] | beam.Map(lambda f: (f["image_id"], f["stage"], f["error"])),
                        equal_to([("bad/text.jpg", "decode", "UnidentifiedImageError"),
                                  ("bad/empty.jpg", "decode", "ImageDecodeError")]), label="failures")


def _image_id(output) -> str:
    """The image id of a DecodeFn output: a row, a tagged failure, or either wrapped in a WindowedValue."""
    if isinstance(output, beam.pvalue.TaggedOutput):
        output = output.value
    output = getattr(output, "value", output)
    return output["image_id"] if isinstance(output, dict) else output[0].image_id


def test_pool_keeps_input_order_within_a_bundle(flowers):
    fn = DecodeFn(SIZE, threads=3, window=4)
    fn.setup()
    fn.start_bundle()
    records = _records(flowers, 12)
    out = [o for r in records for o in fn.process(r)]
    assert len(out) == len(records) - 4  # the window holds four images back until the bundle ends
    out += list(fn.finish_bundle())
    fn.teardown()
    assert [_image_id(o) for o in out] == [r.image_id for r in records]


def test_multi_threading_with_several_workers_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.runner"):
        pipeline_options(["--direct_running_mode=multi_threading", "--direct_num_workers=2"])
    assert any("silently drops and corrupts elements" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.runner"):
        pipeline_options([])
        pipeline_options(["--direct_running_mode=multi_threading", "--direct_num_workers=1"])
        pipeline_options(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert not caplog.records
