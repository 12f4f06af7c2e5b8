"""Classical pan-sharpening reference methods: EXP, Brovey, GSA, MTF-GLP(-HPM).

They are the sanity anchors of the benchmark (``shared/design/protocol.md``): every learned
method must beat EXP, and MTF-GLP-HPM must beat EXP on the reduced-resolution indices. Each is
re-implemented from the published formulas, as collected in

* G. Vivone et al., "A Critical Comparison Among Pansharpening Algorithms", IEEE TGRS 53(5),
  2015 (CS and MRA families, equations of sections II-III);
* G. Vivone et al., "A New Benchmark Based on Recent Advances in Multispectral Pansharpening:
  Revisiting Pansharpening With Classical and Emerging Pansharpening Methods", IEEE GRSM 9(1),
  2021,

and the original papers cited in each class. No toolbox code is used.

Interface (see :mod:`bnnpan.models.registry`): ``fuse(lms, pan, ms) -> fused`` on one tile in
DN, float64 NumPy arrays, where ``lms`` is (C, H, W) = the MS interpolated to the PAN grid with
the 23-tap interpolator, ``pan`` is (H, W) (a (1, H, W) PAN is accepted) and ``ms`` is
(C, H/R, W/R). The output is (C, H, W) float64. Every statistic (means, standard deviations,
regressions) is global over the tile, as in the reference formulation.

Conventions chosen here (they change the numbers slightly, so they are stated):

* PAN equalisation is mean/std matching with population statistics (ddof = 0);
  a flat PAN (zero variance up to rounding) is mapped to the target mean.
* The GLP low-pass of MTF-GLP and MTF-GLP-HPM is ``interp23(decimate(mtf_filter(P)))`` with
  the MTF kernel **divided by its DC gain** (0.997-0.9997 for the table gains): a low-pass used
  inside a method must pass a constant unchanged, otherwise HPM multiplies every pixel by
  ``1 / DC`` (+0.13 % at R = 4, gain 0.30) and a flat PAN would inject "detail". The Wald
  degradation (:mod:`bnnpan.data.wald`) keeps the kernel un-normalised, as the protocol says;
  ``unit_dc=False`` reproduces the un-normalised filter of the reference toolbox.
* GSA degrades the PAN to the MS scale with the PAN MTF filter and the decimation phase of
  :func:`bnnpan.data.wald.decimate` (``degrade_pan(pan, R, 'mtf', gain=pan_gain)``), which puts
  PAN_lr on the same sample grid as ``ms`` (the antialiased bicubic shrink would land half an
  HR pixel away from it); ``Gsa(..., pan_degradation='bicubic')`` is the alternative.
* Divisions (Brovey ``P / I``, HPM ``P / P_L``) keep ``lms`` where the denominator is not
  above ``1e-9`` times its largest magnitude over the tile (zero or negative denominators).

Known limitation, kept as published: with mean/std equalisation,
``P'_b = mean(lms_b) + z std(lms_b)`` is negative wherever ``z < -mean/std``. On dark tiles whose
band std is close to its mean (WorldView-2 SpaceNet-6 tile 1: 3-16 % of the pixels of B/G/R at
full resolution) ``P'_L,b`` crosses zero and the HPM ratio ``P'_b / P'_L,b`` explodes
(values of 3e5 DN); Brovey suffers likewise where ``I`` is small. The additive MTF-GLP and GSA
are not affected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from bnnpan.data import wald
from bnnpan.models.registry import MethodContext, register

__all__ = ["GLP_EPS", "Brovey", "Exp", "Gsa", "MtfGlp", "MtfGlpHpm", "check_inputs", "equalize", "glp_lowpass"]

FloatArray = npt.NDArray[np.float64]

#: Relative threshold under which a denominator counts as zero (see the module docstring).
GLP_EPS = 1e-9


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def check_inputs(lms: npt.ArrayLike, pan: npt.ArrayLike, ms: npt.ArrayLike,
                 ratio: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Validate and convert ``(lms, pan, ms)`` to float64 (C,H,W), (H,W), (C,H/R,W/R).

    Raises
    ------
    ValueError
        If a rank is wrong, the band counts of ``lms`` and ``ms`` differ, ``pan`` is not on the
        ``lms`` grid, or ``lms`` is not ``ratio`` times ``ms``; the message names the shapes.
    """
    lms_a = np.asarray(lms, dtype=np.float64)
    pan_a = np.asarray(pan, dtype=np.float64)
    ms_a = np.asarray(ms, dtype=np.float64)
    shapes = f"lms {lms_a.shape}, pan {pan_a.shape}, ms {ms_a.shape}, ratio {ratio}"
    if pan_a.ndim == 3 and pan_a.shape[0] == 1:
        pan_a = pan_a[0]
    if lms_a.ndim != 3 or pan_a.ndim != 2 or ms_a.ndim != 3:
        raise ValueError(f"expected lms (C, H, W), pan (H, W) and ms (C, h, w); got {shapes}")
    c, h, w = lms_a.shape
    if c < 1 or h < 1 or w < 1:
        raise ValueError(f"empty input: {shapes}")
    if ms_a.shape[0] != c:
        raise ValueError(f"lms and ms have different band counts: {shapes}")
    if pan_a.shape != (h, w):
        raise ValueError(f"pan is not on the lms grid: {shapes}")
    if ms_a.shape[1] * ratio != h or ms_a.shape[2] * ratio != w:
        raise ValueError(f"lms must be ratio x ms in both spatial axes: {shapes}")
    return lms_a, pan_a, ms_a


def equalize(pan: FloatArray, target: FloatArray) -> FloatArray:
    """Mean/std matching of ``pan`` to ``target``: ``(P - mean P) std(T)/std(P) + mean(T)``.

    Population statistics over the whole array; a flat PAN (std <= 1e-12 max|P|, i.e. zero up
    to rounding) gives ``mean(T)`` everywhere.
    """
    s_p = float(pan.std())
    flat = s_p <= 1e-12 * float(np.max(np.abs(pan))) if pan.size else True
    scale = 0.0 if flat else float(target.std()) / s_p
    return (pan - float(pan.mean())) * scale + float(target.mean())


def _safe_ratio(num: FloatArray, den: FloatArray) -> tuple[FloatArray, FloatArray]:
    """``num / den`` and the mask where ``den`` is usable (elsewhere the ratio is 1)."""
    tol = GLP_EPS * float(np.max(np.abs(den))) if den.size else 0.0
    ok = den > tol
    out = np.ones_like(num)
    np.divide(num, den, out=out, where=ok)
    return out, ok


def _gains_for(ctx_gains: Sequence[float], c: int, name: str) -> tuple[float, ...]:
    g = tuple(float(x) for x in ctx_gains)
    if len(g) == 1:
        return g * c
    if len(g) != c:
        raise ValueError(f"{name}: the context has {len(g)} MS gains for an image with {c} bands")
    return g


def glp_lowpass(img: FloatArray, gains: Sequence[float], ratio: int, unit_dc: bool = True) -> FloatArray:
    """GLP low-pass of a (C, H, W) image: ``interp23(decimate(MTF_b(img_b), R), R)``.

    ``MTF_b`` is :func:`bnnpan.data.wald.mtf_filter` with band ``b``'s Nyquist gain; with
    ``unit_dc`` its output is divided by the kernel's sum so that a constant passes unchanged.
    """
    low = wald.mtf_filter(img, list(gains), ratio)
    if unit_dc:
        dc = np.array([wald.mtf_kernel(g, ratio).sum() for g in gains])
        low = low / dc[:, None, None]
    return wald.interp23(wald.decimate(low, ratio), ratio)


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------
class Exp:
    """EXP: the MS expanded to the PAN grid by the 23-tap interpolator, ``F = lms``.

    The floor every pan-sharpening method must beat (Vivone et al. 2015, "EXP"; interpolator of
    Aiazzi et al. 2002, "Context-driven fusion of high spatial and spectral resolution images
    based on oversampled multiresolution analysis", IEEE TGRS 40(10)).
    """

    name = "exp"

    def __init__(self, ratio: int) -> None:
        self.ratio = ratio

    def fuse(self, lms: npt.ArrayLike, pan: npt.ArrayLike, ms: npt.ArrayLike) -> FloatArray:
        lms_a, _, _ = check_inputs(lms, pan, ms, self.ratio)
        return lms_a.copy()


class Brovey:
    """Brovey transform (Gillespie, Kahle & Walker 1987), a CS method with multiplicative injection.

    With ``I = (1/C) sum_b lms_b`` and the PAN equalised to it,
    ``P' = (P - mean P) std(I)/std(P) + mean(I)``::

        F_b = lms_b * P' / I          (F_b = lms_b where I <= eps)

    so the band ratios of each pixel are those of ``lms`` and ``mean_b F_b = P'``
    (Vivone et al. 2015, section II-A, eq. with g_b = lms_b / I).
    """

    name = "brovey"

    def __init__(self, ratio: int) -> None:
        self.ratio = ratio

    def fuse(self, lms: npt.ArrayLike, pan: npt.ArrayLike, ms: npt.ArrayLike) -> FloatArray:
        lms_a, pan_a, _ = check_inputs(lms, pan, ms, self.ratio)
        intensity = lms_a.mean(axis=0)
        pan_eq = equalize(pan_a, intensity)
        gain, _ = _safe_ratio(pan_eq, intensity)
        return lms_a * gain[None]


class Gsa:
    """Gram-Schmidt Adaptive (Aiazzi, Baronti & Selva 2007, "Improving component substitution
    pansharpening through multivariate regression of MS+Pan data", IEEE TGRS 45(10);
    Vivone et al. 2015, section II-B).

    With the band means removed (``~`` = zero-mean, means over the tile)::

        [w_1..w_C, w_0] = argmin || P~_lr - sum_b w_b ms~_b - w_0 ||^2      (least squares)
        I   = sum_b w_b lms~_b + w_0
        P'  = (P - mean P) std(I)/std(P) + mean(I)
        g_b = cov(lms_b, I) / var(I)                                         (Gram-Schmidt gain)
        F_b = lms~_b + g_b (P' - I) + mean(lms_b)

    ``P_lr`` is the PAN degraded to the MS scale, by default with its MTF filter and the
    decimation phase of ``ms`` (``wald.degrade_pan(pan, R, 'mtf', gain=pan_gain)``);
    ``pan_degradation='bicubic'`` uses the antialiased bicubic shrink instead. A flat
    intensity (std(I) <= 1e-12 max|lms|) gives g_b = 0, i.e. F = lms.
    """

    name = "gsa"

    def __init__(self, ratio: int, pan_gain: float,
                 pan_degradation: Literal["mtf", "bicubic"] = "mtf") -> None:
        if pan_degradation not in ("mtf", "bicubic"):
            raise ValueError(f"pan_degradation must be 'mtf' or 'bicubic', got {pan_degradation!r}")
        self.ratio = ratio
        self.pan_gain = pan_gain
        self.pan_degradation = pan_degradation

    def weights(self, pan: FloatArray, ms: FloatArray) -> FloatArray:
        """Regression weights ``[w_1..w_C, w_0]`` of the degraded, zero-mean PAN on zero-mean MS."""
        c = ms.shape[0]
        pan_lr = wald.degrade_pan(pan, self.ratio, self.pan_degradation, gain=self.pan_gain)
        ms0 = (ms - ms.mean(axis=(1, 2), keepdims=True)).reshape(c, -1)
        design = np.concatenate([ms0.T, np.ones((ms0.shape[1], 1))], axis=1)
        target = (pan_lr - pan_lr.mean()).ravel()
        w, *_ = np.linalg.lstsq(design, target, rcond=None)
        return w

    def fuse(self, lms: npt.ArrayLike, pan: npt.ArrayLike, ms: npt.ArrayLike) -> FloatArray:
        lms_a, pan_a, ms_a = check_inputs(lms, pan, ms, self.ratio)
        c = lms_a.shape[0]
        w = self.weights(pan_a, ms_a)
        means = lms_a.mean(axis=(1, 2), keepdims=True)
        lms0 = lms_a - means
        intensity = np.tensordot(w[:c], lms0, axes=1) + w[c]
        pan_eq = equalize(pan_a, intensity)
        detail = pan_eq - intensity
        i0 = intensity - intensity.mean()
        var_i = float(np.mean(i0 * i0))
        if math.sqrt(var_i) > 1e-12 * float(np.max(np.abs(lms_a))):
            g = np.mean(lms0 * i0[None], axis=(1, 2)) / var_i
        else:
            g = np.zeros(c)
        return lms0 + g[:, None, None] * detail[None] + means


class _GlpBase:
    """Shared part of the MTF-GLP family: per-band equalised PAN and its GLP low-pass."""

    name = ""

    def __init__(self, ratio: int, ms_gains: Sequence[float], unit_dc: bool = True,
                 equalization: str = "mean_std") -> None:
        if equalization not in ("mean_std", "none"):
            raise ValueError(f"equalization must be 'mean_std' or 'none', got {equalization!r}")
        self.ratio = ratio
        self.ms_gains = tuple(ms_gains)
        self.unit_dc = unit_dc
        self.equalization = equalization
        if self.name == "mtf_glp_hpm" and equalization == "mean_std":
            self.name = "mtf_glp_hpm_eq"

    def _pan_pyramid(self, lms: FloatArray, pan: FloatArray) -> tuple[FloatArray, FloatArray]:
        c = lms.shape[0]
        gains = _gains_for(self.ms_gains, c, self.name)
        if self.equalization == "none":
            pan_eq = np.repeat(pan[None], c, axis=0)
        else:
            pan_eq = np.stack([equalize(pan, lms[b]) for b in range(c)])
        return pan_eq, glp_lowpass(pan_eq, gains, self.ratio, self.unit_dc)


class MtfGlp(_GlpBase):
    """MTF-GLP, additive injection (Aiazzi et al. 2006, "MTF-tailored multiscale fusion of
    high-resolution MS and Pan imagery", PE&RS 72(5); Vivone et al. 2015, section III).

    ``P'_b = (P - mean P) std(lms_b)/std(P) + mean(lms_b)``, its GLP low-pass
    ``P'_L,b = interp23(decimate(MTF_b(P'_b)))`` with band b's MS Nyquist gain, and::

        F_b = lms_b + g_b (P'_b - P'_L,b),   g_b = 1.
    """

    name = "mtf_glp"

    def fuse(self, lms: npt.ArrayLike, pan: npt.ArrayLike, ms: npt.ArrayLike) -> FloatArray:
        lms_a, pan_a, _ = check_inputs(lms, pan, ms, self.ratio)
        pan_eq, pan_lp = self._pan_pyramid(lms_a, pan_a)
        return lms_a + (pan_eq - pan_lp)


class MtfGlpHpm(_GlpBase):
    """MTF-GLP with High-Pass Modulation (Aiazzi et al. 2006, PE&RS 72(5); Vivone et al. 2015,
    section III, and the 2021 GRSM benchmark).

    ``P'_b = (P - mean P) std(lms_b)/std(P) + mean(lms_b)``, its GLP low-pass
    ``P'_L,b = interp23(decimate(MTF_b(P'_b)))`` with band b's MS Nyquist gain, and::

        F_b = lms_b * P'_b / P'_L,b      (F_b = lms_b where P'_L,b <= eps)

    i.e. additive injection with the gain ``lms_b / P'_L,b``. The multiplicative model assumes
    ``P'_b > 0``; see the module docstring for tiles where mean/std equalisation breaks that.

    **Our default is ``equalization="none"``** (registered ``mtf_glp_hpm``): ``F_b = lms_b P / P_L,b``
    with the raw PAN, the high-pass modulation of Aiazzi et al. 2003 (URBAN). In this
    multiplicative model a gain applied to the PAN cancels in ``P / P_L``, so only the offset of
    the mean/std equalisation changes anything, and on dark, high-contrast tiles (WorldView-2
    SpaceNet-6 tile 1: std ~ mean) that offset makes ``P'_b`` negative on ~10 % of the pixels,
    ``P'_L,b`` crosses zero and the ratio explodes (D_s 0.10, worse than EXP's 0.08; with the raw
    PAN 0.015). The toolbox's variant stays available as ``mtf_glp_hpm_eq``.
    """

    name = "mtf_glp_hpm"

    def fuse(self, lms: npt.ArrayLike, pan: npt.ArrayLike, ms: npt.ArrayLike) -> FloatArray:
        lms_a, pan_a, _ = check_inputs(lms, pan, ms, self.ratio)
        pan_eq, pan_lp = self._pan_pyramid(lms_a, pan_a)
        out = np.empty_like(lms_a)
        for b in range(lms_a.shape[0]):
            mod, _ = _safe_ratio(pan_eq[b], pan_lp[b])
            out[b] = lms_a[b] * mod
        return out


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
@register("exp")
def _build_exp(ctx: MethodContext) -> Exp:
    return Exp(ctx.ratio)


@register("brovey")
def _build_brovey(ctx: MethodContext) -> Brovey:
    return Brovey(ctx.ratio)


@register("gsa")
def _build_gsa(ctx: MethodContext) -> Gsa:
    return Gsa(ctx.ratio, ctx.pan_gain)


@register("mtf_glp")
def _build_mtf_glp(ctx: MethodContext) -> MtfGlp:
    return MtfGlp(ctx.ratio, ctx.ms_gains)


@register("mtf_glp_hpm")
def _build_mtf_glp_hpm(ctx: MethodContext) -> MtfGlpHpm:
    return MtfGlpHpm(ctx.ratio, ctx.ms_gains, equalization="none")


@register("mtf_glp_hpm_eq")
def _build_mtf_glp_hpm_eq(ctx: MethodContext) -> MtfGlpHpm:
    return MtfGlpHpm(ctx.ratio, ctx.ms_gains, equalization="mean_std")
