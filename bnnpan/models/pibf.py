"""BNNPan's Prior-Integrated Binary Frequency (PIBF) module and its three parts: BWTC, LDPC injection, CDC.

Paper: Hou et al., "Binarized Neural Network for Multi-spectral Image Fusion", CVPR 2025. The paper's code is
not public; this is our reconstruction (``shared/design/method.md``), every choice a switch:

    PIBF(x, z) = x + CDC(LDPC(BWTC(x), z))

* **BWTC** (:class:`BWTC`): one-level Haar DWT of x into LL/LH/HL/HH, one binary unit per sub-band
  (a grouped conv, ``groups=4``: block-diagonal, so the units are independent), IDWT back, plus a binary
  unit on the full-resolution base branch. Each unit (:class:`StatBinaryUnit`) is informed by the
  full-precision statistics of its input s: ``s' = sd_s * RPReLU(binconv((s - mu_s) / sd_s))``, mu/sd per
  image and channel. The FP feature itself travels on the PIBF's identity shortcut, so BWTC returns only the
  binary residual ``IDWT(s'_bands) + s'_base`` (= the design's "rescale by sd_s and add back to s", with the
  add-back moved to the shortcut: the IDWT is linear). Why: LL is positive-biased and smooth, the detail bands
  zero-mean and heavy-tailed; one sign threshold and one scale cannot fit both, and the sd rescale puts each
  binary output on its sub-band's own scale (an input-adaptive form of BBCU's residual alignment).
* **LDPC injection** (:class:`LatentAffine`): ``F <- F * (1 + Linear_g(z)) + Linear_b(z)``, full precision,
  zero-initialised (identity at the start). z comes from :mod:`bnnpan.models.prior`.
* **CDC** (:class:`CDC`): ``y <- y * 2 sigmoid(MLP_a(GAP(y))) + MLP_b(GAP(y))``, per channel, input dependent.
  Our choice: the factor 2 and a zero-initialised last layer make CDC the identity at the start.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnnpan.models.binarizers import sign
from bnnpan.models.imagestats import active as imagestats_active
from bnnpan.models.imagestats import channel_moments
from bnnpan.models.layers import BinaryConv2d, RPReLU
from bnnpan.models.wavelet import HaarDWT, HaarIDWT

EPS = 1e-12  # on the variance: features of data divided by the sensor scale have sub-band stds of 1e-5..1e-2


class _StatSignFn(torch.autograd.Function):
    """A :class:`StatBinaryUnit`'s input side in training, fused: ``(s, b) -> (a, sd)`` with ``mu``, ``var`` the
    per-image, per-channel mean and population variance of s, ``sd = sqrt(var + eps)``,
    ``u = (s - mu) / sd + b`` and ``a = sign(u)`` (sign(0) = +1).

    Backward: ApproxSign's derivative at u (``2 - 2|u|`` on [-1, 1], 0 outside: Bi-Real, ECCV 2018, Eq. 6) into
    ``gu``, then through ``u = (s - mu) inv + b`` (``inv = 1 / sd``) into b, s, mu and inv, and with the gradient
    arriving at sd (the unit's output rescale) through ``var`` into s::

        dL/db   = sum_{B,H,W} gu                    dL/dinv = sum_{H,W} gu (s - mu)
        dL/dmu  = -inv sum_{H,W} gu                 dL/dvar = -inv^3 / 2 dL/dinv + inv / 2 dL/dsd
        dL/ds   = inv gu + dL/dmu / n + 2 dL/dvar (s - mu) / n

    (the variance's own dependence on mu sums to zero). Statistics in two passes (mean, then the norm of the
    deviations), activation by :func:`bnnpan.models.binarizers.sign`.

    The same gradients autograd takes through the unfused ops (tested, float64), in about half the passes over
    the feature map: the unfused forward and backward are ~30 elementwise passes per unit, most of BNNPan's
    training cost beyond its convolutions (issue 14).
    """

    @staticmethod
    def forward(ctx, s: Tensor, b: Tensor, eps: float) -> tuple[Tensor, Tensor]:  # noqa: D102
        # two passes (mean, then the norm of the deviations): ~7x faster here than torch.var_mean's Welford
        mu = s.mean(dim=(2, 3), keepdim=True)
        d = s - mu
        var = torch.linalg.vector_norm(d, dim=(2, 3), keepdim=True).square_().div_(s.shape[2] * s.shape[3])
        inv = torch.rsqrt(var + eps)
        u = torch.addcmul(b, d, inv)
        ctx.save_for_backward(d, u, inv)
        return sign(u), torch.sqrt(var + eps)

    @staticmethod
    def backward(ctx, ga: Tensor, gsd: Tensor | None):  # noqa: D102
        d, u, inv = ctx.saved_tensors
        n = d.shape[2] * d.shape[3]
        gu = u.abs().neg_().add_(1).clamp_min_(0).mul_(ga)  # half the ApproxSign derivative: the 2 is folded in
        sum_gu = gu.sum(dim=(2, 3), keepdim=True)
        grad_b = 2 * sum_gu.sum(dim=0, keepdim=True) if ctx.needs_input_grad[1] else None
        grad_inv = 2 * (gu * d).sum(dim=(2, 3), keepdim=True)
        grad_var = -0.5 * inv**3 * grad_inv
        if gsd is not None:
            grad_var = grad_var + 0.5 * inv * gsd
        gs = torch.addcmul(-2 * sum_gu * inv / n, d, 2 * grad_var / n).addcmul_(gu, 2 * inv)
        return gs, grad_b, None


class StatBinaryUnit(nn.Module):
    """One binary 3x3 unit, re-centred and rescaled by the FP statistics of its input (``fp_stats``).

    ``fp_stats=True``:  ``y = sd * RPReLU(binconv((s - mu) / sd))``, mu and sd = sqrt(var + eps) the per-image,
    per-channel mean and std of s (reduced over H, W), differentiable.
    ``fp_stats=False``: ``y = RPReLU(binconv(s))`` (the ablation: one threshold and one scale for every band).
    binconv: activation sign(u + b) (b learnable per channel) with the ApproxSign backward, weights
    mean|W| sign(W) per output channel -- BBCU's unit. ``groups`` independent units side by side.
    """

    #: input pixels per pixel of the image the statistics are taken over (:mod:`bnnpan.models.imagestats`)
    stat_stride = 1

    def __init__(self, channels: int, groups: int = 1, fp_stats: bool = True) -> None:
        super().__init__()
        self.fp_stats = bool(fp_stats)
        self.conv = BinaryConv2d(channels, channels, groups=groups, act="learnable_bias_sign",
                                 act_kwargs={"backward": "approx"}, weight="mean_abs")
        self.act = RPReLU(channels)
        #: training takes :class:`_StatSignFn` (the same function and pseudo-gradient, fewer passes); inference the
        #: unfused ops (the binary conv as a whole, per-image statistics through :mod:`bnnpan.models.imagestats`)
        self.fused = True

    def forward(self, s: Tensor) -> Tensor:
        if not self.fp_stats:
            return self.act(self.conv(s))
        if self.fused and torch.is_grad_enabled() and not imagestats_active():
            a, sd = _StatSignFn.apply(s, self.conv.act.b, EPS)
            return sd * self.act(self.conv(a, binarized=True))
        mu, var = channel_moments(self, s)
        sd = torch.sqrt(var + EPS)
        return sd * self.act(self.conv((s - mu) / sd))

    def extra_repr(self) -> str:
        return f"fp_stats={self.fp_stats}"


class BWTC(nn.Module):
    """Binary Wavelet Transform Convolution: ``IDWT(units_LL,LH,HL,HH(DWT(x))) + unit_base(x)`` (binary residual).

    Odd H or W are replicate-padded by one row/column for the transform and cropped after.
    """

    def __init__(self, channels: int, fp_stats: bool = True, base: bool = False) -> None:
        super().__init__()
        self.dwt, self.idwt = HaarDWT(channels), HaarIDWT(channels)
        self.bands = StatBinaryUnit(4 * channels, groups=4, fp_stats=fp_stats)
        self.bands.stat_stride = 2  # its statistics are of the sub-bands: one value per 2 x 2 input pixels
        self.base = StatBinaryUnit(channels, fp_stats=fp_stats) if base else None

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        xp = x
        if h % 2 or w % 2:
            xp = nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="replicate")
        r = self.idwt(self.bands(self.dwt(xp)))[..., :h, :w]
        return r if self.base is None else r + self.base(x)


class LatentAffine(nn.Module):
    """LDPC injection: ``F * (1 + g(z)) + b(z)``, g and b linear maps R^L -> R^D, zero-initialised."""

    def __init__(self, latent_dim: int, channels: int) -> None:
        super().__init__()
        self.g = nn.Linear(latent_dim, channels)
        self.b = nn.Linear(latent_dim, channels)
        for lin in (self.g, self.b):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, f: Tensor, z: Tensor) -> Tensor:
        return torch.addcmul(self.b(z)[..., None, None], f, (1 + self.g(z))[..., None, None])  # one pass


class CDC(nn.Module):
    """Channel-wise Distribution Calibration: ``y * 2 sigmoid(a) + b``, ``[a, b] = MLP(GAP(y))`` (identity at init)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 2 * channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, y: Tensor) -> Tensor:
        mean, _ = channel_moments(self, y, var=False)
        a, b = self.fc2(self.act(self.fc1(mean.flatten(1)))).chunk(2, dim=1)
        return torch.addcmul(b[..., None, None], y, (2 * torch.sigmoid(a))[..., None, None])  # one pass


class PIBF(nn.Module):
    """``x + CDC(LDPC(BWTC(x), z))``; ``base=False``: BWTC without its full-resolution base unit;
    ``bwtc=False``: a single full-resolution :class:`StatBinaryUnit` instead of BWTC; ``latent_dim=0``: no
    injection; ``cdc=False``: no calibration."""

    def __init__(self, channels: int, *, bwtc: bool = True, fp_stats: bool = True, cdc: bool = True,
                 latent_dim: int = 0, base: bool = False) -> None:
        super().__init__()
        self.binary = BWTC(channels, fp_stats, base) if bwtc else StatBinaryUnit(channels, fp_stats=fp_stats)
        self.inject = LatentAffine(latent_dim, channels) if latent_dim > 0 else None
        self.cdc = CDC(channels) if cdc else None

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        r = self.binary(x)
        if self.inject is not None:
            if z is None:
                raise ValueError("this PIBF injects a latent prior: z is required")
            r = self.inject(r, z)
        if self.cdc is not None:
            r = self.cdc(r)
        return x + r
