"""The looking-inside commands' shared plumbing: PNG + JSON side by side, option types refuse nonsense."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from pipelines.options import float_above, non_negative_int_list
from pipelines.visualise import figures_path, write_outputs


def test_picture_and_figures_are_written_side_by_side(tmp_path):
    out = tmp_path / "sub" / "pic.png"
    path = write_outputs(str(out), Image.new("RGB", (8, 4), "red"), {"n": 1})
    assert path == str(tmp_path / "sub" / "pic.json") and json.loads(open(path).read()) == {"n": 1}
    assert Image.open(out).size == (8, 4)
    assert figures_path("a/b.PNG") == "a/b.json"
    with pytest.raises(ValueError, match="give a .png path"):
        write_outputs(str(tmp_path / "pic.jpg"), Image.new("RGB", (2, 2)), {})
    assert not (tmp_path / "pic.jpg").exists()


def test_option_types_refuse_what_makes_no_sense():
    assert non_negative_int_list("0,1, 2,8") == (0, 1, 2, 8)
    for bad in ("", "1,-2", "1.5", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            non_negative_int_list(bad)
    assert float_above(1.0)("1.4") == 1.4
    with pytest.raises(argparse.ArgumentTypeError, match="above 1"):
        float_above(1.0)("1")
