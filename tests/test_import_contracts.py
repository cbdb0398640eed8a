"""The floors of ARCHITECTURE.md as import contracts (``[tool.importlinter]`` in pyproject.toml).

run_tests.sh runs ``lint-imports`` before pytest, like ruff; this test runs it too, so
``pytest`` alone also fails when a lower floor imports a higher one or a job imports another
job. The other tests check the contracts themselves: against a small package tree made from
them, where a clean tree passes and each deliberate breach fails the contract it should.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``cwd`` with the repository's contracts (no cache left behind)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(PYPROJECT)],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def test_the_product_keeps_its_import_contracts():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def _config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]


def _contract(name_start: str) -> str:
    """The full name of the one contract whose name starts with ``name_start``."""
    names = [c["name"] for c in _config()["contracts"] if c["name"].startswith(name_start)]
    assert len(names) == 1, (name_start, names)
    return names[0]


@pytest.fixture
def clean_tree(tmp_path: Path) -> Path:
    """Every root package, and every module a container's layers name, empty: nothing is imported yet."""
    config = _config()
    for package in config["root_packages"]:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for contract in config["contracts"]:
        for container in contract.get("containers", []):
            for layer in contract["layers"]:
                for tail in re.split(r"[|:]", layer):
                    (tmp_path / container / f"{tail.strip()}.py").write_text("")
    return tmp_path


def test_a_tree_that_imports_nothing_keeps_every_contract(clean_tree: Path):
    result = lint_imports(clean_tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(_config()['contracts'])} kept, 0 broken." in result.stdout, result.stdout


BREACHES = {
    "a lower floor imports a higher one": ({"artefacts/probe.py": "import search\n"}, "floors:"),
    "two packages sharing a floor": ({"evaluation/probe.py": "from inspection import probe\n",
                                      "inspection/probe.py": ""}, "floors:"),
    "plumbing and index_builder are siblings": ({"plumbing/probe.py": "import index_builder\n"}, "floors:"),
    "artefacts importing an index library": ({"artefacts/probe.py": "import faiss\n"}, "artefacts:"),
    "index_builder importing Beam": ({"index_builder/probe.py": "import apache_beam as beam\n"}, "index_builder:"),
    "plumbing importing TensorFlow": ({"plumbing/probe.py": "import tensorflow as tf\n"}, "plumbing:"),
    "models reaching Beam through plumbing": ({"models/backbone.py": "from plumbing import probe\n",
                                               "plumbing/probe.py": "from apache_beam.io import filesystems\n"},
                                              "models: networks"),
    "the backbone importing an autoencoder": ({"models/backbone.py": "from models import autoencoders\n"},
                                              "models: the backbone"),
    "one looking-inside tool importing an autoencoder": ({"models/inside.py": "import models.autoencoders\n"},
                                                         "models: the backbone"),
    "a job importing another job": ({"pipelines/query.py": "from pipelines.extract import register\n"},
                                    "pipelines:"),
    "a job importing the demo": ({"pipelines/extract.py": "from pipelines import demo\n"}, "pipelines:"),
    "a shared helper importing a job": ({"pipelines/runner.py": "import pipelines.index\n"}, "pipelines:"),
    "a new module under pipelines/ not yet placed": ({"pipelines/unplaced.py": ""}, "pipelines:"),
}


@pytest.mark.parametrize("breach", BREACHES, ids=list(BREACHES))
def test_each_breach_breaks_its_contract(clean_tree: Path, breach: str):
    files, contract = BREACHES[breach]
    for path, text in files.items():
        (clean_tree / path).write_text(text)
    result = lint_imports(clean_tree)
    assert result.returncode != 0, result.stdout
    assert f"{_contract(contract)} BROKEN" in result.stdout, result.stdout + result.stderr
    assert f"Contracts: {len(_config()['contracts']) - 1} kept, 1 broken." in result.stdout, result.stdout
