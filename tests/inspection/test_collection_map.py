"""The 2-D map of an index: one thumbnail per sampled item, sampled above the threshold, labels coloured."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inspection.collection_map import OTHER, SAMPLE_THRESHOLD, collection_map, label_colours, pick, project
from pipelines.cli import main
from plumbing import fsutil
from search.searcher import Searcher


@pytest.fixture(scope="module")
def searcher(flowers_index):
    return Searcher(str(flowers_index[0]))


def _read(uri):
    try:
        return fsutil.read_input(uri)
    except Exception:
        return None


def test_sampling_is_seeded_and_only_above_the_threshold():
    assert np.array_equal(pick(500, SAMPLE_THRESHOLD, 0), np.arange(500))
    a, b = pick(5000, 300, 7), pick(5000, 300, 7)
    assert np.array_equal(a, b) and len(np.unique(a)) == 300 and (np.diff(a) > 0).all()
    colours = label_colours(["a", "b", "b", None])
    assert list(colours) == ["b", "a"] and colours["b"] != colours["a"]  # most frequent first, None uncoloured
    with pytest.raises(ValueError, match="at least 3 items"):
        project(np.zeros((2, 4), np.float32), "pca")


def test_a_map_has_one_thumbnail_per_sampled_item(searcher):
    result = collection_map(searcher, "pca", sample=40, seed=3, read_bytes=_read, thumb=32)
    assert len(result.gids) == 40 == len(set(result.gids.tolist())) == len(result.placements)
    assert result.unreadable == 0
    figures = result.figures(searcher.image_ids)
    assert figures["drawn"] == 40 and figures["sampled"] and len(figures["points"]) == 40
    assert sum(result.explained_variance) > 0
    # the last thumbnail drawn is on top: its frame has its label's colour and its centre is the photo
    x0, y0, x1, y1 = result.placements[-1]
    colour = result.colours.get(str(result.labels[-1]), OTHER)
    assert result.image.getpixel((x0, (y0 + y1) // 2)) == colour
    assert result.image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) != colour


def test_cli_map_tsne(flowers_index, tmp_path):
    out = tmp_path / "map.png"
    assert main(["map", "--index", str(flowers_index[0]), "--method", "tsne", "--sample", "30",
                 "--no-thumbnails", "--output", str(out)]) == 0
    figures = json.loads((tmp_path / "map.json").read_text())
    assert figures["method"] == "tsne" and len(figures["points"]) == 30 and figures["items"] == 720
    assert figures["sample_threshold"] == SAMPLE_THRESHOLD
