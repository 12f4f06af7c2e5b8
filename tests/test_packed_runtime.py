"""The packed 1-bit runtime: the XNOR-popcount kernel gives exactly the float simulation's integer conv sums (zero
padding included), every binary network gives the float model's output to rounding, and the float fallback.

The first test builds the C++ extension (JIT, cached per user): about a minute on a busy 2-core machine.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnpan.models import packed_runtime as P
from bnnpan.models.binarizers import ACTIVATION_BINARIZERS, WEIGHT_BINARIZERS, sign
from bnnpan.models.bnnpan import VARIANTS
from bnnpan.models.layers import BinaryConv2d, RPReLU
from bnnpan.models.networks import NETWORKS, NetConfig, build_network
from bnnpan.models.packing import pack_model, unpack_into

BINARY_NETWORKS = [n for n in NETWORKS if n != "fp"]


@pytest.fixture(scope="module", autouse=True)
def ext(request: pytest.FixtureRequest) -> None:
    """The extension must build here (CI compiles it): a failure is an error, not a skip."""
    mp = pytest.MonkeyPatch()
    mp.delenv(P.ENV_DISABLE, raising=False)
    request.addfinalizer(mp.undo)
    assert P.available(), f"packed extension did not build: {P._failed}"


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial thresholds, scales, RPReLU and BN statistics (defaults are 0 / 1 and would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.startswith("prior."):  # BNNPan's latent prior is FP and identical in both runtimes
                continue
            if leaf in ("a", "b", "gamma", "zeta") or name.endswith("prelu.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif leaf == "k" and p.dim() == 4:  # BiSR redistribution scale: either sign
                p.copy_(torch.randn(p.shape, generator=g))
            elif leaf in ("weight", "bias") and p.dim() <= 2:  # BN affine, linear layers (CDC, LDPC: zero-init)
                p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if leaf == "weight" and p.dim() == 1 else 0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def conv_input(c: int, h: int, w: int, conv: BinaryConv2d, seed: int = 0) -> torch.Tensor:
    """Random input with exact zeros and, per channel, values placed exactly on the binarizer's threshold."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, h, w, generator=g)
    x[:, :, 0, :5] = 0.0
    x[0, :, 3, 3] = -0.0
    mul, add = P.activation_affine(conv.act, c)
    if add is not None and mul is None:  # u = x + add == 0 exactly: sign(0) = +1 must be reproduced
        x[:, :, 1, 1:4] = -add[None, :, None]
    return x


def float_forward(conv: nn.Module, *args) -> torch.Tensor:
    keep = [(m, m.packed_runtime) for m in conv.modules() if getattr(m, "packed_runtime", None) is not None]
    for m, _ in keep:
        m.packed_runtime = None
    try:
        return conv(*args)
    finally:
        for m, rt in keep:
            m.packed_runtime = rt


@pytest.mark.parametrize("act", list(ACTIVATION_BINARIZERS))
@pytest.mark.parametrize("cin,cout,groups,h,w,k,weight", [
    (32, 32, 1, 37, 53, 3, "mean_abs"),  # fewer channels than a word, odd sizes
    (96, 96, 1, 9, 7, 3, "sign"),  # one and a half words
    (128, 128, 4, 13, 11, 3, "mean_abs"),  # BNNPan's grouped sub-band unit: 4 x 32
    (96, 40, 1, 6, 5, 1, "irnet_libra"),  # 1x1, output channels not a multiple of 8
    (128, 24, 2, 5, 9, 3, "btm_standardize"),  # exactly one word per group
])
def test_layer_exact(act: str, cin: int, cout: int, groups: int, h: int, w: int, k: int, weight: str) -> None:
    """Before alpha: the kernel's dot products == F.conv2d(binarizer(x), sign(W)) exactly (integers, borders
    included); after alpha: the float layer's output to float rounding."""
    torch.manual_seed(1)
    conv = randomize(BinaryConv2d(cin, cout, k, groups=groups, act=act, weight=weight)).eval()
    x = conv_input(cin, h, w, conv)
    P.to_packed_runtime(conv)
    with torch.no_grad():
        s, scale = conv.weight_sign_and_scale()
        a = conv.act(x)
        assert bool(((a == 1) | (a == -1)).all())  # the binarizers never output 0
        ref = F.conv2d(a, s, padding=conv.padding, groups=groups)
        raw = P.run_packed(conv, x, scaled=False)
        assert torch.equal(raw, ref)
        out, expect = conv(x), float_forward(conv, x)
        assert P.can_run(conv, x)
    assert not P.can_run(conv, x)  # autograd on and a weight that wants a gradient: the float path
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6 * float(expect.abs().max()))
    if scale is not None:
        torch.testing.assert_close(out, ref * scale.reshape(1, -1, 1, 1), rtol=1e-6, atol=0)


def test_zero_padding_is_not_plus_one() -> None:
    """All activations -1, all weights +1: a pixel sees -C per VALID tap only (corner 4 taps, edge 6, inside 9);
    a kernel that treated the zero padding as +1 (or -1) would give -9C (or 3C / ...) everywhere."""
    c = 70
    conv = BinaryConv2d(c, 3, act="sign_ste", weight="sign").eval()
    with torch.no_grad():
        conv.weight.fill_(0.5)
    P.to_packed_runtime(conv)
    with torch.no_grad():
        out = conv(-torch.ones(1, c, 5, 6))
    taps = torch.full((5, 6), 9.0)
    taps[0, :] = taps[-1, :] = 6
    taps[:, 0] = taps[:, -1] = 6
    taps[0, 0] = taps[0, -1] = taps[-1, 0] = taps[-1, -1] = 4
    assert torch.equal(out[0], (-c * taps).expand(3, 5, 6))


def test_nan_and_negative_zero_follow_the_float_sign() -> None:
    """sign(-0.0) = +1 and sign(NaN) = -1 in bnnpan's ``sign`` (``x >= 0``); the packed bits agree."""
    conv = BinaryConv2d(8, 8, act="sign_ste", weight="sign").eval()
    x = torch.tensor([-0.0, float("nan"), 0.0, -1e-45, 1e-45, -3.0, 2.0, float("-inf")]).reshape(1, 8, 1, 1)
    P.to_packed_runtime(conv)
    with torch.no_grad():
        s, _ = conv.weight_sign_and_scale()
        raw = P.run_packed(conv, x.expand(1, 8, 3, 3).contiguous(), scaled=False)
        ref = F.conv2d(sign(x.expand(1, 8, 3, 3)), s, padding=1)
    assert torch.equal(raw, ref)


@pytest.mark.parametrize("name", BINARY_NETWORKS)
def test_network_matches_float(name: str) -> None:
    """Every binary method: the packed model's output == the float model's to 1e-5 of the output scale, at an odd
    size; every binary conv took the packed path (none left on the float path)."""
    torch.manual_seed(0)
    model = randomize(build_network(name, NetConfig(in_channels=4, width=32, depth=2, zero_init_tail=False))).eval()
    g = torch.Generator().manual_seed(3)
    lms, pan = torch.rand(1, 4, 37, 53, generator=g), torch.rand(1, 1, 37, 53, generator=g)
    args = (lms, pan, torch.rand(1, 4, 37, 53, generator=g)) if getattr(model, "needs_reference", False) else (lms, pan)
    summary = P.to_packed_runtime(model)
    n_binary = sum(isinstance(m, BinaryConv2d) for m in model.modules())
    assert summary == {"packed": n_binary, "float": 0, "available": True, "reason": None} and n_binary > 0
    calls = []
    orig = P.run_packed

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "run_packed", counting)
        out = model(*args)
        assert len(calls) == n_binary
        expect = float_forward(model, *args)
    assert not torch.equal(out, lms)  # the body contributes (non-zero tail)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-5 * max(1.0, float(expect.abs().max())))


def test_fused_bbcu_block_matches_float_in_isolation() -> None:
    """BBCU's fused epilogue (sign(k x + b), alpha, RPReLU, / k, + x in the kernel) at width 96, odd size."""
    from bnnpan.models.layers import BBCUBlock

    blk = randomize(BBCUBlock(96)).eval()
    x = torch.randn(1, 96, 19, 23) / blk.k
    P.to_packed_runtime(blk)
    with torch.no_grad():
        out, expect = blk(x), float_forward(blk, x)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6 * float(expect.abs().max()))


def test_loaded_packed_file_and_weight_updates() -> None:
    """A model loaded from the packed format (scales stored, weights = signs) runs packed and equals its float
    path; an in-place weight update is picked up (repacked), and training mode keeps the float path + gradients."""
    torch.manual_seed(0)
    src = randomize(build_network("irnet", NetConfig(in_channels=4, width=32, depth=2, zero_init_tail=False)))
    dst = build_network("irnet", NetConfig(in_channels=4, width=32, depth=2, zero_init_tail=False))
    unpack_into(dst, pack_model(src), "mem").eval()
    P.to_packed_runtime(dst)
    lms, pan = torch.rand(1, 4, 21, 19), torch.rand(1, 1, 21, 19)
    with torch.no_grad():
        out = dst(lms, pan)
        torch.testing.assert_close(out, src.eval()(lms, pan), rtol=0, atol=1e-5)
        conv = next(m for m in dst.modules() if isinstance(m, BinaryConv2d))
        conv.weight.mul_(-1)  # every sign flips
        torch.testing.assert_close(dst(lms, pan), float_forward(dst, lms, pan), rtol=0, atol=1e-5)
    dst.train()
    dst(lms, pan).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_fallback_when_disabled(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """BNNPAN_PACKED=0: nothing is converted and a converted model falls back to the float path, equal bit for bit
    to the unconverted model; an unbuildable extension is reported once and leaves the float path."""
    torch.manual_seed(0)
    model = randomize(build_network("bbcu", NetConfig(in_channels=4, width=32, depth=2, zero_init_tail=False))).eval()
    lms, pan = torch.rand(1, 4, 17, 15), torch.rand(1, 1, 17, 15)
    with torch.no_grad():
        ref = model(lms, pan)
        assert P.to_packed_runtime(model)["packed"] == 2
        monkeypatch.setenv(P.ENV_DISABLE, "0")
        assert torch.equal(model(lms, pan), ref)
        assert P.to_packed_runtime(build_network("bbcu", NetConfig(in_channels=4)))["reason"].startswith("disabled")
    monkeypatch.delenv(P.ENV_DISABLE)
    monkeypatch.setattr(P, "_ext", None)  # restored afterwards: the real extension for the other tests
    monkeypatch.setattr(P, "_failed", None)
    monkeypatch.setattr(P, "_SOURCE", P._SOURCE.with_name("no_such_file.cpp"))
    monkeypatch.setattr(P, "build_dir", lambda: P._SOURCE.parent)
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert not P.available() and not P.available()
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    fresh = build_network("bbcu", NetConfig(in_channels=4, width=32, depth=2))
    assert P.to_packed_runtime(fresh)["packed"] == 0


def test_unsupported_layers_stay_float() -> None:
    """Strided / dilated convs and unknown binarizers are left on the float path (counted, not converted)."""
    strided = BinaryConv2d(8, 8, stride=2)
    dilated = BinaryConv2d(8, 8, dilation=2, padding=2)
    custom = BinaryConv2d(8, 8, act=RPReLU(8))
    assert not any(P.eligible(m) for m in (strided, dilated, custom))
    model = nn.Sequential(strided, dilated, custom, BinaryConv2d(8, 8))
    assert P.to_packed_runtime(model) == {"packed": 1, "float": 3, "available": True, "reason": None}


def test_weight_packing_layout() -> None:
    """Bit c % 64 of word c // 64 is set where the sign is -1; wcount counts the -1 weights of each tap."""
    s = torch.ones(3, 70, 1, 2)
    s[1, 65, 0, 1] = -1
    s[2, 0, 0, 0] = -1
    words, wcount = P.pack_weight_signs(s, 1)
    assert words.shape == (1, 2, 2, 8)
    assert int(words[0, 1, 1, 1]) == 1 << 1 and int(words[0, 0, 0, 2]) == 1
    assert int(words.ne(0).sum()) == 2
    assert wcount.tolist() == [[0, 0], [0, 1], [1, 0]]


def test_variants_are_covered() -> None:
    assert set(VARIANTS) <= set(BINARY_NETWORKS) and set(WEIGHT_BINARIZERS) == {
        "sign", "mean_abs", "irnet_libra", "btm_standardize"}


def test_runtime_option_and_apply_runtime() -> None:
    """``--runtime`` accepts packed | float only; apply_runtime converts and reverts."""
    from typer.testing import CliRunner

    from bnnpan.cli import app

    r = CliRunner().invoke(app, ["evaluate", "--runtime", "fast"])
    assert r.exit_code == 2 and "use packed or float" in r.output
    model = build_network("bbcu", NetConfig(in_channels=4, width=32, depth=2))
    assert P.apply_runtime(model, "packed")["packed"] == 2
    assert all(m.packed_runtime is not None for m in model.modules() if isinstance(m, BinaryConv2d))
    P.apply_runtime(model, "float")
    assert all(m.packed_runtime is None for m in model.modules() if isinstance(m, BinaryConv2d))
    with pytest.raises(ValueError, match="runtime"):
        P.apply_runtime(model, "fast")
