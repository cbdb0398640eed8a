"""Shared fixtures: real photos from ../shared/data and the offline weights folder.

Expensive artefacts (a full extract of flowers17-dev and its index) are built
once per session and shared by the tests that only read them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from index_builder.types import annoy as annoy_type

REPO = Path(__file__).resolve().parent.parent


def _shared(sub: str, env: str) -> Path:
    path = Path(os.environ.get(env) or REPO.parent / "shared" / sub)
    if not path.is_dir():
        pytest.exit(f"{path} is missing: set {env} to the shared {sub} folder", returncode=4)
    return path


@pytest.fixture(scope="session", autouse=True)
def _litert_cache(tmp_path_factory) -> Path:
    """A fresh LiteRT conversion cache per session: tests see conversions, not a previous run's files."""
    path = tmp_path_factory.mktemp("litert_cache")
    os.environ["CBIR_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _shared("data", "CBIR_DATA_DIR")


@pytest.fixture(scope="session")
def weights_dir() -> str:
    path = _shared("models/keras", "CBIR_WEIGHTS_DIR")
    os.environ["CBIR_WEIGHTS_DIR"] = str(path)
    os.environ.setdefault("CBIR_OFFLINE", "1")
    return str(path)


@pytest.fixture(scope="session")
def flowers(data_dir) -> Path:
    return data_dir / "flowers17-dev"


@pytest.fixture(scope="session")
def imagenette(data_dir) -> Path:
    return data_dir / "imagenette-dev"


@pytest.fixture(scope="session")
def mobilenet_spec(weights_dir):
    from models.backbone.network import ModelSpec

    return ModelSpec("mobilenet_v1_025", weights_dir=weights_dir)


@pytest.fixture(scope="session")
def flowers_features(tmp_path_factory, flowers, mobilenet_spec):
    """cbir extract over all of flowers17-dev with MobileNet v1 0.25 (720 photos)."""
    from pipelines import extract

    out = tmp_path_factory.mktemp("flowers_features")
    manifest = extract.run(extract.ExtractConfig(input=str(flowers), output=str(out), model=mobilenet_spec))
    return out, manifest


@pytest.fixture(scope="session")
def flowers_index(tmp_path_factory, flowers_features):
    """A 2-shard index of the flowers features (PCA to 128 dims)."""
    from pipelines import index

    out = tmp_path_factory.mktemp("flowers_index")
    manifest = index.run(index.IndexConfig(features=str(flowers_features[0]), output=str(out), shards=2,
                                           dims=128, type_params={"annoy": annoy_type.Params(trees=20)}))
    return out, manifest


# Fixtures that run a whole Beam job (directly or through another fixture).
JOB_FIXTURES = {"flowers_features", "flowers_index"}


def pytest_collection_modifyitems(config, items):
    """Whole-job tests are ``slow``: everything under tests/pipelines/, and every test whose fixtures
    run a job. ``./run_tests.sh -m "not slow"`` is the fast loop."""
    slow = pytest.mark.slow
    for item in items:
        under_pipelines = "pipelines" in Path(str(item.fspath)).parts[-2:-1]
        if under_pipelines or JOB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(slow)
