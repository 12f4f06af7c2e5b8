"""Binarizers: exact +-1 forwards, sign(0) = +1, and every backward equal to its paper's formula on a grid.

The closed forms below are written independently of the implementation (piecewise ``torch.where`` chains,
the standardisation Jacobian written out) and compared with ``torch.autograd.grad`` in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from bnnpan.models import binarizers as B

GRID = torch.cat([torch.linspace(-2, 2, 401, dtype=torch.float64),
                  torch.tensor([-1.0, -0.0, 0.0, 1.0], dtype=torch.float64)])  # exact kinks included


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def ref_sign(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u < 0, -torch.ones_like(u), torch.ones_like(u))


def ref_clipped(u: torch.Tensor) -> torch.Tensor:
    return torch.where((u >= -1) & (u <= 1), 1.0, 0.0).to(u.dtype)


def ref_approx(u: torch.Tensor) -> torch.Tensor:
    return torch.where((u >= -1) & (u < 0), 2 + 2 * u,
                       torch.where((u >= 0) & (u < 1), 2 - 2 * u, torch.zeros_like(u)))


def feature_grid(channels: int = 3) -> torch.Tensor:
    """(1, C, 405, 1): the grid in every channel, float64, requires grad."""
    return GRID.view(1, 1, -1, 1).repeat(1, channels, 1, 1).requires_grad_(True)


def upstream(shape: torch.Size, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def assert_pm1(y: torch.Tensor) -> None:
    assert torch.equal(y.abs(), torch.ones_like(y)), "binarizer output is not exactly +-1"


# ----------------------------------------------------------------------------------------------------------------
def test_registry_names_and_unknown() -> None:
    assert set(B.ACTIVATION_BINARIZERS) == {"sign_ste", "approx_sign", "ede", "rsign", "learnable_bias_sign",
                                            "bisr_redistribute"}
    assert set(B.WEIGHT_BINARIZERS) == {"sign", "mean_abs", "irnet_libra", "btm_standardize"}
    assert set(B.BINARIZERS) == set(B.ACTIVATION_BINARIZERS) | set(B.WEIGHT_BINARIZERS)
    for name in B.BINARIZERS:
        assert isinstance(B.make_binarizer(name, 3), torch.nn.Module)
    with pytest.raises(ValueError, match="sign_ste"):
        B.make_binarizer("nope", 3)


def test_sign_of_zero_is_plus_one() -> None:
    x = torch.tensor([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0])
    assert B.sign(x).tolist() == [-1, -1, 1, 1, 1, 1]
    for name in B.ACTIVATION_BINARIZERS:
        act = B.make_binarizer(name, 2)
        assert torch.equal(act(torch.zeros(1, 2, 3, 3)), torch.ones(1, 2, 3, 3)), name
    for name in B.WEIGHT_BINARIZERS:
        s, _ = B.make_binarizer(name).sign_and_scale(torch.zeros(2, 3, 3, 3))
        assert torch.equal(s, torch.ones(2, 3, 3, 3)), name


# ----------------------------------------------------------------------------------------------------------------
# activation binarizers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, deriv", [("sign_ste", ref_clipped), ("approx_sign", ref_approx)])
def test_parameter_free_activations(name: str, deriv) -> None:
    act = B.make_binarizer(name, 3)
    x = feature_grid()
    y = act(x)
    assert_pm1(y)
    assert torch.equal(y, ref_sign(x.detach()))
    g = upstream(y.shape)
    (gx,) = torch.autograd.grad(y, x, g)
    close(gx, g * deriv(x.detach()))


def test_clipped_ste_kinks_exact() -> None:
    x = torch.tensor([-1.0, -1.0000001, 0.0, 1.0, 1.0000001], requires_grad=True)
    (gx,) = torch.autograd.grad(B.SignSTE()(x), x, torch.ones(5))
    assert gx.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]  # passes where |x| <= 1


@pytest.mark.parametrize("p, t, k", [(0.0, 0.1, 10.0), (0.5, 1.0, 1.0), (1.0, 10.0, 1.0)])
def test_ede_schedule_and_gradient(p: float, t: float, k: float) -> None:
    act = B.make_binarizer("ede")
    act.set_progress(p)
    assert act.t == pytest.approx(t, rel=1e-12) and act.k == pytest.approx(k, rel=1e-12)
    assert act.t == pytest.approx(10 ** (-1 + 2 * p), rel=1e-12) and act.k == pytest.approx(max(1 / act.t, 1.0))
    x = feature_grid()
    y = act(x)
    assert_pm1(y)
    assert torch.equal(y, ref_sign(x.detach()))
    g = upstream(y.shape)
    (gx,) = torch.autograd.grad(y, x, g)
    close(gx, g * k * t * (1 - torch.tanh(t * x.detach()) ** 2))


def test_ede_schedule_monotone() -> None:
    ts = [B.ede_schedule(p)[0] for p in torch.linspace(0, 1, 11).tolist()]
    assert all(a < b for a, b in zip(ts, ts[1:], strict=False))
    assert B.ede_schedule(-1.0) == B.ede_schedule(0.0) and B.ede_schedule(2.0) == B.ede_schedule(1.0)


def test_rsign_threshold_and_gradients() -> None:
    act = B.make_binarizer("rsign", 3).double()
    a = torch.tensor([-0.3, 0.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        act.a.copy_(a.view(1, 3, 1, 1))
    x = feature_grid()
    y = act(x)
    u = x.detach() - a.view(1, 3, 1, 1)
    assert_pm1(y)
    assert torch.equal(y, ref_sign(u))
    g = upstream(y.shape)
    gx, ga = torch.autograd.grad(y, (x, act.a), g)
    close(gx, g * ref_approx(u))
    close(ga, -(g * ref_approx(u)).sum(dim=(0, 2, 3), keepdim=True))


@pytest.mark.parametrize("backward, deriv", [("ste", ref_clipped), ("approx", ref_approx)])
def test_learnable_bias_sign(backward: str, deriv) -> None:
    act = B.make_binarizer("learnable_bias_sign", 3, backward=backward).double()
    b = torch.tensor([0.25, 0.0, -0.7], dtype=torch.float64)
    with torch.no_grad():
        act.b.copy_(b.view(1, 3, 1, 1))
    x = feature_grid()
    y = act(x)
    u = x.detach() + b.view(1, 3, 1, 1)
    assert_pm1(y)
    assert torch.equal(y, ref_sign(u))
    g = upstream(y.shape)
    gx, gb = torch.autograd.grad(y, (x, act.b), g)
    close(gx, g * deriv(u))
    close(gb, (g * deriv(u)).sum(dim=(0, 2, 3), keepdim=True))
    with pytest.raises(ValueError):
        B.make_binarizer("learnable_bias_sign", 3, backward="nope")


def test_bisr_redistribute_gradients() -> None:
    act = B.make_binarizer("bisr_redistribute", 3, beta_init=1.5).double()
    k = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64).view(1, 3, 1, 1)
    b = torch.tensor([0.0, 0.3, -0.1], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        act.k.copy_(k)
        act.b.copy_(b)
    beta = 1.5
    x = feature_grid()
    y = act(x)
    u = k * x.detach() + b
    assert_pm1(y)
    assert torch.equal(y, ref_sign(u))
    g = upstream(y.shape)
    gx, gk, gb, gbeta = torch.autograd.grad(y, (x, act.k, act.b, act.beta), g)
    dsign = beta * (1 - torch.tanh(beta * u) ** 2)  # d tanh(beta u) / du
    close(gx, g * dsign * k)
    close(gk, (g * dsign * x.detach()).sum(dim=(0, 2, 3), keepdim=True))
    close(gb, (g * dsign).sum(dim=(0, 2, 3), keepdim=True))
    close(gbeta, (g * u * (1 - torch.tanh(beta * u) ** 2)).sum().view(1))


# ----------------------------------------------------------------------------------------------------------------
# weight binarizers
# ----------------------------------------------------------------------------------------------------------------
def weight_grid() -> torch.Tensor:
    """(4, 405, 1, 1): the grid, the grid x 0.3 + 0.2 (biased), sparse spikes (+-10 at 4 places), the grid^3."""
    spikes = torch.zeros_like(GRID)
    spikes[[10, 100, 200, 300]] = torch.tensor([10.0, -10.0, 10.0, -10.0], dtype=torch.float64)
    rows = torch.stack([GRID, 0.3 * GRID + 0.2, spikes, GRID ** 3])
    return rows.view(4, -1, 1, 1).clone().requires_grad_(True)


def check_sign_and_scale(wb: B.WeightBinarizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    wq = wb(w)
    s, scale = wb.sign_and_scale(w)
    assert_pm1(s)
    assert s.shape == w.shape
    if scale is not None:
        assert scale.shape == (w.shape[0], 1, 1, 1)
        assert torch.equal(scale * s, wq.detach())
    else:
        assert torch.equal(s, wq.detach())
    return s, scale


def test_sign_weight() -> None:
    wb = B.make_binarizer("sign")
    w = weight_grid()
    s, scale = check_sign_and_scale(wb, w)
    assert scale is None and torch.equal(s, ref_sign(w.detach()))
    g = upstream(w.shape)
    (gw,) = torch.autograd.grad(wb(w), w, g)
    close(gw, g * ref_clipped(w.detach()))


def test_mean_abs_weight() -> None:
    wb = B.make_binarizer("mean_abs")
    w = weight_grid()
    s, scale = check_sign_and_scale(wb, w)
    alpha = w.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    close(scale, alpha)
    assert torch.equal(s, ref_sign(w.detach()))
    g = upstream(w.shape)
    (gw,) = torch.autograd.grad(wb(w), w, g)
    close(gw, g * scale * ref_clipped(w.detach()))  # alpha detached: constant factor times the clipped STE


def standardise_ref(w: torch.Tensor, eps: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    n = w[0].numel()
    mu = w.sum(dim=(1, 2, 3), keepdim=True) / n
    sd = torch.sqrt(((w - mu) ** 2).sum(dim=(1, 2, 3), keepdim=True) / n + eps)
    return (w - mu) / sd, sd


def standardise_vjp(u: torch.Tensor, sd: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J^T v of u = (w - mean) / sqrt(var + eps) per filter: (v - mean(v) - u mean(u v)) / sd."""
    m = lambda t: t.mean(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    return (v - m(v) - u * m(u * v)) / sd


def check_standardised_sign(s: torch.Tensor, u: torch.Tensor) -> None:
    """sign(W_std) away from 0 (where the two float paths could disagree in the last bit), and +1 at the exact
    zeros of the spikes row (its mean is exactly 0, so its 401 zeros standardise to exactly 0)."""
    away = u.abs() > 1e-9
    assert torch.equal(s[away], ref_sign(u)[away])
    assert int((u[2] == 0).sum()) == 401 and bool((s[2][u[2] == 0] == 1).all())


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_irnet_libra_weight(p: float) -> None:
    wb = B.make_binarizer("irnet_libra")
    wb.set_progress(p)
    t, k = 10 ** (-1 + 2 * p), max(1 / 10 ** (-1 + 2 * p), 1.0)
    assert wb.t == pytest.approx(t) and wb.k == pytest.approx(k)
    w = weight_grid()
    s, scale = check_sign_and_scale(wb, w)
    u, sd = standardise_ref(w.detach())
    check_standardised_sign(s, u)
    expected_scale = 2.0 ** torch.round(torch.log2(u.abs().mean(dim=(1, 2, 3), keepdim=True)))
    assert torch.equal(scale, expected_scale)
    assert set(scale.flatten().tolist()) >= {1.0, 0.125}  # powers of two, not all 1 (spikes row)
    g = upstream(w.shape)
    (gw,) = torch.autograd.grad(wb(w), w, g)
    v = g * scale * k * t * (1 - torch.tanh(t * u) ** 2)
    close(gw, standardise_vjp(u, sd, v))


def test_btm_standardize_weight() -> None:
    wb = B.make_binarizer("btm_standardize")
    w = weight_grid()
    s, scale = check_sign_and_scale(wb, w)
    u, sd = standardise_ref(w.detach())
    close(scale, u.abs().mean(dim=(1, 2, 3), keepdim=True))
    check_standardised_sign(s, u)
    g = upstream(w.shape)
    (gw,) = torch.autograd.grad(wb(w), w, g)
    close(gw, standardise_vjp(u, sd, g * scale * ref_clipped(u)))


def test_standardisation_is_invariant_to_affine_weight_changes() -> None:
    """sign(W_std) and the scale do not change under W -> a W + c (a > 0): the point of standardising."""
    w = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    for name in ("irnet_libra", "btm_standardize"):
        wb = B.make_binarizer(name)
        s1, c1 = wb.sign_and_scale(w)
        s2, c2 = wb.sign_and_scale(w * 0.01 + 0.5)
        assert torch.equal(s1, s2), name
        assert torch.allclose(c1, c2, rtol=1e-3), name
    assert math.isfinite(float(B.make_binarizer("irnet_libra").sign_and_scale(torch.zeros(2, 3, 3, 3))[1].sum()))
