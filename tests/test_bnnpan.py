"""BNNPan: the Haar transform, BWTC's binary units, CDC / LDPC injection, the latent diffusion prior, the network."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F
from torch import nn

from bnnpan.models.bnnpan import VARIANTS, BNNPanNet, BNNPanSwitches
from bnnpan.models.layers import BinaryConv2d
from bnnpan.models.networks import NetConfig, build_network, uses_prior
from bnnpan.models.pibf import BWTC, CDC, PIBF, LatentAffine, StatBinaryUnit
from bnnpan.models.prior import LatentPrior, make_scheduler
from bnnpan.models.wavelet import BANDS, HaarDWT, HaarIDWT
from bnnpan.train.loop import TrainConfig, model_loss

try:
    from tests.binary_recording import recorded_binary_convs
except ImportError:  # pytest run from inside tests/
    from binary_recording import recorded_binary_convs

SMALL = dict(latent_dim=16, prior_width=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs: one intra-op thread (conftest.py)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def net(variant: str = "bnnpan", bands: int = 3, seed: int = 0, zero_tail: bool = False, **extra) -> nn.Module:
    torch.manual_seed(seed)
    return build_network(variant, NetConfig(in_channels=bands, width=8, depth=2, extra={**SMALL, **extra},
                                            zero_init_tail=zero_tail))


# --------------------------------------------------------------------------------------------------- wavelet
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 32, 64, 64), (3, 5, 6, 10)])
def test_dwt_then_idwt_is_identity(shape) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 100
    c = shape[1]
    y = HaarIDWT(c)(HaarDWT(c)(x))
    assert float((y - x).abs().max() / x.abs().max()) < 1e-6  # relative, float32
    z = torch.randn(*shape) * 0.3
    assert float((HaarIDWT(c)(HaarDWT(c)(z)) - z).abs().max()) < 1e-5


def test_dwt_matches_pywavelets_and_keeps_energy() -> None:
    x = torch.randn(2, 4, 12, 16, dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    d = HaarDWT(4)(x)
    assert d.shape == (2, 16, 6, 8)
    for b in range(2):
        for c in range(4):
            ll, (lh, hl, hh) = pywt.dwt2(x[b, c].double().numpy(), "haar", mode="periodization")
            for k, ref in enumerate((ll, lh, hl, hh)):  # grouped by band: [LL | LH | HL | HH]
                np.testing.assert_allclose(d[b, k * 4 + c].double().numpy(), ref, atol=1e-5, err_msg=BANDS[k])
    torch.testing.assert_close(d.pow(2).sum(), x.pow(2).sum(), rtol=1e-5, atol=0)


def test_dwt_rejects_odd_or_wrong_channels() -> None:
    with pytest.raises(ValueError, match="even"):
        HaarDWT(3)(torch.zeros(1, 3, 7, 8))
    with pytest.raises(ValueError):
        HaarDWT(3)(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError):
        HaarIDWT(3)(torch.zeros(1, 8, 4, 4))


def test_bwtc_handles_odd_sizes() -> None:
    torch.manual_seed(0)
    m = BWTC(4)
    x = torch.randn(2, 4, 9, 11)
    assert m(x).shape == x.shape


# ------------------------------------------------------------------------------------------- binary units
@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_binary_conv_sees_pm1_inputs_and_pm_alpha_weights(variant: str, base: bool, monkeypatch) -> None:
    """Inside every PIBF (BWTC's sub-band units and optional base unit, or the plain unit): the conv input is
    exactly +-1 and the weight is +-alpha with one alpha per output channel, equal to binary_weight(); gradients
    reach every latent weight."""
    model = net(variant, bwtc_base=base)
    model.train()
    convs = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
    per_block = 1 if variant == "bnnpan_no_bwtc" or not base else 2
    assert len(convs) == 2 * per_block
    lms, pan, gt = rand(2, 3, 16, 16), rand(2, 1, 16, 16, seed=1), rand(2, 3, 16, 16, seed=2)

    def run():
        res = model(lms, pan, gt) if model.wants_gt else model(lms, pan)
        out = res[0] if isinstance(res, tuple) else res
        F.l1_loss(out, gt).backward()

    seen = recorded_binary_convs(model, run, monkeypatch)
    assert [m for m, _, _ in seen] == convs
    for m, x, w in seen:
        assert torch.equal(x.abs(), torch.ones_like(x)), "conv input not exactly +-1"
        assert torch.equal(w, m.binary_weight().detach())
        mag = w.abs().reshape(w.shape[0], -1)
        assert torch.equal(mag, mag[:, :1].expand_as(mag)) and bool((mag > 0).all()), "weight not +-alpha"
    for m in convs:
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0


def test_subband_units_are_independent() -> None:
    """groups=4: a change in the LL sub-band moves only the LL unit's output (one unit per sub-band)."""
    torch.manual_seed(0)
    unit = StatBinaryUnit(4 * 3, groups=4)
    s = torch.randn(2, 12, 8, 8)
    s2 = s.clone()
    s2[:, :3] = torch.randn(2, 3, 8, 8)  # LL only
    a, b = unit(s), unit(s2)
    assert not torch.equal(a[:, :3], b[:, :3])
    assert torch.equal(a[:, 3:], b[:, 3:])


def test_fp_statistics_make_the_unit_scale_equivariant_and_shift_invariant() -> None:
    """With FP statistics, unit(a s + c) = a unit(s) (a > 0, c per channel): each sub-band is binarized relative
    to its own mean and std and the output lives on the sub-band's scale. Without them it is not."""
    torch.manual_seed(0)
    s = torch.randn(2, 8, 8, 8)
    shift = torch.randn(1, 8, 1, 1) * 5
    on, off = StatBinaryUnit(8, fp_stats=True), StatBinaryUnit(8, fp_stats=False)
    with torch.no_grad():
        torch.testing.assert_close(on(7.0 * s + shift), 7.0 * on(s), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(on(0.01 * s), 0.01 * on(s), rtol=1e-3, atol=1e-6)
        assert not torch.allclose(off(7.0 * s + shift), 7.0 * off(s), rtol=1e-2, atol=1e-2)


def test_cdc_and_injection_start_as_identity_and_then_depend_on_input() -> None:
    torch.manual_seed(0)
    y, z = torch.randn(2, 8, 6, 6), torch.randn(2, 16)
    cdc, inj = CDC(8), LatentAffine(16, 8)
    assert torch.equal(cdc(y), y) and torch.equal(inj(y, z), y)
    nn.init.normal_(cdc.fc2.weight)
    nn.init.normal_(inj.g.weight)
    nn.init.normal_(inj.b.weight)
    out = cdc(y)
    # per-channel affine: out[b, c] = y[b, c] * s[b, c] + t[b, c] with s, t from GAP(y[b])
    for b in range(2):
        for c in range(8):
            coef = np.polyfit(y[b, c].flatten().detach().numpy(), out[b, c].flatten().detach().numpy(), 1)
            assert 0 < coef[0] < 2
    assert not torch.allclose(inj(y, z)[0], inj(y, z.flip(0))[0])  # depends on z
    pibf = PIBF(8, latent_dim=16)
    with pytest.raises(ValueError, match="z is required"):
        pibf(y)


# ------------------------------------------------------------------------------------------------- prior
def test_scheduler_follows_diffir_schedule() -> None:
    s = make_scheduler("ddim", 4, 0.1, 0.99)
    assert s.timesteps.tolist() == [3, 2, 1, 0]
    betas = torch.linspace(0.1, 0.99, 4, dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        make_scheduler("euler", 4, 0.1, 0.99)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_sampler_is_deterministic_for_a_fixed_seed(kind: str) -> None:
    torch.manual_seed(0)
    prior = LatentPrior(3, latent_dim=16, width=8, scheduler=kind, seed=5, with_e1=False)
    lms, pan = rand(4, 3, 16, 16), rand(4, 1, 16, 16, seed=1)
    torch.manual_seed(123)  # the global RNG state must not matter
    a = prior.sample(lms, pan)
    torch.manual_seed(456)
    b = prior.sample(lms, pan)
    assert torch.equal(a, b)
    other = LatentPrior(3, latent_dim=16, width=8, scheduler=kind, seed=6, with_e1=False)
    other.load_state_dict(prior.state_dict())
    assert not torch.allclose(other.sample(lms, pan), a)
    if kind == "ddim":  # a tile's z does not depend on the rest of its batch
        torch.testing.assert_close(prior.sample(lms[2:3], pan[2:3]), a[2:3], rtol=1e-5, atol=1e-6)


def test_e2_and_denoiser_learn_to_reproduce_e1s_latent() -> None:
    """On a toy batch, E2 + denoiser trained through the diffusion chain bring z_hat to E1's z: the latent loss falls
    by more than 10x, and the test-time sample (pure noise start, fixed seed) lands close to E1's z as well."""
    torch.manual_seed(0)
    prior = LatentPrior(3, latent_dim=16, width=8, steps=4)
    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(8, 3, 16, 16, generator=gen)
    lms = F.interpolate(F.avg_pool2d(gt, 2), scale_factor=2, mode="bilinear")
    pan = gt.mean(1, keepdim=True)
    with torch.no_grad():
        z_gt = prior.encode_gt(gt, lms, pan) * 10  # E1 fixed; a latent of non-trivial magnitude
    opt = torch.optim.Adam(list(prior.e2.parameters()) + list(prior.denoiser.parameters()), lr=2e-3)
    losses = []
    for _ in range(400):
        loss = prior.latent_loss(prior.diffuse(z_gt, lms, pan), z_gt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-20:])
    assert last < first / 10, (first, last)
    with torch.no_grad():
        sampled = F.l1_loss(prior.sample(lms, pan), z_gt).item()
    assert sampled < first / 5, (first, sampled)


# ----------------------------------------------------------------------------------------------- network
def test_variants_are_switch_sets_and_know_whether_they_need_the_prior() -> None:
    assert VARIANTS["bnnpan"] == {}
    for name, sw in VARIANTS.items():
        switches = BNNPanSwitches.from_dict(sw)
        assert uses_prior(name, {}) == (switches.ldpc != "off")
    assert not uses_prior("bbcu", {})
    with pytest.raises(ValueError, match="unknown switch"):
        BNNPanSwitches.from_dict({"bwtcc": False})
    with pytest.raises(ValueError, match="ldpc"):
        BNNPanSwitches(ldpc="sometimes")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_tail_starts_at_exp_and_shapes(variant: str) -> None:
    model = net(variant, zero_tail=True).eval()
    lms, pan, gt = rand(2, 3, 16, 16), rand(2, 1, 16, 16, seed=1), rand(2, 3, 16, 16, seed=2)
    args = (lms, pan, gt) if model.needs_reference else (lms, pan)
    with torch.no_grad():
        assert torch.equal(model(*args), lms)


def test_oracle_needs_the_reference_and_diffusion_does_not() -> None:
    oracle, diff = net("bnnpan_oracle_prior").eval(), net("bnnpan").eval()
    lms, pan = rand(1, 3, 16, 16), rand(1, 1, 16, 16, seed=1)
    assert oracle.needs_reference and oracle.wants_gt and not diff.needs_reference and not diff.wants_gt
    with pytest.raises(ValueError, match="reference"):
        oracle(lms, pan)
    with torch.no_grad():
        a, b = diff(lms, pan), diff(lms, pan)
    assert torch.equal(a, b)  # deterministic sampling at test time
    assert diff.prior.e1 is None  # a frozen diffusion prior does not carry E1


def test_frozen_and_finetuned_prior_and_stage2_trainable_sets() -> None:
    frozen = net("bnnpan")
    assert not any(p.requires_grad for p in frozen.prior.parameters())
    assert all(p.requires_grad for n, p in frozen.named_parameters() if not n.startswith("prior."))
    ft = net("bnnpan", prior_mode="finetune")
    assert ft.wants_gt and ft.prior.e1 is not None
    assert not any(p.requires_grad for p in ft.prior.e1.parameters())
    assert all(p.requires_grad for p in ft.prior.e2.parameters())
    torch.manual_seed(0)
    s2 = BNNPanNet(3, 8, 2, BNNPanSwitches(**SMALL), role="stage2")
    trainable = {n.split(".")[1] for n, p in s2.named_parameters() if p.requires_grad}
    assert trainable == {"e2", "denoiser"}
    with pytest.raises(ValueError, match="role stage1"):
        BNNPanNet(3, 8, 2, BNNPanSwitches(**SMALL), role="stage1")


def test_loss_protocol_of_the_training_loop() -> None:
    """model_loss: finetune adds the weighted latent L1 to the image loss; stage 2 is latent loss only."""
    cfg = TrainConfig(iterations=2)
    lms, pan, gt = rand(2, 3, 16, 16), rand(2, 1, 16, 16, seed=1), rand(2, 3, 16, 16, seed=2)
    torch.manual_seed(0)
    s2 = BNNPanNet(3, 8, 2, BNNPanSwitches(**SMALL), role="stage2").train()
    torch.manual_seed(1)
    loss = model_loss(s2, s2.wants_gt, lms, pan, gt, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        z_gt = s2.prior.encode_gt(gt, lms, pan)
    ref = F.l1_loss(s2.prior.diffuse(z_gt, lms, pan), z_gt)
    torch.testing.assert_close(loss, ref)
    ft = net("bnnpan", prior_mode="finetune", latent_weight=0.5, zero_tail=True).train()
    torch.manual_seed(2)
    out, aux = ft(lms, pan, gt)
    torch.manual_seed(2)
    total = model_loss(ft, True, lms, pan, gt, cfg)
    torch.testing.assert_close(total, F.l1_loss(out, gt) + aux)
    assert aux > 0


def test_load_prior_and_state_dict_roundtrip() -> None:
    torch.manual_seed(0)
    s2 = BNNPanNet(3, 8, 2, BNNPanSwitches(**SMALL), role="stage2")
    model = net("bnnpan", seed=1).eval()
    loaded = model.load_prior(s2.state_dict())
    assert loaded and all(k.startswith("prior.e2.") or k.startswith("prior.denoiser.") for k in loaded)
    for k in loaded:
        assert torch.equal(model.state_dict()[k], s2.state_dict()[k])
    oracle = net("bnnpan_oracle_prior", seed=1)
    assert all(k.startswith("prior.e1.") for k in oracle.load_prior(s2.state_dict()))
    with pytest.raises(ValueError, match="lacks"):
        model.load_prior({k: v for k, v in s2.state_dict().items() if "denoiser" not in k})
    bigger = net("bnnpan", seed=1, latent_dim=32)
    with pytest.raises(ValueError, match="does not fit"):
        bigger.load_prior(s2.state_dict())
    assert net("bnnpan_no_ldpc").load_prior(s2.state_dict()) == []
    lms, pan = rand(1, 3, 16, 16), rand(1, 1, 16, 16, seed=1)
    copy = net("bnnpan", seed=7).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(copy(lms, pan), model(lms, pan))


def test_bnnpan_packed_export_roundtrip(tmp_path) -> None:
    from bnnpan.models.packing import export_packed, load_packed

    model = net("bnnpan").eval()
    lms, pan = rand(1, 3, 16, 16), rand(1, 1, 16, 16, seed=1)
    with torch.no_grad():
        ref = model(lms, pan)
    path = export_packed(model, tmp_path / "bnnpan.packed")
    fresh = net("bnnpan", seed=9).eval()
    load_packed(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(lms, pan), ref, rtol=1e-5, atol=1e-5)


def _set_fused(model: nn.Module, fused: bool) -> None:
    for m in model.modules():
        if isinstance(m, StatBinaryUnit):
            m.fused = fused


def test_fused_training_unit_has_autograds_values_and_gradients() -> None:
    """StatBinaryUnit's fused training form (one autograd Function for the statistics, the bias and the sign) gives
    the output and every gradient of the unfused ops: float64, odd sizes, groups, a non-trivial loss."""
    torch.manual_seed(0)
    unit = StatBinaryUnit(8, groups=2).double()
    with torch.no_grad():
        for p in unit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    s = (torch.randn(3, 8, 13, 11, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    got = []
    for fused in (True, False):
        unit.fused = fused
        unit.zero_grad()
        s.grad = None
        y = unit(s)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).square().sum().backward()
        got.append((y.detach(), s.grad.clone(), [p.grad.clone() for p in unit.parameters()]))
    (y1, gs1, gp1), (y2, gs2, gp2) = got
    assert torch.allclose(y1, y2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gs1, gs2, rtol=1e-10, atol=1e-12 * float(gs2.abs().max()))
    for a, b in zip(gp1, gp2, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * float(b.abs().max()))
    assert float(gs2.abs().max()) > 0 and all(float(b.abs().max()) > 0 for b in gp2)


def test_fused_training_steps_equal_the_unfused_ones() -> None:
    """A few optimizer steps of BNNPan (float64) with the fused units land on the unfused run's weights (the
    speed-up of issue 14 changes results by float rounding only)."""
    from bnnpan.train.loop import optimizer_step

    g = torch.Generator().manual_seed(3)
    lms, pan = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64), torch.rand(2, 1, 32, 32, generator=g,
                                                                                          dtype=torch.float64)
    gt = (lms + 0.05 * torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)).clamp(0, 1)
    cfg = TrainConfig(iterations=3, batch_size=2, lr=1e-3, warmup=0, val_every=0, ckpt_every=0)
    finals = []
    for fused in (True, False):
        torch.manual_seed(0)
        net = build_network("bnnpan", NetConfig(in_channels=3, width=8, depth=2, ratio=2,
                                                zero_init_tail=False)).double().train()
        _set_fused(net, fused)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(3):
            optimizer_step(net, net, opt, bool(net.wants_gt), lms, pan, gt, cfg)
        finals.append({k: v.clone() for k, v in net.state_dict().items()})
    moved = 0
    torch.manual_seed(0)
    start = build_network("bnnpan", NetConfig(in_channels=3, width=8, depth=2, ratio=2, zero_init_tail=False))
    for k, v in finals[0].items():
        assert torch.allclose(v, finals[1][k], rtol=1e-9, atol=1e-12), k
        moved += int(not torch.allclose(v, start.state_dict()[k].double()))
    assert moved > 10  # the steps did train something
