"""Wald's protocol at reduced resolution: MTF filtering, decimation and 23-tap interpolation.

Wald's protocol (Wald, Ranchin & Mangolini 1997) evaluates a pan-sharpening method when no
high-resolution multispectral (MS) reference exists: the original pair (PAN at full
resolution, MS at its native resolution, scale ratio ``R``) is degraded by ``R``, the method
fuses the degraded pair, and the fused image is compared with the *original* MS, which plays
the role of the ground truth. The degradation must imitate the sensor, so each MS band is
low-pass filtered with a Gaussian approximation of its modulation transfer function (MTF)
whose amplitude at the MS Nyquist frequency equals the band's measured Nyquist gain
(Aiazzi et al. 2006, "MTF-tailored multiscale fusion of high-resolution MS and Pan imagery"),
then decimated. The conventions below follow the ones of the pan-sharpening benchmark of
Vivone et al. 2015 ("A critical comparison among pansharpening algorithms", IEEE TGRS) and of
its MATLAB toolbox, re-implemented here from the formulas of ``shared/design/protocol.md``
(section "Wald's protocol (reduced resolution)"); no toolbox code is used.

Pipeline (``ms`` is C x H x W, ``pan`` is H*R x W*R at full resolution)::

    ms_lr  = decimate(mtf_filter(ms, gains, R), R)        # == degrade_ms
    pan_lr = bicubic_shrink(pan, R)                       # or MTF_PAN + decimate: degrade_pan
    lms    = interp23(ms_lr, R)                           # network input / EXP baseline
    gt     = ms

Conventions that change the numbers:

* the MTF kernel is 41 x 41, Gaussian in frequency, windowed by a rotated Kaiser window and
  **not** renormalised (DC gain 0.997-0.9997 depending on gain and ratio);
* filtering is a same-size correlation with **replicate** borders;
* decimation keeps samples ``R//2, R//2 + R, ...`` (0-based) in both axes;
* ``interp23`` places LR sample ``k`` on HR index ``R*k + R//2``, the same phase, so the
  interpolated image is registered with the ground truth (bicubic upsampling would land on
  ``R*k + (R-1)/2``, half a pixel away);
* ``interp23`` filters with **circular** borders, as the reference toolbox does; its first and
  last few pixels therefore mix both sides of a non-periodic image (metrics cut a border).

All computations are float64, with numpy and scipy only.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import fft as sp_fft
from scipy import ndimage

__all__ = [
    "INTERP23_BASE",
    "apply_taps",
    "bicubic_shrink",
    "decimate",
    "degrade_ms",
    "degrade_pan",
    "interp23",
    "interp23_kernel",
    "mtf_filter",
    "mtf_kernel",
    "nyquist_response",
    "shrink_taps",
]

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]

#: One side (offsets 1..11) of the 23-tap polynomial interpolation kernel; the centre is 1.
INTERP23_BASE: tuple[float, ...] = (
    0.61066818237,
    0.0,
    -0.145397186478,
    0.0,
    0.043619155884,
    0.0,
    -0.010385513306,
    0.0,
    0.001615524292,
    0.0,
    -0.000120162964,
)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_ratio(ratio: int) -> int:
    """Return ``ratio`` as a Python int, or raise ``ValueError`` if it is not an int >= 2."""
    try:  # bools pass operator.index but are < 2
        r = operator.index(ratio)
    except TypeError:
        raise ValueError(f"ratio must be an integer >= 2, got {ratio!r}") from None
    if r < 2:
        raise ValueError(f"ratio must be an integer >= 2, got {ratio!r}")
    return r


def _check_gain(gain: float) -> float:
    """Return ``gain`` as a float, or raise ``ValueError`` unless 0 < gain < 1."""
    try:
        g = float(gain)
    except (TypeError, ValueError):
        raise ValueError(f"gain must be a number in (0, 1), got {gain!r}") from None
    if not (0.0 < g < 1.0):
        raise ValueError(f"gain must be in the open interval (0, 1), got {gain!r}")
    return g


def _as_bands(img: ArrayLike, name: str = "img") -> tuple[FloatArray, bool]:
    """Return ``img`` as a float64 (C, H, W) array and whether the input was 2-D."""
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim == 2:
        return arr[np.newaxis], True
    if arr.ndim == 3:
        return arr, False
    raise ValueError(f"{name} must be (H, W) or (C, H, W), got shape {arr.shape}")


def _check_divisible(shape: tuple[int, ...], ratio: int, name: str = "img") -> None:
    """Raise ``ValueError`` unless the last two dimensions of ``shape`` are multiples of ratio."""
    h, w = shape[-2], shape[-1]
    if h % ratio or w % ratio:
        raise ValueError(
            f"{name} spatial size {h}x{w} is not divisible by ratio {ratio}; crop it first"
        )


# --------------------------------------------------------------------------------------------
# MTF filter
# --------------------------------------------------------------------------------------------
def mtf_kernel(gain: float, ratio: int, n: int = 41, kaiser_beta: float = 0.5) -> FloatArray:
    """Gaussian MTF-matched low-pass kernel (frequency sampling + rotated Kaiser window).

    The desired frequency response is an isotropic Gaussian sampled on an ``n x n`` grid of
    DFT frequencies ``k1, k2 = -(n-1)/2 .. (n-1)/2`` (frequency ``k/n`` cycles/pixel)::

        sigma_f    = ((n - 1) / (2 * ratio)) / sqrt(-2 ln gain)      [frequency samples]
        Hd[k1, k2] = exp(-(k1^2 + k2^2) / (2 sigma_f^2))             (peak 1 at DC)

    so that ``Hd = gain`` at ``k = (n-1)/(2 ratio)``, i.e. at the *design* Nyquist frequency
    ``((n-1)/(2 ratio))/n`` cycles/pixel (0.1220 for n = 41, ratio = 4, slightly below the
    true MS Nyquist frequency ``1/(2 ratio)`` = 0.125). The impulse response is the centred
    inverse 2-D DFT ``h0 = fftshift(ifft2(ifftshift(Hd)))`` (real part; it is real and
    symmetric), multiplied by a rotated 1-D Kaiser window::

        w(t1, t2) = interp(sqrt(t1^2 + t2^2), t, kaiser(n, beta))  if the radius <= 1, else 0
        t = linspace(-1, 1, n)

    The result is **not** renormalised: its DC gain (sum) stays slightly below 1 (about
    0.9977-0.9997 for the gains and ratios of the sensor table), as in the reference
    toolbox. Because the design frequency sits below ``1/(2 ratio)``, the response at
    ``1/(2 ratio)`` is about ``gain**1.05`` (0.282 for gain 0.30, ratio 4), not ``gain``.
    The kernel is made exactly symmetric (equal to its transpose and to its flips) by
    averaging it with its mirror images, which changes it only at rounding level (~1e-17).

    Parameters
    ----------
    gain : float
        Amplitude of the sensor MTF at the Nyquist frequency, ``0 < gain < 1``.
    ratio : int
        Resolution ratio (>= 2).
    n : int, default 41
        Kernel size (odd).
    kaiser_beta : float, default 0.5
        Shape parameter of the Kaiser window (``numpy.kaiser``).

    Returns
    -------
    numpy.ndarray
        ``(n, n)`` float64 kernel with its centre at ``[(n-1)//2, (n-1)//2]``.

    Raises
    ------
    ValueError
        If ``gain`` is not in (0, 1), ``ratio`` is not an integer >= 2 or ``n`` is not an odd
        integer >= 3.
    """
    g = _check_gain(gain)
    r = _check_ratio(ratio)
    try:
        n_int = operator.index(n)
    except TypeError:
        raise ValueError(f"kernel size n must be an odd integer >= 3, got {n!r}") from None
    if n_int < 3 or n_int % 2 == 0:
        raise ValueError(f"kernel size n must be an odd integer >= 3, got {n!r}")
    n = n_int
    sigma_f = ((n - 1) / (2.0 * r)) / math.sqrt(-2.0 * math.log(g))
    k = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    hd = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2.0 * sigma_f**2))
    h0 = np.real(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(hd))))

    t = np.linspace(-1.0, 1.0, n)
    t = 0.5 * (t - t[::-1])  # exactly antisymmetric grid
    w1 = np.kaiser(n, kaiser_beta)
    w1 = 0.5 * (w1 + w1[::-1])
    radius = np.sqrt(t[:, None] ** 2 + t[None, :] ** 2)
    window = np.where(radius <= 1.0, np.interp(radius, t, w1), 0.0)

    h = h0 * window
    # exact symmetry (flips and transpose); the asymmetry removed is at rounding level
    h = 0.5 * (h + h[::-1, :])
    h = 0.5 * (h + h[:, ::-1])
    h = 0.5 * (h + h.T)
    return np.ascontiguousarray(h, dtype=np.float64)


def mtf_filter(
    img: ArrayLike, gains: float | Sequence[float] | ArrayLike, ratio: int, n: int = 41, *,
    padded: bool = False,
) -> FloatArray:
    """Filter each band with its MTF kernel (same size, replicate borders).

    For band ``b`` with kernel ``h_b = mtf_kernel(gains[b], ratio, n)``::

        out_b[i, j] = sum_{u, v} h_b[u, v] * x_b[clip(i + u - c), clip(j + v - c)],
        c = (n - 1) // 2,

    i.e. a 2-D correlation where out-of-range indices are clamped to the nearest edge
    (MATLAB ``imfilter(..., 'replicate')``, scipy ``mode='nearest'``). It is computed as an FFT
    convolution (:func:`_fftconvolve_valid`, the computation of ``scipy.signal.fftconvolve(...,
    mode='valid')``) of the edge-padded band; the kernel is symmetric, so correlation and convolution coincide.

    ``padded=True`` filters a window of a larger image: ``img`` already carries ``c`` extra
    pixels on every side (the true neighbours inside the larger image, the clamped edge values
    beyond its borders, i.e. rows/columns ``clip(i - c .. i + c)``), and only the ``(H - 2c) x
    (W - 2c)`` interior is returned. Given the whole image edge-padded, it is exactly the
    ``padded=False`` computation; on a window, it equals the whole image's result on that window
    up to rounding (the FFT length differs, ~1e-16 relative).

    Parameters
    ----------
    img : array_like
        ``(C, H, W)`` image, or ``(H, W)`` for a single band (with ``padded``: including the margins).
    gains : float or sequence of float
        Nyquist gain per band (length C), or one gain used for every band.
    ratio : int
        Resolution ratio (>= 2).
    n : int, default 41
        Kernel size (odd).

    Returns
    -------
    numpy.ndarray
        Filtered float64 image with the shape of ``img`` (less the margins with ``padded``).

    Raises
    ------
    ValueError
        On a bad shape, a gain outside (0, 1), a number of gains different from C, or a bad
        ratio or kernel size.
    """
    bands, was_2d = _as_bands(img)
    margin = 2 * ((operator.index(n) - 1) // 2) if padded else 0
    if padded and min(bands.shape[1:]) <= margin:
        raise ValueError(f"padded image {bands.shape[1:]} is not larger than the 2 x {margin // 2} margins")
    c = bands.shape[0]
    g = np.atleast_1d(np.asarray(gains, dtype=np.float64))
    if g.ndim != 1:
        raise ValueError(f"gains must be a scalar or a 1-D sequence, got shape {g.shape}")
    if g.size == 1:
        g = np.repeat(g, c)
    if g.size != c:
        raise ValueError(f"got {g.size} gains for an image with {c} bands")
    kernels: dict[float, FloatArray] = {}
    out = np.empty((c, bands.shape[1] - margin, bands.shape[2] - margin), dtype=np.float64)
    for b in range(c):
        gb = float(g[b])
        if gb not in kernels:
            kernels[gb] = mtf_kernel(gb, ratio, n)
        h = kernels[gb]
        pad = (h.shape[0] - 1) // 2
        band = bands[b] if padded else np.pad(bands[b], pad, mode="edge")
        out[b] = _fftconvolve_valid(band, h)
    return out[0] if was_2d else out


def _fftconvolve_valid(a: FloatArray, h: FloatArray) -> FloatArray:
    """2-D linear convolution of ``a`` with the smaller kernel ``h``, ``'valid'`` part only, by real FFTs.

    The same computation as ``scipy.signal.fftconvolve(a, h, mode='valid')`` (zero-padded transforms of the full
    ``a + h - 1`` size rounded up to a fast length, product, inverse, crop), written on ``scipy.fft`` because
    importing ``scipy.signal`` costs ~2 s, paid by every prepare and evaluate process of the DAG.
    """
    full = [a.shape[i] + h.shape[i] - 1 for i in (0, 1)]
    shape = [sp_fft.next_fast_len(n, real=True) for n in full]
    prod = sp_fft.rfft2(a, shape) * sp_fft.rfft2(h, shape)
    out = sp_fft.irfft2(prod, shape)
    return out[h.shape[0] - 1:a.shape[0], h.shape[1] - 1:a.shape[1]]


# --------------------------------------------------------------------------------------------
# decimation and bicubic shrink
# --------------------------------------------------------------------------------------------
def decimate(img: ArrayLike, ratio: int) -> FloatArray:
    """Keep one sample in ``ratio`` in both spatial axes, with phase ``ratio // 2``.

    ``out = img[..., ratio//2::ratio, ratio//2::ratio]`` (0-based): rows/columns 2, 6, 10, ...
    for ratio 4 and 1, 3, 5, ... for ratio 2. This is the phase on which :func:`interp23`
    puts the LR samples back.

    Parameters
    ----------
    img : array_like
        ``(..., H, W)`` image; ``H`` and ``W`` must be multiples of ``ratio``.
    ratio : int
        Resolution ratio (>= 2).

    Returns
    -------
    numpy.ndarray
        ``(..., H/ratio, W/ratio)`` float64 array (a copy).

    Raises
    ------
    ValueError
        If ``ratio`` is not an integer >= 2, ``img`` has fewer than 2 dimensions, or the
        spatial size is not divisible by ``ratio``.
    """
    r = _check_ratio(ratio)
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"img must have at least 2 dimensions, got shape {arr.shape}")
    _check_divisible(arr.shape, r)
    off = r // 2
    return np.ascontiguousarray(arr[..., off::r, off::r])


def _keys_cubic(x: FloatArray) -> FloatArray:
    """Keys cubic convolution kernel with ``a = -0.5`` (MATLAB ``imresize`` 'bicubic')."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1.0) & (ax <= 2.0))
    return inner + outer


def shrink_taps(in_len: int, ratio: int) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """The banded form of MATLAB's antialiased bicubic shrink along one axis of length ``in_len``.

    Returns ``(lo, w)``: output sample ``i`` (0-based) is ``sum_k w[i, k] * x[lo[i] + k]``, with
    ``lo`` of shape ``(in_len // ratio,)`` and ``w`` of shape ``(in_len // ratio, K)``, ``K <= 4 ratio + 2``.
    This is row ``i`` of the ``(L/ratio) x L`` resampling matrix of :func:`bicubic_shrink` restricted to
    its non-zero band: along each axis output index ``i`` (1-based) reads the input at coordinate
    ``u = i * ratio + 0.5 * (1 - ratio)`` with the stretched kernel ``(1/ratio) cubic(x / ratio)`` at the
    ``P = ceil(4 ratio) + 2`` indices ``floor(u - 2 ratio) + (0..P-1)``, weights normalised to sum 1;
    out-of-range indices are mirrored symmetrically (0 -> 1, -1 -> 2, L+1 -> L in 1-based terms), and
    weights landing on the same input index are added in tap order (exactly as the dense matrix was
    assembled). Mirroring folds taps back next to the edge, so every row's taps lie in
    ``[lo[i], lo[i] + K)``. Storing ``K`` weights per output instead of ``L`` makes the shrink
    O(L * K) instead of the dense O(L^2) matrix (O(L^3) with the matrix product), with the same sums up
    to rounding (the dense product adds the same terms, plus zeros, in another order). Rows whose taps
    span less than ``K`` get zero weights at the end (or the start, near the last edge), so that every
    index ``lo[i] + k`` lies inside ``[0, L)``.
    """
    r = _check_ratio(ratio)
    out_len = in_len // r
    width = 4.0 * r
    i = np.arange(1, out_len + 1, dtype=np.float64)  # 1-based output indices
    u = i * r + 0.5 * (1.0 - r)  # 1-based input coordinate
    left = np.floor(u - width / 2.0)
    p = math.ceil(width) + 2
    idx = left[:, None] + np.arange(p)[None, :]  # 1-based input indices
    wts = (1.0 / r) * _keys_cubic((u[:, None] - idx) / r)
    wts = wts / wts.sum(axis=1, keepdims=True)
    # symmetric mirroring of out-of-range indices: 0 -> 1, -1 -> 2, L+1 -> L, ... (1-based)
    aux = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    idx0 = aux[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    lo = idx0.min(axis=1).astype(np.int64)
    k = int((idx0 - lo[:, None]).max()) + 1 if out_len else 1
    lo = np.minimum(lo, in_len - k)  # keep every tap index (zero-weight ones included) inside [0, L)
    band = np.zeros((out_len, k), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_len)[:, None], idx0.shape)
    np.add.at(band, (rows, idx0 - lo[:, None]), wts)  # tap order, as the dense matrix was built
    return lo, band


def apply_taps(x: FloatArray, lo: npt.NDArray[np.int64], w: FloatArray, axis: int) -> FloatArray:
    """``out[..., i, ...] = sum_k w[i, k] * x[..., lo[i] + k, ...]`` along ``axis`` (see :func:`shrink_taps`).

    The sum runs over ``k`` in increasing order for every output sample, whatever the rest of the
    array: the result for an output sample depends only on its own taps, so shrinking a window
    (with ``lo`` shifted to the window's first input index) gives the same bits as shrinking the
    whole image and cropping. Memory: one output-sized accumulator and one gathered slab.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    shape = list(x.shape)
    shape[axis] = len(lo)
    out = np.zeros(shape, dtype=np.float64)
    bshape = [1] * x.ndim
    bshape[axis] = len(lo)
    for k in range(w.shape[1] if len(lo) else 0):
        out += np.take(x, lo + k, axis=axis) * w[:, k].reshape(bshape)
    return out


def bicubic_shrink(img: ArrayLike, ratio: int) -> FloatArray:
    """Shrink by ``ratio`` like MATLAB ``imresize(I, 1/ratio, 'bicubic')`` (antialiased).

    Separable resampling; along each axis, output index ``i`` (1-based) reads the input at
    coordinate ``u = i * ratio + 0.5 * (1 - ratio)`` (pixel centres aligned, so the output
    pixel covers input pixels ``(i-1)*ratio+1 .. i*ratio``) with the stretched kernel::

        k(x) = (1/ratio) * cubic(x / ratio),   width 4 * ratio
        cubic(x) = 1.5|x|^3 - 2.5|x|^2 + 1            for |x| <= 1
                 = -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2    for 1 < |x| <= 2
                 = 0                                  otherwise        (Keys, a = -0.5)

    taken at the ``P = ceil(4 ratio) + 2`` input indices ``floor(u - 2 ratio) + (0..P-1)``,
    normalised to sum 1 per output sample; out-of-range indices are mirrored symmetrically
    (index 0 -> 1, -1 -> 2 in 1-based terms, i.e. numpy ``mode='symmetric'``). The per-axis
    weights form a ``(L/ratio) x L`` matrix, ``out = A_rows @ img @ A_cols.T``, applied in its
    banded form (:func:`shrink_taps`, :func:`apply_taps`: rows first, then columns), so the cost
    is O(H W ratio) and the memory that of the image. A constant image stays constant (borders included).

    Parameters
    ----------
    img : array_like
        ``(C, H, W)`` or ``(H, W)`` image; ``H`` and ``W`` must be multiples of ``ratio``.
    ratio : int
        Resolution ratio (>= 2).

    Returns
    -------
    numpy.ndarray
        ``(C, H/ratio, W/ratio)`` or ``(H/ratio, W/ratio)`` float64 image.

    Raises
    ------
    ValueError
        On a bad ratio or shape, or a spatial size not divisible by ``ratio``.
    """
    r = _check_ratio(ratio)
    bands, was_2d = _as_bands(img)
    _check_divisible(bands.shape, r)
    out = apply_taps(bands, *shrink_taps(bands.shape[1], r), axis=1)
    out = apply_taps(out, *shrink_taps(bands.shape[2], r), axis=2)
    return out[0] if was_2d else out


# --------------------------------------------------------------------------------------------
# 23-tap interpolation
# --------------------------------------------------------------------------------------------
def interp23_kernel() -> FloatArray:
    """Return the 23-tap interpolation kernel (centre 1, mirrored :data:`INTERP23_BASE`).

    The taps at even non-zero offsets from the centre are zero, so filtering a zero-inserted
    signal leaves the existing samples unchanged. The odd-offset taps sum to
    ``0.999999999798`` per side pair (total kernel sum ``1.999999999596`` instead of 2), so
    a constant is reproduced at the new samples only to a relative ``4.04e-10``.
    """
    base = np.asarray(INTERP23_BASE, dtype=np.float64)
    return np.concatenate([base[::-1], [1.0], base])


def _is_power_of_two(r: int) -> bool:
    return r >= 2 and (r & (r - 1)) == 0


def interp23(img: ArrayLike, ratio: int) -> FloatArray:
    """Upsample by ``ratio`` with the 23-tap polynomial interpolator, ``log2(ratio)`` stages.

    Each stage doubles both spatial sizes by zero insertion and then filters the columns and
    the rows (separable 1-D filtering) with the kernel of :func:`interp23_kernel` using
    **circular** borders (``mode='wrap'``)::

        z[2 m + s] = x[m]  (other samples 0),   y = z (*) k23  along each axis

    with ``s = 1`` (odd 0-based positions) at the first stage and ``s = 0`` (even positions) at
    the later stages. Hence LR pixel ``k`` lands on HR index ``ratio * k + ratio // 2``
    (2k+1 for ratio 2, 4k+2 for ratio 4, 8k+4 for ratio 8), exactly the phase of
    :func:`decimate`, and ``decimate(interp23(x, R), R) == x`` exactly.

    A constant image ``c`` is not kept bit-exactly: the odd-offset taps sum to
    ``1 - 4.04e-10``, so a sample new in one axis gets ``c (1 - 4.04e-10)`` and one new in
    both axes ``c (1 - 4.04e-10)^2``; measured worst relative deviations are 8.1e-10,
    1.2e-9 and 1.9e-9 for ratios 2, 4 and 8 (bounded by ``8.1e-10 * log2(ratio)``).

    Parameters
    ----------
    img : array_like
        ``(C, h, w)`` or ``(h, w)`` low-resolution image.
    ratio : int
        Upsampling ratio, a power of two (2, 4, 8, ...).

    Returns
    -------
    numpy.ndarray
        ``(C, h * ratio, w * ratio)`` float64 image (``(h * ratio, w * ratio)`` for 2-D input).

    Raises
    ------
    ValueError
        If ``ratio`` is not a power of two >= 2 or the shape is not 2-D/3-D.
    """
    r = _check_ratio(ratio)
    if not _is_power_of_two(r):
        raise ValueError(f"interp23 needs a power-of-two ratio (2, 4, 8, ...), got {ratio!r}")
    bands, was_2d = _as_bands(img)
    k23 = interp23_kernel()
    out = bands
    for stage in range(r.bit_length() - 1):
        c, h, w = out.shape
        up = np.zeros((c, 2 * h, 2 * w), dtype=np.float64)
        s = 1 if stage == 0 else 0
        up[:, s::2, s::2] = out
        up = ndimage.correlate1d(up, k23, axis=1, mode="wrap")
        up = ndimage.correlate1d(up, k23, axis=2, mode="wrap")
        out = up
    return out[0] if was_2d else out


# --------------------------------------------------------------------------------------------
# convenience wrappers
# --------------------------------------------------------------------------------------------
def degrade_ms(ms: ArrayLike, gains: float | Sequence[float] | ArrayLike, ratio: int) -> FloatArray:
    """Degrade MS to reduced resolution: ``decimate(mtf_filter(ms, gains, ratio), ratio)``.

    Parameters
    ----------
    ms : array_like
        ``(C, H, W)`` (or ``(H, W)``) MS image, ``H`` and ``W`` multiples of ``ratio``.
    gains : float or sequence of float
        Nyquist gain per band (or one for all bands).
    ratio : int
        Resolution ratio (>= 2).

    Returns
    -------
    numpy.ndarray
        ``(C, H/ratio, W/ratio)`` float64 image (2-D for 2-D input).
    """
    r = _check_ratio(ratio)
    arr = np.asarray(ms, dtype=np.float64)
    _check_divisible(arr.shape, r, "ms")
    return decimate(mtf_filter(arr, gains, r), r)


def degrade_pan(
    pan: ArrayLike,
    ratio: int,
    method: Literal["bicubic", "mtf"] = "bicubic",
    gain: float | None = None,
) -> FloatArray:
    """Degrade PAN to reduced resolution.

    ``method='bicubic'``: :func:`bicubic_shrink` (MATLAB antialiased bicubic, the reference
    toolbox's choice). ``method='mtf'``: ``decimate(mtf_filter(pan, gain, ratio), ratio)``
    with the PAN Nyquist ``gain`` (required), the same filter and phase as the MS.

    Parameters
    ----------
    pan : array_like
        ``(H, W)`` or ``(1, H, W)`` PAN image, ``H`` and ``W`` multiples of ``ratio``.
    ratio : int
        Resolution ratio (>= 2).
    method : {'bicubic', 'mtf'}, default 'bicubic'
        Degradation filter.
    gain : float, optional
        PAN Nyquist gain, required for ``method='mtf'``.

    Returns
    -------
    numpy.ndarray
        Degraded PAN with the same rank as ``pan``.

    Raises
    ------
    ValueError
        On an unknown method, a missing gain, or a bad shape.
    """
    r = _check_ratio(ratio)
    arr = np.asarray(pan, dtype=np.float64)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[0] == 1)):
        raise ValueError(f"pan must be (H, W) or (1, H, W), got shape {arr.shape}")
    _check_divisible(arr.shape, r, "pan")
    if method == "bicubic":
        return bicubic_shrink(arr, r)
    if method == "mtf":
        if gain is None:
            raise ValueError("degrade_pan(method='mtf') needs the PAN Nyquist gain, got None")
        return decimate(mtf_filter(arr, gain, r), r)
    raise ValueError(f"method must be 'bicubic' or 'mtf', got {method!r}")


# --------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------
def nyquist_response(kernel: ArrayLike, freq_cycles_per_pixel: float) -> float:
    """Amplitude of a 2-D kernel's frequency response at ``(f, 0)``.

    Evaluates the discrete-time Fourier transform along the first axis at zero frequency
    along the second::

        |H(f, 0)| = | sum_{x1, x2} h[x1, x2] exp(-2 j pi f x1) |,   x1 centred on the kernel

    (the centring changes only the phase). For the symmetric MTF kernels both axes agree.

    Parameters
    ----------
    kernel : array_like
        2-D kernel.
    freq_cycles_per_pixel : float
        Frequency ``f`` in cycles per pixel (0.5 is the sampling Nyquist frequency).

    Returns
    -------
    float
        ``|H(f, 0)|``.
    """
    h = np.asarray(kernel, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"kernel must be 2-D, got shape {h.shape}")
    profile = h.sum(axis=1)
    x = np.arange(h.shape[0], dtype=np.float64) - (h.shape[0] - 1) / 2.0
    return float(np.abs(np.sum(profile * np.exp(-2j * np.pi * freq_cycles_per_pixel * x))))
