"""The ``device`` setting: validated at load, resolved to an indexed torch device at run time (CPU-only tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bnnpan.config import ConfigError, load_params
from bnnpan.devices import DeviceError, resolve_device

REPO = Path(__file__).resolve().parents[1]


def _params_with(tmp_path: Path, device: str) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["device"] = device
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:3"])
def test_supported_device_strings_load(tmp_path, device):
    assert load_params(_params_with(tmp_path, device)).device == device


@pytest.mark.parametrize("device", ["gpu0", "gpu", "cuda:", "cuda:x", "CPU", "cuda:0,1", "mps:0"])
def test_unsupported_device_is_one_line_at_load(tmp_path, device):
    with pytest.raises(ConfigError) as e:
        load_params(_params_with(tmp_path, device))
    text = str(e.value)
    assert text.count("\n") == 0 and "device" in text and repr(device) in text and "params.yaml" in text


def test_cli_rejects_a_bad_device_before_any_work(tmp_path, monkeypatch):
    from bnnpan.cli import app

    p = _params_with(tmp_path, "gpu0")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["train", "--params", str(p), "--no-track"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "device" in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "models").exists()


def test_cpu_resolves_to_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=r"sees no CUDA GPU.*device: cpu"):
            resolve_device(spec)


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, the current one being 1 (as after torch.cuda.set_device(1))."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_cuda_means_the_current_gpu_with_an_index(two_gpus):
    dev = resolve_device("cuda")
    assert dev == torch.device("cuda", 1) and dev.index == 1  # set_device() needs the index


def test_cuda_under_torchrun_is_the_ranks_gpu(two_gpus):
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)  # explicit index wins


def test_cuda_index_past_the_device_count(two_gpus):
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"GPU index 2 does not exist.*2 CUDA device"):
        resolve_device("cuda:2")


def test_training_with_device_cuda_sets_an_indexed_device(two_gpus, monkeypatch, prepared_landsat, tmp_path):
    """The reported crash: `device: cuda` called torch.cuda.set_device(torch.device('cuda')) (no index),
    which torch refuses with "Expected a torch.device with a specified index". The loop must pass cuda:N."""
    from bnnpan.models.networks import NetConfig, build_network
    from bnnpan.train.loop import TrainConfig, train

    seen = []

    class _Reached(Exception):
        pass

    def fake_set_device(dev):
        dev = torch.device(dev)
        if dev.index is None:  # what torch itself does
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        seen.append(dev)
        raise _Reached  # stop here: there is no GPU to train on

    monkeypatch.setattr(torch.cuda, "set_device", fake_set_device)
    net = build_network("fp", NetConfig(in_channels=3, width=4, depth=1, ratio=2))
    with pytest.raises(_Reached):
        train(net, prepared_landsat / "train.h5", None, TrainConfig(iterations=1, batch_size=2), tmp_path / "m.pt",
              device="cuda", progress=False)
    assert seen == [torch.device("cuda", 1)]
