"""Packed 1-bit export (bnnpan.models.packing): export -> load reproduces the outputs of every real network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import bnnpan.eval.cost as cost_mod
import bnnpan.models.packing as packing_mod
from bnnpan.models.networks import NetConfig, build_network
from bnnpan.models.packing import PackedFileError, export_packed, load_packed, pack_state, packed_size_report

METHODS = ("fp", "bnn", "xnor", "bireal", "irnet", "reactnet", "btm", "bbcu", "bisrnet")
D, N = 32, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one intra-op thread (conftest.py)


def _perturb(net: nn.Module, seed: int) -> None:
    """Move every parameter/buffer off its initial value (a trained-like state: non-trivial BN stats, scales...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g) * 0.05
            if name.endswith("running_var"):
                t.mul_(1 + noise.abs())
            else:
                t.add_(noise)


def _inputs(c: int, h: int = 32, w: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((2, c, h, w), generator=g), torch.rand((2, 1, h, w), generator=g)


def _binary_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d) and hasattr(m, "weight_sign_and_scale")]


@pytest.mark.parametrize("c", (3, 4))
@pytest.mark.parametrize("method", METHODS)
def test_export_load_reproduces_outputs(tmp_path: Path, method: str, c: int):
    cfg = NetConfig(in_channels=c, width=D, depth=N)
    torch.manual_seed(0)
    net = build_network(method, cfg)
    _perturb(net, seed=2)
    net.eval()
    lms, pan = _inputs(c)
    with torch.no_grad():
        ref = net(lms, pan)
        ref_w = [m.binary_weight().clone() for m in _binary_layers(net)]
    path = export_packed(net, tmp_path / "m.packed.pt")
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))

    torch.manual_seed(123)  # a differently initialised twin: everything must come from the file
    twin = build_network(method, cfg)
    load_packed(twin, path)
    twin.eval()
    with torch.no_grad():
        out = twin(lms, pan)
        got_w = [m.binary_weight() for m in _binary_layers(twin)]
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (method, (out - ref).abs().max().item())
    assert len(got_w) == len(ref_w) == (0 if method == "fp" else N)
    for a, b in zip(got_w, ref_w, strict=True):
        assert torch.equal(a, b), method  # sign bits and FP32 scales are stored exactly
    for m in _binary_layers(twin):
        assert set(m.weight.unique().tolist()) <= {-1.0, 1.0}  # the latent weight became the sign
    # state-dict keys are untouched (the fixed scale is a non-persistent buffer)
    assert set(twin.state_dict()) == set(net.state_dict())
    # a loaded model can be exported again, bit-identically
    again = pack_state(twin)
    first = pack_state(net)
    assert torch.equal(again["bits"], first["bits"]) and torch.equal(again["scales"], first["scales"])


@pytest.mark.parametrize("method", METHODS)
def test_packed_file_smaller_than_fp32(tmp_path: Path, method: str):
    net = build_network(method, NetConfig(in_channels=4, width=D, depth=N))
    rep = packed_size_report(net, tmp_path)
    assert rep["packed_bytes"] > 0 and rep["fp32_bytes"] > 0
    assert rep["ratio"] == pytest.approx(rep["packed_bytes"] / rep["fp32_bytes"])
    if method == "fp":
        assert rep["binary_weights"] == 0
    else:
        assert rep["binary_weights"] == N * D * D * 9
        assert rep["ratio"] < 0.5, rep  # the binary weights dominate the FP32 file; they shrink 32x


def test_truncated_file_raises_naming_it(tmp_path: Path):
    net = build_network("reactnet", NetConfig(in_channels=3, width=8, depth=2))
    path = export_packed(net, tmp_path / "cut.packed.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    twin = build_network("reactnet", NetConfig(in_channels=3, width=8, depth=2))
    with pytest.raises(PackedFileError, match=re.escape(str(path))):
        load_packed(twin, path)


def test_flipped_bits_fail_the_checksum(tmp_path: Path):
    net = build_network("bbcu", NetConfig(in_channels=3, width=8, depth=2))
    payload = pack_state(net)
    payload["bits"][0] ^= 0xFF  # tamper with the content, keep the container valid
    path = tmp_path / "tampered.pt"
    torch.save(payload, path)
    with pytest.raises(PackedFileError, match="checksum"):
        load_packed(build_network("bbcu", NetConfig(in_channels=3, width=8, depth=2)), path)


def test_mismatched_model_is_rejected(tmp_path: Path):
    path = export_packed(build_network("bnn", NetConfig(in_channels=3, width=8, depth=2)), tmp_path / "a.pt")
    with pytest.raises(PackedFileError, match="a.pt"):
        load_packed(build_network("bnn", NetConfig(in_channels=3, width=8, depth=3)), path)
    with pytest.raises(PackedFileError, match="a.pt"):
        load_packed(build_network("bnn", NetConfig(in_channels=4, width=8, depth=2)), path)


def test_not_a_packed_file(tmp_path: Path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(PackedFileError, match="not a"):
        load_packed(build_network("fp", NetConfig(in_channels=3, width=8, depth=2)), path)


def test_torch_load_always_weights_only():
    for mod in (packing_mod, cost_mod):
        src = Path(mod.__file__).read_text()
        calls = re.findall(r"torch\.load\(([^)]*)\)", src)
        assert all("weights_only=True" in c for c in calls), (mod.__name__, calls)
    assert re.findall(r"torch\.load\(([^)]*)\)", Path(packing_mod.__file__).read_text())
    assert "pickle" not in Path(packing_mod.__file__).read_text()


class _RecomputingBinConv(nn.Conv2d):
    """A stand-in whose scale is recomputed from W at forward time (IR-Net style: standardise, then 2^round(log2))."""

    def __init__(self, c):
        super().__init__(c, c, 3, padding=1, bias=True)
        self.act = nn.Identity()

    def weight_sign_and_scale(self):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True)
        sign = torch.where(w >= 0, 1.0, -1.0)
        scale = torch.pow(2.0, torch.round(torch.log2(w.abs().mean(dim=(1, 2, 3), keepdim=True))))
        return sign, scale

    def binary_weight(self):
        s, a = self.weight_sign_and_scale()
        return a * s

    def forward(self, x):
        x = torch.where(self.act(x) >= 0, 1.0, -1.0)
        return nn.functional.conv2d(x, self.binary_weight(), self.bias, self.stride, self.padding)


def test_recomputed_scale_is_fixed_after_load(tmp_path: Path):
    """After loading, W == sign: recomputing the scale/standardisation from it would be wrong; the override is not."""
    torch.manual_seed(0)
    net = nn.Sequential(_RecomputingBinConv(4), nn.PReLU(4), _RecomputingBinConv(4))
    with torch.no_grad():
        net[0].weight.add_(0.3)  # off-centre filters: sign(W) != sign(standardised W)
    x = torch.randn(1, 4, 8, 8)
    ref = net(x)
    path = export_packed(net, tmp_path / "s.pt")
    torch.manual_seed(1)
    twin = nn.Sequential(_RecomputingBinConv(4), nn.PReLU(4), _RecomputingBinConv(4))
    load_packed(twin, path)
    assert torch.equal(twin(x), ref)
    moved = twin.to(torch.float64)
    assert moved[0].packed_scale.dtype == torch.float64  # the scale follows .to()
