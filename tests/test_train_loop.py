"""The training loop on real prepared data: bit-identical kill-and-resume, loss going down, DDP == single process."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnnpan.data.datasets import PanDataset
from bnnpan.train import loop
from bnnpan.train.loop import CheckpointError, TrainConfig, load_checkpoint, ssim, train, validate

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")
_spec = importlib.util.spec_from_file_location("bnnpan_test_ddp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
make_model = worker.make_model

try:
    from bnnpan.models.networks import build_network  # noqa: F401

    HAVE_NETWORKS = True
except Exception:  # noqa: BLE001 - written concurrently; tests fall back to the tiny FP net
    HAVE_NETWORKS = False
FP = "fp" if HAVE_NETWORKS else "tiny"

CFG = TrainConfig(iterations=12, batch_size=4, lr=1e-3, lr_schedule="cosine", val_every=4, ckpt_every=4,
                  log_every=1, augment=True, seed=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these kernels are tiny, and on a shared 2-core box two spinning OpenMP threads
    were measured ~7x slower (75 s vs 11 s for this file). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(prepared_landsat) -> Path:
    return prepared_landsat


def _run(data: Path, out: Path, cfg: TrainConfig = CFG, model: str = FP, **kw):
    net, meta = make_model(model, cfg.seed)
    kw.setdefault("progress", False)
    kw.setdefault("params_digest", "abc")
    res = train(net, data / "train.h5", data / "valid.h5", cfg, out, net_meta=meta, **kw)
    return net, res


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Stop(Exception):
    pass


def _stop_at(step_to_stop: int, seen: list):
    def log_fn(metrics, step):
        seen.append((step, dict(metrics)))
        if step == step_to_stop and "train/loss" in metrics:
            raise _Stop

    return log_fn


@pytest.fixture(scope="module")
def run_a(data, tmp_path_factory):
    """The uninterrupted reference run: 12 steps, checkpoints every 4."""
    out = tmp_path_factory.mktemp("a") / "model.pt"
    seen: list = []
    net, res = _run(data, out, log_fn=lambda m, s: seen.append((s, dict(m))))
    return out, net.state_dict(), res, seen


def test_reference_run_files_and_logging(run_a):
    out, state, res, seen = run_a
    assert res["step"] == 12 and math.isfinite(res["val_psnr"]) and res["patches_per_s"] > 0
    ckpt = load_checkpoint(out.with_suffix(".ckpt"))
    assert {"model", "optimizer", "scheduler", "step", "rng", "params_digest", "net", "scale"} <= set(ckpt)
    assert ckpt["step"] == 12 and ckpt["params_digest"] == "abc" and ckpt["scale"] == 65535.0
    assert ckpt["net"]["name"] == FP and ckpt["net"]["in_channels"] == 3
    assert {"torch", "python", "numpy", "sampler"} <= set(ckpt["rng"])
    final = torch.load(out, map_location="cpu", weights_only=True)
    _assert_same_state(final["model"], state)
    assert final["net"] == ckpt["net"] and final["scale"] == 65535.0 and final["step"] == 12
    assert final["metrics"]["val_psnr"] == pytest.approx(res["val_psnr"])
    rows = (out.parent / "model_curve.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,val_l1,val_psnr" and len(rows) == 13
    vals = [r.split(",") for r in rows[1:]]
    assert [int(v[0]) for v in vals] == list(range(1, 13))
    assert [i + 1 for i, v in enumerate(vals) if v[3]] == [4, 8, 12]  # validation every 4 steps
    assert float(vals[0][2]) == pytest.approx(1e-3)  # cosine schedule starts at lr
    assert float(vals[-1][2]) == pytest.approx(1e-3 * (1 + math.cos(math.pi * 11 / 12)) / 2)
    train_logs = [s for s, m in seen if "train/loss" in m]
    assert train_logs == list(range(1, 13))
    assert [s for s, m in seen if "val/psnr" in m] == [4, 8, 12]
    assert res["val_psnr"] == pytest.approx(float(vals[-1][4]))


def test_kill_and_resume_is_bit_identical(run_a, data, tmp_path):
    out_a, state_a, res_a, seen_a = run_a
    out = tmp_path / "model.pt"
    seen: list = []
    with pytest.raises(_Stop):
        _run(data, out, log_fn=_stop_at(6, seen))
    assert load_checkpoint(out.with_suffix(".ckpt"))["step"] == 4
    assert len((tmp_path / "model_curve.csv").read_text().splitlines()) == 1 + 4
    assert not out.exists()
    seen2: list = []
    net, res = _run(data, out, log_fn=lambda m, s: seen2.append((s, dict(m))))  # resume=True by default
    assert seen2[0][0] == 5  # continued after the checkpoint at step 4
    _assert_same_state(net.state_dict(), state_a)
    _assert_same_state(torch.load(out, weights_only=True)["model"], state_a)
    assert (tmp_path / "model_curve.csv").read_text() == (out_a.parent / "model_curve.csv").read_text()
    assert res["val_l1"] == res_a["val_l1"] and res["val_psnr"] == res_a["val_psnr"]
    # the optimizer state matches too (bit for bit), so further training would not diverge either
    oa = load_checkpoint(out_a.with_suffix(".ckpt"))["optimizer"]["state"]
    ob = load_checkpoint(out.with_suffix(".ckpt"))["optimizer"]["state"]
    for k in oa:
        for n in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[k][n], ob[k][n])
    # a finished run resumes to a no-op
    net2, res2 = _run(data, out)
    assert res2["step"] == 12 and res2["patches_per_s"] == 0.0
    _assert_same_state(net2.state_dict(), state_a)


def test_streamed_training_and_resume_equal_the_in_memory_run(run_a, data, tmp_path, monkeypatch):
    """Files above the in-memory limit are streamed (batched h5py reads): the same samples in the same order,
    so a streamed run killed at step 6 and resumed ends on run A's weights (in memory, uninterrupted)."""
    from bnnpan.data import datasets

    _, state_a, res_a, _ = run_a
    monkeypatch.setattr(datasets, "IN_MEMORY_BYTES", 0)
    assert not PanDataset(data / "train.h5").in_memory
    out = tmp_path / "model.pt"
    with pytest.raises(_Stop):
        _run(data, out, log_fn=_stop_at(6, []))
    net, res = _run(data, out)
    assert res["step"] == 12
    _assert_same_state(net.state_dict(), state_a)
    assert res["val_psnr"] == res_a["val_psnr"]


def test_sigterm_and_resume_is_bit_identical(run_a, data, tmp_path):
    """A real SIGTERM kills a training subprocess between checkpoints; the resumed run matches run A."""
    _, state_a, _, _ = run_a
    out, marker = tmp_path / "model.pt", tmp_path / "marker"
    cfg = json.dumps(CFG.to_dict())
    cmd = [sys.executable, str(WORKER), "--train", str(data / "train.h5"), "--valid", str(data / "valid.h5"),
           "--out", str(out), "--model", FP, "--config", cfg, "--digest", "abc"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--pause-at", "7", "--marker", str(marker)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "worker did not reach step 7"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert load_checkpoint(out.with_suffix(".ckpt"))["step"] == 4 and not out.exists()
    # resume in this process (another process than the one killed)
    net, res = _run(data, out)
    assert res["step"] == 12
    _assert_same_state(net.state_dict(), state_a)


def test_other_params_digest_starts_over(run_a, data, tmp_path, caplog, recwarn):
    _, state_a, _, _ = run_a
    out = tmp_path / "model.pt"
    with pytest.raises(_Stop):
        _run(data, out, params_digest="old", log_fn=_stop_at(6, []))
    seen: list = []
    with caplog.at_level(logging.INFO, logger="bnnpan"):
        net, _ = _run(data, out, params_digest="abc", log_fn=lambda m, s: seen.append(s))
    said = [r.getMessage() for r in caplog.records if r.name.startswith("bnnpan")]
    # said exactly once (it used to come twice: a UserWarning and a log record), and no "resuming"
    assert len([m for m in said if "discarding it" in m]) == 1, said
    assert "model.ckpt" in said[0] and "starts over from step 0" in said[0]
    assert not any("resuming" in m for m in said)
    assert seen[0] == 1  # not resumed from the other run's step 4
    _assert_same_state(net.state_dict(), state_a)
    assert load_checkpoint(out.with_suffix(".ckpt"))["params_digest"] == "abc"


def test_resume_says_where_it_resumes_from(run_a, data, tmp_path, caplog):
    out = tmp_path / "model.pt"
    with pytest.raises(_Stop):
        _run(data, out, log_fn=_stop_at(6, []))
    with caplog.at_level(logging.INFO, logger="bnnpan"):
        _run(data, out)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("bnnpan")]
    assert said == [f"resuming model from step 4 of 12 ({out.with_suffix('.ckpt')})"]


def test_resume_false_ignores_the_checkpoint(run_a, data, tmp_path):
    out = tmp_path / "model.pt"
    cfg = replace(CFG, iterations=4)
    _run(data, out, cfg=cfg)
    seen: list = []
    _run(data, out, cfg=cfg, resume=False, log_fn=lambda m, s: seen.append(s))
    assert seen[0] == 1


def test_corrupt_checkpoint_is_a_clear_error(data, tmp_path):
    out = tmp_path / "model.pt"
    cfg = replace(CFG, iterations=4)
    _run(data, out, cfg=cfg)
    ck = out.with_suffix(".ckpt")
    blob = ck.read_bytes()
    ck.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*not a valid bnnpan checkpoint") as e1:
        _run(data, out, cfg=cfg)
    ck.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.ckpt") as e2:
        _run(data, out, cfg=cfg)
    for e in (e1, e2):
        text = str(e.value)
        # one line, a way out, and never torch's advice to unpickle an untrusted file
        assert "\n" not in text and "weights_only" not in text and "delete it and re-run" in text, text
    torch.save({"hello": 1}, ck)
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*not a bnnpan checkpoint"):
        _run(data, out, cfg=cfg)


def test_recreate_hint_names_the_stage_command(tmp_path):
    assert "bnnpan train --dataset landsat8 --method bbcu" in loop.recreate_hint("models/landsat8/bbcu.pt")
    assert "bnnpan pretrain-prior --dataset wv3" in loop.recreate_hint("models/wv3/prior.pt")
    assert "starts over" in loop.recreate_hint("models/wv3/bbcu.ckpt")
    bad = tmp_path / "landsat8" / "fp.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert str(e.value).count("\n") == 0 and "weights_only" not in str(e.value)
    assert "`bnnpan train --dataset landsat8 --method fp`" in str(e.value)


def test_every_torch_load_uses_weights_only(data, tmp_path, monkeypatch):
    out = tmp_path / "model.pt"
    cfg = replace(CFG, iterations=4, ckpt_every=2)
    with pytest.raises(_Stop):
        _run(data, out, cfg=cfg, log_fn=_stop_at(3, []))
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw.get("weights_only"))
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    _run(data, out, cfg=cfg)
    assert calls == [True]
    calls_in_source = re.findall(r"torch\.load\(([^)]*)\)", Path(loop.__file__).read_text())
    assert calls_in_source and all("weights_only=True" in c for c in calls_in_source)


def test_loss_decreases_on_real_data(data, tmp_path):
    """60 steps of the FP network, lr 1e-3: the training loss falls from its early level and the validation L1
    ends below where it started (with a zero-initialised tail the network starts exactly at EXP)."""
    cfg = TrainConfig(iterations=60, batch_size=8, lr=1e-3, lr_schedule="constant", val_every=0, ckpt_every=0,
                      log_every=10, augment=False, seed=0)
    net, meta = make_model(FP, 0)
    valid = torch.utils.data.DataLoader(PanDataset(data / "valid.h5"), batch_size=16)
    before = validate(net, valid, torch.device("cpu"))
    res = train(net, data / "train.h5", data / "valid.h5", cfg, tmp_path / "m.pt", progress=True, net_meta=meta,
                resume=False)
    loss = np.array([float(r.split(",")[1]) for r in (tmp_path / "m_curve.csv").read_text().splitlines()[1:]])
    first, last = loss[:10].mean(), loss[-10:].mean()
    print(f"train L1 first10={first:.5f} last10={last:.5f}; val L1 {before['val/l1']:.6f} -> {res['val_l1']:.6f}, "
          f"PSNR {before['val/psnr']:.3f} -> {res['val_psnr']:.3f} dB")
    assert last < 0.5 * first
    assert res["val_l1"] < 0.99 * before["val/l1"] and res["val_psnr"] > before["val/psnr"]


def test_workers_do_not_change_the_sample_sequence(data, tmp_path):
    cfg = replace(CFG, iterations=5, val_every=0, ckpt_every=0)
    a, _ = _run(data, tmp_path / "a.pt", cfg=cfg)
    b, _ = _run(data, tmp_path / "b.pt", cfg=replace(cfg, num_workers=2))
    _assert_same_state(a.state_dict(), b.state_dict())


class _Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def set_progress(self, p: float) -> None:
        self.seen.append(p)


def test_set_progress_reaches_every_submodule_and_schedules(data, tmp_path):
    net, meta = make_model("tiny", 0)
    net.probe_a, net.body[0].probe_b = _Probe(), _Probe()
    cfg = TrainConfig(iterations=6, batch_size=4, lr=1e-3, lr_schedule="step", lr_step=2, lr_gamma=0.5,
                      val_every=0, ckpt_every=0, loss="l1_ssim", grad_clip=0.5, weight_decay=1e-4)
    train(net, data / "train.h5", None, cfg, tmp_path / "m.pt", progress=False, net_meta=meta)
    assert net.probe_a.seen == net.body[0].probe_b.seen == [i / 6 for i in range(6)]
    lrs = [float(r.split(",")[2]) for r in (tmp_path / "m_curve.csv").read_text().splitlines()[1:]]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])


def test_ssim_matches_the_reference_algorithm(data):
    """Against an independent float64 re-implementation of skimage's Gaussian SSIM (sigma 1.5, truncate 3.5)."""
    from scipy.ndimage import gaussian_filter

    ds = PanDataset(data / "valid.h5")
    x = torch.stack([ds[i]["gt"] for i in range(3)])
    y = torch.stack([ds[i]["lms"] for i in range(3)])

    def ref(a, b):
        vals = []
        for ai, bi in zip(a.reshape(-1, *a.shape[-2:]).double().numpy(), b.reshape(-1, *b.shape[-2:]).double().numpy(),
                          strict=True):
            f = lambda z: gaussian_filter(z, 1.5, truncate=3.5)  # noqa: E731
            mx, my = f(ai), f(bi)
            sxx, syy, sxy = f(ai * ai) - mx**2, f(bi * bi) - my**2, f(ai * bi) - mx * my
            c1, c2 = 0.01**2, 0.03**2
            s = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
            vals.append(s[5:-5, 5:-5])
        return float(np.mean(vals))

    got = float(ssim(x.double(), y.double()))
    assert got == pytest.approx(ref(x, y), abs=1e-9)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert 0 < got < 1
    xr = x.clone().requires_grad_(True)
    (1 - ssim(xr, y)).backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0


def test_train_config_validation():
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"iterations": 3, "epochs": 2})
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=0)
    assert TrainConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="divisible"):
        loop.InfiniteBatchSampler(10, 6, 0, world_size=4)


@pytest.mark.parametrize("name", ["irnet", "bireal"])
def test_binary_network_trains_and_resumes_bit_identically(data, tmp_path, name):
    if not HAVE_NETWORKS:
        pytest.skip("bnnpan.models.networks is not available yet")
    cfg = replace(CFG, iterations=8)
    a, _ = _run(data, tmp_path / "a.pt", cfg=cfg, model=name)
    with pytest.raises(_Stop):
        _run(data, tmp_path / "b.pt", cfg=cfg, model=name, log_fn=_stop_at(6, []))
    b, res = _run(data, tmp_path / "b.pt", cfg=cfg, model=name)
    assert res["step"] == 8 and math.isfinite(res["val_psnr"])
    _assert_same_state(a.state_dict(), b.state_dict())
    if name == "irnet":
        progress = {float(m.progress) for m in b.modules() if hasattr(m, "set_progress") and hasattr(m, "progress")}
        assert progress == {7 / 8}  # IR-Net's EDE was driven by the loop (last step: 7/8)
    # the final checkpoint rebuilds through the registry (what evaluation does)
    from bnnpan.models.checkpoint import load_network

    rebuilt, ckpt = load_network(tmp_path / "b.pt")
    _assert_same_state(rebuilt.state_dict(), b.state_dict())
    assert ckpt["net"]["name"] == name and ckpt["scale"] == 65535.0


@pytest.mark.integration
def test_ddp_two_ranks_equals_single_process(data, tmp_path):
    """torchrun, 2 CPU ranks (gloo), global batch 8 = 2 x 4, vs one process with batch 8.

    Tolerance 1e-5 (absolute, on parameters of magnitude ~0.1 after 4 Adam steps at lr 1e-3): the
    ranks see the same global sample sequence and DDP averages their gradients, so the update equals
    the single-process one up to float32 summation order (per-rank partial sums + allreduce vs one
    reduction); any sampling or sharding error would show up at ~lr = 1e-3.
    """
    cfg = TrainConfig(iterations=4, batch_size=8, lr=1e-3, val_every=0, ckpt_every=2, log_every=3,
                      augment=True, seed=1)
    single, _ = _run(data, tmp_path / "single.pt", cfg=cfg)
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER),
           "--train", str(data / "train.h5"), "--valid", str(data / "valid.h5"), "--out", str(out),
           "--model", FP, "--config", json.dumps(cfg.to_dict()), "--digest", "abc", "--progress"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ddp = torch.load(out, map_location="cpu", weights_only=True)["model"]
    ref = single.state_dict()
    diff = max(float((ddp[k] - ref[k]).abs().max()) for k in ref)
    moved = max(float((ref[k] - make_model(FP, 1)[0].state_dict()[k]).abs().max()) for k in ref)
    print(f"DDP vs single process: max |dw| = {diff:.3g} (weights moved up to {moved:.3g}); "
          f"torchrun took {time.monotonic() - t0:.1f} s")
    assert diff < 1e-5
    assert moved > 5e-4  # the comparison is not vacuous (Adam's first step alone moves weights by ~lr)
    assert (tmp_path / "ddp_curve.csv").read_text().count("\n") == 5
    assert load_checkpoint(out.with_suffix(".ckpt"))["step"] == 4


def test_warmup_schedule_resumes_bit_identically(data, tmp_path):
    """Linear warm-up then cosine: the LR ramps up, and an interrupted run resumes exactly."""
    cfg = replace(CFG, warmup=3)
    lrs: list = []
    net_a, _ = _run(data, tmp_path / "a" / "model.pt", cfg=cfg,
                    log_fn=lambda m, s: lrs.append((s, m["lr"])) if "lr" in m else None)
    ramp = [lr for s, lr in sorted(lrs) if s <= 4]
    assert ramp == sorted(ramp) and ramp[0] < cfg.lr / 2  # warm-up ramps from lr / (warmup + 1)
    out = tmp_path / "b" / "model.pt"
    with pytest.raises(_Stop):
        _run(data, out, cfg=cfg, log_fn=_stop_at(6, []))
    net_b, _ = _run(data, out, cfg=cfg)
    _assert_same_state(net_b.state_dict(), net_a.state_dict())
