"""The jobs through Beam's portable job API (the path Flink and Dataflow v2 take), in-process."""

from __future__ import annotations

import json

from pipelines import extract, index

PORTABLE = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]


def test_extract_and_index_run_on_the_portable_runner(tmp_path, flowers, mobilenet_spec):
    features = tmp_path / "features"
    m = extract.run(
        extract.ExtractConfig(input=str(flowers / "0" / "image_000*.jpg"), output=str(features), model=mobilenet_spec),
        PORTABLE,
    )
    assert (m.counts.inputs, m.counts.read, m.counts.ok, m.counts.failed) == (9, 9, 9, 0)
    im = index.run(index.IndexConfig(features=str(features), output=str(tmp_path / "index"), dims=4, trees=5),
                   PORTABLE)
    assert im.items == 9
    assert json.loads((tmp_path / "index" / "LATEST").read_text())["version"] == im.version
