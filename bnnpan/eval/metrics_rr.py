"""Reduced-resolution quality indices (with a reference): PSNR, SAM, ERGAS, Q, Q2n and SCC.

These are the indices of the pan-sharpening benchmark of Vivone et al. (2015, 2021) and of its
MATLAB toolbox, re-implemented with numpy/scipy from the formulas of
``shared/design/protocol.md`` (section "Metrics"); no toolbox code is used. They must give the
toolbox's numbers, so the conventions matter:

* images are ``(C, H, W)`` arrays (a 2-D ``(H, W)`` array is one band) on the **DN scale**
  (not divided by the sensor scale), computed in float64, **never clipped** (except inside
  :func:`q2n`, which casts to uint16 as the toolbox does);
* the **reference comes first** (``gt`` at reduced resolution); ERGAS normalises by the
  reference's band means and Q2n standardises both images with the reference block's statistics;
* :func:`reduced_resolution` cuts a border before computing every index (:func:`cut_border`:
  MATLAB ``I(cut:end-cut, cut:end-cut, :)``, i.e. ``x[..., cut-1:-cut, cut-1:-cut]``, with the
  toolbox's ``cut = 21``; 215 x 215 is left of a 256 x 256 tile);
* block indices use 32 x 32 blocks: Q over every window fully inside the image (stride 1),
  Q2n over a non-overlapping grid padded by symmetric mirroring at the bottom/right.

References
----------
* Wald, L. (2002). *Data Fusion: Definitions and Architectures*. Presses de l'Ecole des Mines
  (ERGAS).
* Yuhas, R. H., Goetz, A. F. H., Boardman, J. W. (1992). Discrimination among semi-arid
  landscape endmembers using the spectral angle mapper (SAM) algorithm. JPL Airborne Geoscience
  Workshop.
* Wang, Z., Bovik, A. C. (2002). A universal image quality index. IEEE Signal Processing
  Letters 9(3), 81-84 (UIQI, Q).
* Alparone, L., Baronti, S., Garzelli, A., Nencini, F. (2004). A global quality measurement of
  pan-sharpened multispectral imagery. IEEE GRSL 1(4), 313-317 (Q4).
* Garzelli, A., Nencini, F. (2009). Hypercomplex quality assessment of multi/hyperspectral
  images. IEEE GRSL 6(4), 662-665 (Q2n).
* Zhou, J., Civco, D. L., Silander, J. A. (1998). A wavelet transform method to merge Landsat TM
  and SPOT panchromatic data. Int. J. Remote Sensing 19(4), 743-757 (SCC).
"""

from __future__ import annotations

import math
import operator

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_CUT",
    "cayley_dickson_conj",
    "cayley_dickson_product",
    "cut_border",
    "ergas",
    "psnr",
    "q2n",
    "q_index",
    "reduced_resolution",
    "sam",
    "scc",
    "smallest_tile",
]

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]

#: Border cut of the reference toolbox (``dim_cut = 21``), used at every ratio.
DEFAULT_CUT = 21
#: Block side of the block-based indices (Q, Q2n, and the full-resolution indices).
DEFAULT_BLOCK = 32

_SOBEL = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])


# --------------------------------------------------------------------------------------------
# validation helpers (also used by metrics_fr)
# --------------------------------------------------------------------------------------------
def _as_image(img: ArrayLike, name: str) -> FloatArray:
    """Return ``img`` as a float64 ``(C, H, W)`` array (a 2-D input becomes one band)."""
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (C, H, W) or (H, W), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    return arr


def _pair(ref: ArrayLike, fused: ArrayLike, ref_name: str = "ref", fused_name: str = "fused"
          ) -> tuple[FloatArray, FloatArray]:
    """Validate a (reference, fused) pair: same ``(C, H, W)`` shape, float64."""
    r = _as_image(ref, ref_name)
    f = _as_image(fused, fused_name)
    if r.shape != f.shape:
        raise ValueError(f"{ref_name} and {fused_name} shapes differ: {r.shape} vs {f.shape}")
    return r, f


def _positive_int(value: int, name: str, minimum: int = 1) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return v


def cut_border(img: ArrayLike, cut: int = DEFAULT_CUT) -> FloatArray:
    """Cut the reduced-resolution border exactly as the toolbox: MATLAB ``I(cut:end-cut, ...)``.

    The 1-based MATLAB range ``cut:end-cut`` keeps the 0-based rows ``cut-1 .. H-cut-1``, so
    ``cut - 1`` rows are removed at the top/left and ``cut`` at the bottom/right::

        out = img[..., cut-1 : H-cut, cut-1 : W-cut]      (cut >= 1; cut = 0: no cut)

    With the toolbox's ``cut = 21`` a 256 x 256 tile keeps 215 x 215 pixels (``[20:-21]``).
    The same 21 pixels are used at every ratio (the toolbox's fixed value, not scaled with R).

    Parameters
    ----------
    img : array_like
        ``(..., H, W)`` image.
    cut : int, default 21
        MATLAB ``dim_cut``; 0 keeps the whole image.

    Returns
    -------
    numpy.ndarray
        The cropped float64 view/copy.

    Raises
    ------
    ValueError
        If ``cut`` is negative or nothing would be left.
    """
    c = _positive_int(cut, "cut", minimum=0)
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"img must have at least 2 dimensions, got shape {arr.shape}")
    if c == 0:
        return arr
    h, w = arr.shape[-2:]
    if h - 2 * c + 1 < 1 or w - 2 * c + 1 < 1:
        raise ValueError(f"border cut {c} leaves nothing of an image of shape {arr.shape}")
    return arr[..., c - 1 : h - c, c - 1 : w - c]


def smallest_tile(cut: int = DEFAULT_CUT, block: int = DEFAULT_BLOCK) -> int:
    """Smallest side of a reduced-resolution test tile that :func:`reduced_resolution` can score.

    :func:`cut_border` keeps ``side - 2 cut + 1`` pixels (``side`` when ``cut`` is 0) and Q needs one
    whole ``block x block`` window in what is left: ``block + 2 cut - 1`` (73 for the toolbox's 21 and
    32). ``prepare`` (and the PanCollection import) refuse smaller tiles, so ``evaluate`` never meets one.
    """
    return block + max(2 * cut - 1, 0)


# --------------------------------------------------------------------------------------------
# PSNR, SAM, ERGAS
# --------------------------------------------------------------------------------------------
def psnr(ref: ArrayLike, fused: ArrayLike, peak: float) -> float:
    """Peak signal-to-noise ratio in dB, per band then averaged over bands.

    ::

        PSNR = mean_b 10 log10(peak^2 / MSE_b),   MSE_b = mean_{ij} (ref_b - fused_b)^2

    with ``peak = 2^bits - 1`` on DN data (2047 for 11-bit sensors, 1023 for GaoFen-2), which
    equals ``peak = 1`` on data divided by the scale. Averaging per-band PSNRs is not the PSNR
    of the pooled MSE. A band with ``MSE_b = 0`` has an infinite PSNR, so **identical images
    give ``inf``** (documented, not an error).

    Parameters
    ----------
    ref, fused : array_like
        ``(C, H, W)`` reference and fused images (DN).
    peak : float
        Peak value ``P > 0``.

    Returns
    -------
    float
        PSNR in dB (``inf`` if some band is reproduced exactly).

    Raises
    ------
    ValueError
        On mismatching or bad shapes or a non-positive peak.
    """
    r, f = _pair(ref, fused)
    p = float(peak)
    if not (p > 0.0 and math.isfinite(p)):
        raise ValueError(f"peak must be a positive finite number, got {peak!r}")
    mse = np.mean((r - f) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore"):
        per_band = 10.0 * np.log10(p * p / mse)
    return float(np.mean(per_band))


def sam(ref: ArrayLike, fused: ArrayLike) -> float:
    """Spectral angle mapper (Yuhas et al. 1992), in **degrees**.

    Per pixel, the angle between the spectral vectors ``r`` and ``f``::

        theta = arccos( clip(<r, f> / sqrt(|r|^2 |f|^2), -1, 1) )

    averaged over the pixels with ``|r| |f| != 0``; pixels where either vector is zero are
    dropped from both the sum and the count (toolbox convention). Identical images give 0 (up
    to rounding: ``arccos`` of a cosine ``1 - 1e-16`` is ~1e-6 degrees). If every pixel is
    dropped the result is NaN. The index is invariant to any positive per-pixel scaling of
    either image.

    Parameters
    ----------
    ref, fused : array_like
        ``(C, H, W)`` reference and fused images.

    Returns
    -------
    float
        Mean spectral angle in degrees.

    Raises
    ------
    ValueError
        On mismatching or bad shapes.
    """
    r, f = _pair(ref, fused)
    dot = np.sum(r * f, axis=0)
    prod_norm = np.sqrt(np.sum(r * r, axis=0) * np.sum(f * f, axis=0))
    keep = prod_norm != 0
    if not np.any(keep):
        return float("nan")
    cos = np.clip(dot[keep] / prod_norm[keep], -1.0, 1.0)
    return float(np.degrees(np.mean(np.arccos(cos))))


def ergas(ref: ArrayLike, fused: ArrayLike, ratio: int) -> float:
    """ERGAS, the relative dimensionless global error in synthesis (Wald 2002).

    ::

        ERGAS = 100 / R * sqrt( mean_b MSE_b / mu_b^2 ),   mu_b = mean of the REFERENCE band b

    with ``R`` the PAN/MS resolution ratio (``100/R = 25`` at R = 4). Lower is better; 0 for
    identical images. A reference band with zero mean gives ``inf``/NaN.

    Parameters
    ----------
    ref, fused : array_like
        ``(C, H, W)`` reference and fused images (DN).
    ratio : int or float
        Resolution ratio ``R > 0``.

    Returns
    -------
    float
        ERGAS.

    Raises
    ------
    ValueError
        On mismatching or bad shapes or a non-positive ratio.
    """
    r, f = _pair(ref, fused)
    rr = float(ratio)
    if not (rr > 0.0 and math.isfinite(rr)):
        raise ValueError(f"ratio must be positive, got {ratio!r}")
    mse = np.mean((r - f) ** 2, axis=(1, 2))
    mu = np.mean(r, axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(100.0 / rr * np.sqrt(np.mean(mse / mu**2)))


# --------------------------------------------------------------------------------------------
# Q (UIQI) over sliding windows
# --------------------------------------------------------------------------------------------
def _window_sums(a: FloatArray, block: int) -> FloatArray:
    """Sums of ``a`` over every ``block x block`` window fully inside (separable cumsums)."""
    c = np.cumsum(a, axis=-1)
    c = np.concatenate([np.zeros(c.shape[:-1] + (1,)), c], axis=-1)
    rows = c[..., block:] - c[..., :-block]
    c = np.cumsum(rows, axis=-2)
    c = np.concatenate([np.zeros(c.shape[:-2] + (1, c.shape[-1])), c], axis=-2)
    return c[..., block:, :] - c[..., :-block, :]


def _uiqi_windows(x: FloatArray, y: FloatArray, block: int) -> FloatArray:
    """Map of the UIQI over every window of one band pair (Wang & Bovik's ``img_qi``)."""
    n = float(block * block)
    # The covariance terms are invariant to a constant shift: shift each band by its rounded
    # mean so that the running sums stay small (accurate) and, for integer DN, exact (so flat
    # windows give an exactly zero variance term, as a direct window sum does).
    cx = float(np.round(np.mean(x)))
    cy = float(np.round(np.mean(y)))
    xs = x - cx
    ys = y - cy
    sx = _window_sums(xs, block)
    sy = _window_sums(ys, block)
    sxx = _window_sums(xs * xs, block)
    syy = _window_sums(ys * ys, block)
    sxy = _window_sums(xs * ys, block)
    cov_term = n * sxy - sx * sy  # N^2 * biased covariance
    var_term = n * (sxx + syy) - (sx * sx + sy * sy)  # N^2 * (s_x^2 + s_y^2)
    tx = sx + n * cx  # raw window sums = N * means
    ty = sy + n * cy
    lum_num = tx * ty
    lum_den = tx * tx + ty * ty
    den = var_term * lum_den
    q = np.ones_like(den)
    lum_only = (var_term == 0) & (lum_den != 0)
    q[lum_only] = 2.0 * lum_num[lum_only] / lum_den[lum_only]
    regular = den != 0
    q[regular] = 4.0 * cov_term[regular] * lum_num[regular] / den[regular]
    return q


def q_index(ref: ArrayLike, fused: ArrayLike, block: int = DEFAULT_BLOCK) -> float:
    """Universal image quality index Q (UIQI, Wang & Bovik 2002), sliding windows, band mean.

    For every ``block x block`` window fully inside the image (stride 1, ``(H-B+1)(W-B+1)``
    windows) and each band::

        Q = 4 s_xy m_x m_y / ((s_x^2 + s_y^2)(m_x^2 + m_y^2))
          = [s_xy / (s_x s_y)] * [2 m_x m_y / (m_x^2 + m_y^2)] * [2 s_x s_y / (s_x^2 + s_y^2)]

    (correlation x luminance x contrast; the ratio does not depend on whether the variances
    use N or N-1 as long as ``s_xy`` uses the same). Special cases (as in Wang's reference
    code): if ``s_x^2 + s_y^2 = 0`` and ``m_x^2 + m_y^2 != 0``, ``Q = 2 m_x m_y / (m_x^2 +
    m_y^2)``; if the denominator is otherwise 0 (e.g. both windows all zero), ``Q = 1``.
    Q is the mean over windows, then over bands. For ``y = a x`` (``a > 0``) every window
    gives ``(2a / (1 + a^2))^2``; for ``y = x + c`` the luminance term alone.

    Window sums are computed with separable cumulative sums (integral images) of the
    mean-shifted bands, so the cost is O(C H W) whatever the block size.

    Parameters
    ----------
    ref, fused : array_like
        ``(C, H, W)`` images (the index is symmetric).
    block : int, default 32
        Window side ``B`` (``B <= H, W``).

    Returns
    -------
    float
        Mean Q over windows and bands (1 for identical images).

    Raises
    ------
    ValueError
        On mismatching or bad shapes, or a window larger than the image.
    """
    r, f = _pair(ref, fused)
    b = _positive_int(block, "block")
    if b > r.shape[1] or b > r.shape[2]:
        raise ValueError(f"block {b} is larger than the image (shape {r.shape})")
    per_band = [float(np.mean(_uiqi_windows(r[i], f[i], b))) for i in range(r.shape[0])]
    return float(np.mean(per_band))


# --------------------------------------------------------------------------------------------
# Q2n: hypercomplex quality index
# --------------------------------------------------------------------------------------------
def cayley_dickson_conj(x: ArrayLike) -> FloatArray:
    """Conjugate of 2^k-ons stored along the last axis: the real part (index 0) is kept, the
    other components are negated."""
    a = np.array(x, dtype=np.float64, copy=True)
    a[..., 1:] *= -1.0
    return a


def cayley_dickson_product(p: ArrayLike, q: ArrayLike) -> FloatArray:
    """Cayley-Dickson product of 2^k-ons stored along the last axis (broadcasting).

    With ``p = (a, b)`` and ``q = (c, d)`` split into halves (2^(k-1)-ons)::

        p * q = (a c - conj(d) b,  conj(a) conj(d) + c conj(b))

    recursively, the product of 1-ons being the real product and ``conj`` negating every
    component but the real one (the protocol's convention, which is the one of the reference
    toolbox). For k = 1 it is the complex product; for k = 2 it equals Hamilton's quaternion
    product with the sign of the ``k`` component of the result flipped (components ordered
    ``1, i, j, k``), so ``|p * q| = |p| |q|`` and the Q4 value equals the one computed with
    Hamilton's product.

    Parameters
    ----------
    p, q : array_like
        Arrays whose last axis has the same power-of-two length.

    Returns
    -------
    numpy.ndarray
        The product, broadcast over the leading axes.

    Raises
    ------
    ValueError
        If the last axes differ or are not a power of two.
    """
    pa = np.asarray(p, dtype=np.float64)
    qa = np.asarray(q, dtype=np.float64)
    n = pa.shape[-1]
    if qa.shape[-1] != n or n < 1 or n & (n - 1):
        raise ValueError(f"last axes must have the same power-of-two length, got {pa.shape} and {qa.shape}")
    return _cd(pa, qa)


def _cd(p: FloatArray, q: FloatArray) -> FloatArray:
    n = p.shape[-1]
    if n == 1:
        return p * q
    h = n // 2
    a, b = p[..., :h], p[..., h:]
    c, d = q[..., :h], q[..., h:]
    first = _cd(a, c) - _cd(cayley_dickson_conj(d), b)
    second = _cd(cayley_dickson_conj(a), cayley_dickson_conj(d)) + _cd(c, cayley_dickson_conj(b))
    return np.concatenate([first, second], axis=-1)


def _cd_table(n: int) -> FloatArray:
    """Structure constants ``T[i, j] = e_i * e_j`` (shape (n, n, n)) of the product above."""
    eye = np.eye(n)
    return _cd(np.broadcast_to(eye[:, None, :], (n, n, n)), np.broadcast_to(eye[None, :, :], (n, n, n)))


def _to_uint16_grid(img: FloatArray) -> FloatArray:
    """MATLAB ``uint16()`` cast kept in float64: round half away from zero, saturate to
    [0, 65535], NaN -> 0."""
    out = np.sign(img) * np.floor(np.abs(img) + 0.5)
    out = np.clip(out, 0.0, 65535.0)
    return np.where(np.isnan(out), 0.0, out)


def _q2n_blocks(r: FloatArray, f: FloatArray, block: int, shift: int) -> FloatArray:
    """Per-block Q2n values of (C, H, W) images already validated (see :func:`q2n`)."""
    c, h, w = r.shape
    steps_y, steps_x = math.ceil(h / shift), math.ceil(w / shift)
    pad_y = max(0, (steps_y - 1) * shift + block - h)
    pad_x = max(0, (steps_x - 1) * shift + block - w)
    if pad_y or pad_x:
        widths = ((0, 0), (0, pad_y), (0, pad_x))
        r = np.pad(r, widths, mode="symmetric")
        f = np.pad(f, widths, mode="symmetric")
    r = _to_uint16_grid(r)
    f = _to_uint16_grid(f)
    k = 1 << max(0, (c - 1).bit_length())  # next power of two >= C
    n = block * block

    def blocks(img: FloatArray) -> FloatArray:
        win = sliding_window_view(img, (block, block), axis=(1, 2))[:, ::shift, ::shift]
        win = win[:, :steps_y, :steps_x]  # (C, ny, nx, B, B)
        out = np.zeros((steps_y * steps_x, k, n))
        out[:, :c, :] = np.moveaxis(win, 0, 2).reshape(steps_y * steps_x, c, n)
        return out  # zero bands appended up to 2^k

    x = blocks(r)
    y = blocks(f)
    # standardise BOTH with the reference block's mean and sample std (eps if 0); a zero mean
    # only adds 1 (the appended zero bands become the constant 1)
    m = np.mean(x, axis=-1, keepdims=True)
    s = np.std(x, axis=-1, ddof=1, keepdims=True)
    s = np.where(s == 0, np.finfo(np.float64).eps, s)
    zero_m = m == 0
    x = np.where(zero_m, x + 1.0, (x - m) / s + 1.0)
    y = np.where(zero_m, y + 1.0, (y - m) / s + 1.0)
    y[:, 1:, :] *= -1.0  # y = conj(f~)

    mu1 = np.mean(x, axis=-1)  # (nb, K)
    mu2 = np.mean(y, axis=-1)
    mod1 = np.sum(mu1 * mu1, axis=-1)  # |mu1|^2
    mod2 = np.sum(mu2 * mu2, axis=-1)
    unbias = n / (n - 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_bias = 2.0 * np.sqrt(mod1) * np.sqrt(mod2) / (mod1 + mod2)  # M
        var = unbias * (np.mean(np.sum(x * x, axis=1), axis=-1) + np.mean(np.sum(y * y, axis=1), axis=-1)
                        - mod1 - mod2)  # V
        # mean over pixels of x~ * y: the product is bilinear, so it is the structure constants
        # contracted with the (K x K) matrix of mean component products (one matmul per block)
        gram = np.matmul(x, np.swapaxes(y, 1, 2)) / n  # (nb, K, K): mean(x_i y_j)
        mean_xy = np.einsum("bij,ijk->bk", gram, _cd_table(k))
        cov = unbias * (mean_xy - _cd(mu1, mu2))  # C
        value = np.sqrt(np.sum(cov * cov, axis=-1)) * np.abs(mean_bias * 2.0 / var)
    return np.where(var == 0, mean_bias, value)


def q2n(ref: ArrayLike, fused: ArrayLike, block: int = DEFAULT_BLOCK, shift: int = DEFAULT_BLOCK) -> float:
    """Q2n, the hypercomplex generalisation of Q (Q4 for 4 bands, Q8 for 8 bands).

    Garzelli & Nencini (2009), after Alparone et al. (2004) for Q4; toolbox conventions:

    1. Blocks of ``B x B`` pixels every ``shift`` pixels (``shift = B``: non-overlapping),
       ``ceil(H / shift)`` x ``ceil(W / shift)`` of them; when the grid overhangs, both images
       are padded at the bottom/right by ``(steps - 1) shift + B - H`` pixels mirrored
       including the edge sample (numpy ``mode='symmetric'``).
    2. Both images are cast like MATLAB ``uint16``: rounded half away from zero and clipped to
       ``[0, 65535]`` (NaN -> 0).
    3. Zero bands are appended up to ``2^k >= C`` bands; each pixel is a 2^k-on whose
       components are the bands.
    4. Per block and band, with ``m_b`` and the sample std ``s_b`` (N - 1; ``eps`` if 0) of the
       **reference** block, both blocks are standardised with the reference's statistics:
       ``x~ = (x - m_b)/s_b + 1``, ``f~ = (f - m_b)/s_b + 1`` (if ``m_b = 0`` exactly, just
       ``+ 1``); ``y = conj(f~)``.
    5. With ``N = B^2``, ``mu1 = mean(x~)``, ``mu2 = mean(y)`` (2^k-ons) and ``*`` the
       Cayley-Dickson product of :func:`cayley_dickson_product`::

           M = 2 |mu1| |mu2| / (|mu1|^2 + |mu2|^2)
           V = N/(N-1) (mean|x~|^2 + mean|y|^2 - |mu1|^2 - |mu2|^2)
           C = N/(N-1) (mean(x~ * y) - mu1 * mu2)
           block value = |C M 2 / V|      (M if V = 0)

    6. Q2n = mean of the block values.

    Identical images give 1 (up to rounding). Q2n is not invariant to the order of the bands.

    Parameters
    ----------
    ref, fused : array_like
        ``(C, H, W)`` reference and fused images (DN, reference first).
    block : int, default 32
        Block side ``B`` (>= 2).
    shift : int, default 32
        Grid step (the toolbox passes ``shift = block``).

    Returns
    -------
    float
        Q2n in [0, 1].

    Raises
    ------
    ValueError
        On mismatching or bad shapes or bad block parameters.
    """
    r, f = _pair(ref, fused)
    b = _positive_int(block, "block", minimum=2)
    s = _positive_int(shift, "shift")
    return float(np.mean(_q2n_blocks(r, f, b, s)))


# --------------------------------------------------------------------------------------------
# SCC
# --------------------------------------------------------------------------------------------
def _sobel_magnitude(img: FloatArray) -> FloatArray:
    """Per band ``sqrt((h * I)^2 + (h^T * I)^2)``, same size, zero padding."""
    h = _SOBEL[np.newaxis]
    gy = ndimage.correlate(img, h, mode="constant", cval=0.0)
    gx = ndimage.correlate(img, np.swapaxes(h, 1, 2), mode="constant", cval=0.0)
    return np.sqrt(gy * gy + gx * gx)


def scc(ref: ArrayLike, fused: ArrayLike) -> float:
    """Spatial correlation coefficient (Zhou et al. 1998), toolbox variant (Sobel, uncentred).

    Both images are first cropped by one pixel on each side; then per band the Sobel gradient
    magnitude ``G = sqrt((h * I)^2 + (h^T * I)^2)`` with ``h = [[1, 2, 1], [0, 0, 0],
    [-1, -2, -1]]`` (same-size filtering, zero padding of the cropped image), and one global
    **uncentred** correlation over all pixels and bands::

        SCC = sum(G_F G_R) / sqrt(sum(G_F^2) sum(G_R^2))

    1 for identical images and for ``fused = ref + constant`` away from the padded border —
    note that the zero padding makes the border gradients depend on the offset, so a constant
    offset changes SCC slightly. (The Laplacian/local-Pearson SCC of other libraries is a
    different index.)

    Parameters
    ----------
    ref, fused : array_like
        ``(C, H, W)`` images with ``H, W >= 3``.

    Returns
    -------
    float
        SCC (NaN if a gradient image is identically zero).

    Raises
    ------
    ValueError
        On mismatching or bad shapes.
    """
    r, f = _pair(ref, fused)
    if r.shape[1] < 3 or r.shape[2] < 3:
        raise ValueError(f"scc needs at least 3 x 3 pixels, got shape {r.shape}")
    gr = _sobel_magnitude(r[:, 1:-1, 1:-1])
    gf = _sobel_magnitude(f[:, 1:-1, 1:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.sum(gf * gr) / np.sqrt(np.sum(gf * gf)) / np.sqrt(np.sum(gr * gr)))


# --------------------------------------------------------------------------------------------
# the reduced-resolution suite
# --------------------------------------------------------------------------------------------
def reduced_resolution(
    ref: ArrayLike,
    fused: ArrayLike,
    ratio: int,
    peak: float,
    cut: int = DEFAULT_CUT,
    block: int = DEFAULT_BLOCK,
) -> dict[str, float]:
    """All reduced-resolution indices of a fused image against its reference (Wald's protocol).

    Both images are cut with :func:`cut_border` (MATLAB ``I(cut:end-cut, cut:end-cut, :)``,
    ``[20:-21]`` for the default ``cut = 21``; 215 x 215 pixels of a 256 x 256 tile). The same
    21 pixels are cut **at every ratio**: it is the toolbox's fixed value, not scaled with R
    (at R = 2 it is a wider margin than needed, kept so that tables are comparable). Then, on
    the DN scale, with the reference first and no clipping:

    * ``psnr``: :func:`psnr` with ``peak`` (= the sensor scale, 2^bits - 1);
    * ``sam``: :func:`sam` in degrees;
    * ``ergas``: :func:`ergas` with ``ratio``;
    * ``q2n``: :func:`q2n` with ``block x block`` non-overlapping blocks (shift = block);
    * ``scc``: :func:`scc`;
    * ``q``: :func:`q_index` over every ``block x block`` window.

    Parameters
    ----------
    ref, fused : array_like
        ``(C, H, W)`` ground truth and fused image (DN).
    ratio : int
        Resolution ratio R (ERGAS).
    peak : float
        PSNR peak.
    cut : int, default 21
        Border cut (0 = none).
    block : int, default 32
        Block side of Q and Q2n.

    Returns
    -------
    dict[str, float]
        Keys ``psnr``, ``sam``, ``ergas``, ``q2n``, ``scc``, ``q``.

    Raises
    ------
    ValueError
        On mismatching or bad shapes, or parameters the indices reject.
    """
    r, f = _pair(ref, fused)
    r = cut_border(r, cut)
    f = cut_border(f, cut)
    return {
        "psnr": psnr(r, f, peak),
        "sam": sam(r, f),
        "ergas": ergas(r, f, ratio),
        "q2n": q2n(r, f, block, block),
        "scc": scc(r, f),
        "q": q_index(r, f, block),
    }
