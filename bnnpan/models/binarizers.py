"""Binarizers: 1-bit quantizers of activations and weights, each a ``torch.autograd.Function`` + ``nn.Module``.

Every binarizer has an explicit forward formula and an explicit pseudo-gradient (written in its ``backward``,
never left to autograd through ``torch.sign``, whose gradient is zero). ``sign(0) = +1`` everywhere
(:func:`sign`); ``torch.sign`` (which maps 0 to 0) is never used raw.

Registry: :data:`BINARIZERS` maps a name to a factory ``factory(channels, **kwargs) -> nn.Module``
(``channels`` is the number of feature channels; weight binarizers ignore it). Names are unique across
both kinds; :data:`ACTIVATION_BINARIZERS` / :data:`WEIGHT_BINARIZERS` say which is which.

* Activation binarizers map ``x (B, C, H, W)`` to exactly ``{-1, +1}``: ``sign_ste``, ``approx_sign``, ``ede``,
  ``rsign``, ``learnable_bias_sign``, ``bisr_redistribute``.
* Weight binarizers map the latent weight ``W (O, I, kh, kw)`` to ``scale * sign`` with ``scale`` per output
  channel ``(O, 1, 1, 1)`` or ``None``: ``sign``, ``mean_abs``, ``irnet_libra``, ``btm_standardize``. They expose
  ``sign_and_scale(W)``; ``forward(W)`` is computed as ``scale * sign`` from the same tensors so the two agree
  exactly (packing relies on it). Scales are detached (full precision, no gradient), as in the papers.

Modules that depend on the training progress (IR-Net's EDE) have ``set_progress(p)``, ``p`` in [0, 1]; the
training loop calls it on every module that has it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


def sign(x: Tensor) -> Tensor:
    """sign with sign(0) = +1 (values exactly +-1, same dtype as ``x``)."""
    return (x >= 0).to(x.dtype).mul_(2).sub_(1)  # in place: new large tensors cost page faults (4 ms, not 20)


def _per_filter(x: Tensor) -> Tensor:
    """(O, ...) -> (O, n): one row per output channel (filter)."""
    return x.reshape(x.shape[0], -1)


def _bshape(t: Tensor, ndim: int) -> Tensor:
    """per-output-channel vector (O,) -> (O, 1, 1, 1) for broadcasting against a weight of ``ndim`` dims."""
    return t.reshape((t.shape[0],) + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------------------------------------------
# autograd Functions (forward = sign, backward = the pseudo-gradient of each paper)
# ----------------------------------------------------------------------------------------------------------------
class SignClippedSTE(torch.autograd.Function):
    """forward: sign(x) (sign(0) = +1); backward: g * 1[|x| <= clip] (straight-through estimator, clipped).

    BNN: Hubara et al., "Binarized Neural Networks", NeurIPS 2016 (Eq. 4, g_r = g_q 1_{|r| <= 1}).
    """

    @staticmethod
    def forward(ctx, x: Tensor, clip: float = 1.0) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.clip = clip
        return sign(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= ctx.clip).to(g.dtype), None


class ApproxSignFn(torch.autograd.Function):
    """forward: sign(x); backward: g * (2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere).

    The derivative of Bi-Real's piecewise-quadratic ApproxSign. Bi-Real Net: Liu et al., ECCV 2018 (Eq. 6).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        (x,) = ctx.saved_tensors
        d = torch.where(x < 0, 2 + 2 * x, 2 - 2 * x).clamp_min(0)  # 0 outside [-1, 1]
        return g * d


class EDEFn(torch.autograd.Function):
    """forward: sign(x); backward: g * k * t * (1 - tanh^2(t * x)) (error decay estimator).

    IR-Net: Qin et al., "Forward and Backward Information Retention for Accurate Binary Neural Networks",
    CVPR 2020 (Eq. 12-13): t = T_min * 10^(p * log10(T_max / T_min)), T_min = 0.1, T_max = 10, k = max(1/t, 1).
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: float, k: float) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        ctx.t, ctx.k = t, k
        return sign(x)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        (x,) = ctx.saved_tensors
        t, k = ctx.t, ctx.k
        return g * (k * t * (1 - torch.tanh(t * x) ** 2)), None, None


class TanhSignFn(torch.autograd.Function):
    """forward: sign(u); backward: du = g * beta * (1 - tanh^2(beta u)), dbeta = sum(g * u * (1 - tanh^2(beta u))).

    BiSRNet's scalable hyperbolic tangent: sign(u) ~ tanh(beta u) in the backward pass, beta learnable
    (Cai et al., "Binarized Spectral Compressive Imaging", NeurIPS 2023). The beta gradient is d tanh(beta u)/d beta.
    """

    @staticmethod
    def forward(ctx, u: Tensor, beta: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(u, beta)
        return sign(u)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        u, beta = ctx.saved_tensors
        sech2 = 1 - torch.tanh(beta * u) ** 2
        gu = g * beta * sech2
        gbeta = (g * u * sech2).sum().reshape(beta.shape) if ctx.needs_input_grad[1] else None
        return gu, gbeta


# ----------------------------------------------------------------------------------------------------------------
# activation binarizers
# ----------------------------------------------------------------------------------------------------------------
class SignSTE(nn.Module):
    """BNN activation: forward sign(x); backward g * 1[|x| <= 1]. Hubara et al., NeurIPS 2016."""

    def forward(self, x: Tensor) -> Tensor:
        return SignClippedSTE.apply(x, 1.0)


class ApproxSign(nn.Module):
    """Bi-Real activation: forward sign(x); backward 2+2x on [-1,0), 2-2x on [0,1), 0 elsewhere. ECCV 2018."""

    def forward(self, x: Tensor) -> Tensor:
        return ApproxSignFn.apply(x)


def ede_schedule(p: float, t_min: float = 0.1, t_max: float = 10.0) -> tuple[float, float]:
    """IR-Net's EDE schedule at training progress p in [0, 1]: t = t_min * (t_max/t_min)^p, k = max(1/t, 1).

    With the defaults t = 10^(-1 + 2p): 0.1 at p = 0, 1 at p = 0.5, 10 at p = 1.
    """
    p = min(max(float(p), 0.0), 1.0)
    t = t_min * 10 ** (p * math.log10(t_max / t_min))
    return t, max(1.0 / t, 1.0)


class EDE(nn.Module):
    """IR-Net activation: forward sign(x); backward k t (1 - tanh^2(t x)), t from 0.1 to 10 with ``set_progress``.

    Qin et al., CVPR 2020. ``progress`` is a plain attribute (not state): the training loop sets it every step.
    """

    def __init__(self, t_min: float = 0.1, t_max: float = 10.0) -> None:
        super().__init__()
        self.t_min, self.t_max = t_min, t_max
        self.set_progress(0.0)

    def set_progress(self, p: float) -> None:
        self.progress = float(p)
        self.t, self.k = ede_schedule(p, self.t_min, self.t_max)

    def forward(self, x: Tensor) -> Tensor:
        return EDEFn.apply(x, self.t, self.k)

    def extra_repr(self) -> str:
        return f"t={self.t:.4g}, k={self.k:.4g}"


class RSign(nn.Module):
    """ReActNet activation: forward sign(x - a_c), a learnable per channel (init 0); backward ApproxSign at x - a_c.

    Liu et al., "ReActNet", ECCV 2020 (Eq. 3). d/da = -(ApproxSign'(x - a)) summed over batch and pixels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return ApproxSignFn.apply(x - self.a)


class LearnableBiasSign(nn.Module):
    """forward sign(x + b_c), b learnable per channel (init 0); backward clipped STE (BTM) or ApproxSign (BBCU).

    ``backward="ste"``: g * 1[|x + b| <= 1] (BTM: Jiang et al., "Training Binary Neural Network without Batch
    Normalization for Image Super-Resolution", AAAI 2021); ``backward="approx"``: Bi-Real's ApproxSign derivative
    at x + b (BBCU: Xia et al., "Basic Binary Convolution Unit for Binarized Image Restoration Network", ICLR 2023).
    """

    def __init__(self, channels: int, backward: str = "approx") -> None:
        super().__init__()
        if backward not in ("ste", "approx"):
            raise ValueError(f"learnable_bias_sign: backward must be 'ste' or 'approx', not {backward!r}")
        self.backward_kind = backward
        self.b = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        u = x + self.b
        return SignClippedSTE.apply(u, 1.0) if self.backward_kind == "ste" else ApproxSignFn.apply(u)

    def extra_repr(self) -> str:
        return f"backward={self.backward_kind}"


class BiSRRedistribute(nn.Module):
    """BiSRNet activation: u = k_c x + b_c (per-channel redistribution, k init 1, b init 0), forward sign(u);
    backward du = beta (1 - tanh^2(beta u)), beta a learnable scalar (init ``beta_init``).

    Cai et al., "Binarized Spectral Compressive Imaging", NeurIPS 2023. Gradients reach k and b through u = kx + b
    (dk = sum(g' x), db = sum(g')), and beta through d tanh(beta u)/d beta = u (1 - tanh^2(beta u)).
    Our choices: one beta per binarizer (a scalar), initialised at 2 so that the backward peak (beta) equals
    Bi-Real's ApproxSign peak.
    """

    def __init__(self, channels: int, beta_init: float = 2.0) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.tensor([float(beta_init)]))

    def forward(self, x: Tensor) -> Tensor:
        return TanhSignFn.apply(self.k * x + self.b, self.beta)


# ----------------------------------------------------------------------------------------------------------------
# weight binarizers: forward(W) = scale * sign (or sign); sign_and_scale(W) -> (sign, scale | None)
# ----------------------------------------------------------------------------------------------------------------
class WeightBinarizer(nn.Module):
    """Base class: ``_sign_and_scale(W)`` returns (sign with its pseudo-gradient, detached scale or None)."""

    def _sign_and_scale(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def forward(self, w: Tensor) -> Tensor:
        s, scale = self._sign_and_scale(w)
        return s if scale is None else scale * s

    @torch.no_grad()
    def sign_and_scale(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """(sign exactly +-1 shaped like W, per-output-channel scale (O, 1, 1, 1) or None), no gradient."""
        s, scale = self._sign_and_scale(w)
        return s.detach(), None if scale is None else scale.detach()


class SignWeight(WeightBinarizer):
    """BNN weights: W_b = sign(W), no scale; backward clipped STE g * 1[|W| <= 1]. Hubara et al., NeurIPS 2016."""

    def _sign_and_scale(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        return SignClippedSTE.apply(w, 1.0), None


class MeanAbsWeight(WeightBinarizer):
    """XNOR / Bi-Real / ReActNet / BBCU / BiSRNet weights: W_b = alpha_o sign(W), alpha_o = mean|W_o| per output
    channel, DETACHED; backward g * alpha_o * 1[|W| <= 1] (clipped STE times the constant scale).

    Rastegari et al., "XNOR-Net", ECCV 2016 (Eq. 4: alpha* = ||W||_1 / n).
    """

    def _sign_and_scale(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        alpha = _bshape(_per_filter(w.detach()).abs().mean(1), w.ndim)
        return SignClippedSTE.apply(w, 1.0), alpha


def standardize_per_filter(w: Tensor, eps: float = 1e-10) -> Tensor:
    """(W - mean_o) / sqrt(var_o + eps), per output channel o, population variance; differentiable.

    eps = 1e-10 (our choice): negligible against the variance of initialised 3x3 weights (~1e-3), unlike the usual
    1e-5, so the standardisation stays scale-invariant in practice."""
    flat = _per_filter(w)
    mu = flat.mean(1, keepdim=True)
    var = flat.var(1, keepdim=True, correction=0)
    return ((flat - mu) / torch.sqrt(var + eps)).reshape(w.shape)


class IRNetLibraWeight(WeightBinarizer):
    """IR-Net (Libra-PB) weights: W_std = (W - mean_o) / std_o per filter, W_b = 2^round(log2(mean|W_std|_o)) *
    sign(W_std). Backward: EDE k t (1 - tanh^2(t W_std)) through sign (IR-Net applies EDE to weights and
    activations alike; ``set_progress`` drives t), then autograd through the standardisation; the power-of-two
    scale is detached (its gradient is zero anyway). Qin et al., CVPR 2020 (Eq. 7-10).
    """

    def __init__(self, t_min: float = 0.1, t_max: float = 10.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.t_min, self.t_max, self.eps = t_min, t_max, eps
        self.set_progress(0.0)

    def set_progress(self, p: float) -> None:
        self.progress = float(p)
        self.t, self.k = ede_schedule(p, self.t_min, self.t_max)

    def _sign_and_scale(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        ws = standardize_per_filter(w, self.eps)
        m = _per_filter(ws.detach()).abs().mean(1).clamp_min(torch.finfo(w.dtype).tiny)
        scale = _bshape(torch.exp2(torch.round(torch.log2(m))), w.ndim)
        return EDEFn.apply(ws, self.t, self.k), scale


class BTMStandardizeWeight(WeightBinarizer):
    """BTM weights: weight standardisation W_std = (W - mean_o) / std_o per filter, then W_b = alpha_o sign(W_std),
    alpha_o = mean|W_std|_o (detached). Backward: clipped STE g * alpha_o * 1[|W_std| <= 1] at W_std, then autograd
    through the standardisation. Jiang et al., AAAI 2021. (Clipping at |W_std| <= 1 is our choice: the same
    clipped STE as every other weight binarizer here.)
    """

    def __init__(self, eps: float = 1e-10) -> None:
        super().__init__()
        self.eps = eps

    def _sign_and_scale(self, w: Tensor) -> tuple[Tensor, Tensor | None]:
        ws = standardize_per_filter(w, self.eps)
        alpha = _bshape(_per_filter(ws.detach()).abs().mean(1), w.ndim)
        return SignClippedSTE.apply(ws, 1.0), alpha


# ----------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------
Factory = Callable[..., nn.Module]

ACTIVATION_BINARIZERS: dict[str, Factory] = {
    "sign_ste": lambda channels=0, **kw: SignSTE(**kw),
    "approx_sign": lambda channels=0, **kw: ApproxSign(**kw),
    "ede": lambda channels=0, **kw: EDE(**kw),
    "rsign": lambda channels, **kw: RSign(channels, **kw),
    "learnable_bias_sign": lambda channels, **kw: LearnableBiasSign(channels, **kw),
    "bisr_redistribute": lambda channels, **kw: BiSRRedistribute(channels, **kw),
}
WEIGHT_BINARIZERS: dict[str, Factory] = {
    "sign": lambda channels=0, **kw: SignWeight(**kw),
    "mean_abs": lambda channels=0, **kw: MeanAbsWeight(**kw),
    "irnet_libra": lambda channels=0, **kw: IRNetLibraWeight(**kw),
    "btm_standardize": lambda channels=0, **kw: BTMStandardizeWeight(**kw),
}
#: name -> factory(channels, **kwargs) -> nn.Module (activation and weight binarizers; names are unique).
BINARIZERS: dict[str, Factory] = {**ACTIVATION_BINARIZERS, **WEIGHT_BINARIZERS}


def make_binarizer(name: str, channels: int = 0, **kwargs) -> nn.Module:
    """Build the binarizer ``name`` (ValueError listing the known names)."""
    if name not in BINARIZERS:
        raise ValueError(f"unknown binarizer {name!r}; known: {', '.join(sorted(BINARIZERS))}")
    return BINARIZERS[name](channels, **kwargs)
