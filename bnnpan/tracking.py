"""MLflow tracking: one parent run per pipeline invocation, one child run per stage.

* Store: ``sqlite:///mlflow.db`` in the working directory (the repo root when run by
  DVC or Snakemake); ``MLFLOW_TRACKING_URI`` overrides it (e.g. a tracking server).
* The experiment is created with an explicit artifact location inside the repo
  (``tracking.artifact_dir``, default ``mlartifacts/``).
* ``bnnpan run`` initialises the database once, serially, then starts the parent run and
  hands its id to every stage through ``BNNPAN_PARENT_RUN_ID``; a stage run on its own
  (``dvc repro``, ``bnnpan prepare``) logs a top-level run instead.
* A new SQLite store is created under a file lock (``mlflow.db.lock``): commands started together on a
  fresh clone would otherwise race in MLflow's schema migrations.
* SQLite allows one writer at a time: parallel jobs can hit "database is locked", so
  every write goes through :func:`retry` (bounded exponential backoff) and nothing is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from bnnpan.config import Params

PARENT_ENV = "BNNPAN_PARENT_RUN_ID"
DEFAULT_URI = "sqlite:///mlflow.db"
T = TypeVar("T")
log = logging.getLogger(__name__)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def _is_lock_error(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}".lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def retry(fn: Callable[[], T], attempts: int = 20, base: float = 0.05) -> T:
    """Call ``fn``; on an SQLite lock error wait (jittered exponential backoff) and retry."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - MLflow wraps the SQLAlchemy error in several types
            if not _is_lock_error(e) or i == attempts - 1:
                raise
            time.sleep(min(2.0, base * 2**i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _mlflow():
    import mlflow  # imported lazily: it is slow to import and most commands don't need it

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def _store_lock() -> contextlib.AbstractContextManager[Any]:
    """An inter-process lock beside an SQLite store (``mlflow.db.lock``); a no-op for other stores.

    The first process to open a new ``mlflow.db`` creates its tables through alembic migrations; a second
    process started at the same moment runs the same migrations and fails (``duplicate column``,
    ``CommandError``), losing its run. Creating the store and the experiment under this lock serialises
    exactly that part; once created, the store needs no lock (writes go through :func:`retry`).
    """
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if not db.parent.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.lock", timeout=600)


def init(params: Params) -> str:
    """Create the store and the experiment (idempotent, safe across processes); return the experiment id."""
    with _store_lock():
        return _init(params)


def _init(params: Params) -> str:
    mlflow = _mlflow()
    name = params.tracking.experiment

    def _get_or_create() -> str:
        exp = mlflow.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        art = Path(params.tracking.artifact_dir).resolve()
        art.mkdir(parents=True, exist_ok=True)
        try:
            return mlflow.create_experiment(name, artifact_location=art.as_uri())
        except Exception:  # noqa: BLE001 - created concurrently by another job
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    return retry(_get_or_create)


def git_commit(cwd: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` in ``cwd`` (default: the working directory), ``"unknown"`` outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True, cwd=cwd).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_pipeline(params: Params, name: str = "pipeline") -> str:
    """Start the parent run of one pipeline invocation; return its id (it stays RUNNING)."""
    mlflow = _mlflow()
    exp_id = init(params)
    client = mlflow.MlflowClient()
    run = retry(lambda: client.create_run(
        exp_id, run_name=name, tags={"git_commit": git_commit(), "bnnpan.kind": "pipeline"}))
    return run.info.run_id


def end_pipeline(run_id: str, ok: bool) -> None:
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    retry(lambda: client.set_terminated(run_id, "FINISHED" if ok else "FAILED"))


@contextlib.contextmanager
def stage_run(params: Params, stage: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A run for one stage, nested under ``$BNNPAN_PARENT_RUN_ID`` when it is set."""
    mlflow = _mlflow()
    exp_id = init(params)
    parent = os.environ.get(PARENT_ENV) or None
    all_tags = {"git_commit": git_commit(), "dvc_stage": stage, "bnnpan.kind": "stage", **(tags or {})}
    run = retry(lambda: mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=all_tags,
                                         parent_run_id=parent, nested=parent is not None))
    ok = False
    try:
        yield run
        ok = True
    finally:
        retry(lambda: mlflow.end_run("FINISHED" if ok else "FAILED"))


def log_params(flat: dict[str, Any]) -> None:
    mlflow = _mlflow()
    items = {k: (v if v is None or isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}
    retry(lambda: mlflow.log_params({k: str(v)[:6000] for k, v in items.items()}))


def log_environment(env: dict[str, Any]) -> None:
    """The run environment (:func:`bnnpan.environment.run_environment`) on the active run: every key as a tag
    ``env.<key>`` (None as ``"None"``), and the intra-op thread count also as the param ``threads``, so runs
    made with different counts (whose float results differ) are told apart in ``mlflow ui``'s columns."""
    mlflow = _mlflow()
    retry(lambda: mlflow.set_tags({f"env.{k}": str(v)[:5000] for k, v in env.items()}))
    if "threads" in env:
        log_params({"threads": env["threads"]})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow = _mlflow()
    retry(lambda: mlflow.log_metrics(metrics, step=step))


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow = _mlflow()
    retry(lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
