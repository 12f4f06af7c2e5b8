"""Full-resolution indices (bnnpan.eval.metrics_fr) on the real WorldView-2 tile."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bnnpan.data import wald
from bnnpan.eval import metrics_fr as mfr
from bnnpan.eval import metrics_rr as mrr

GAINS = (0.35, 0.35, 0.35, 0.27)  # WorldView-2 blue, green, red, nir1
RATIO = 4


@pytest.fixture(scope="module")
def wv2(shared_data: Path) -> dict[str, np.ndarray]:
    """ms_exp (4 x 512 x 512, 23-tap expanded native MS), pan (512 x 512) and PAN_L."""
    rasterio = pytest.importorskip("rasterio")
    d = shared_data / "worldview2-spacenet6"
    with rasterio.open(d / "ms1.tif") as ds:
        ms = ds.read().astype(np.float64)[:, ::2, ::2]  # native 150 x 150 at 2 m
    with rasterio.open(d / "pan1.tif") as ds:
        pan = ds.read(1).astype(np.float64)
    ms_exp = wald.interp23(ms, RATIO)  # 600 x 600
    assert ms_exp.shape == (4, 600, 600)
    ms_exp, pan = ms_exp[:, :512, :512], pan[:512, :512]
    pan_l = wald.interp23(wald.bicubic_shrink(pan, RATIO), RATIO)
    return {"ms_exp": ms_exp, "pan": pan, "pan_l": pan_l}


@pytest.fixture(scope="module")
def injected(wv2: dict[str, np.ndarray]) -> np.ndarray:
    """A simple detail-injection fusion: ms_exp + g_b (PAN - PAN_L), g_b = std ratio / 2."""
    ms_exp, pan, pan_l = wv2["ms_exp"], wv2["pan"], wv2["pan_l"]
    g = 0.5 * ms_exp.std(axis=(1, 2)) / pan.std()
    return ms_exp + g[:, None, None] * (pan - pan_l)


def uiqi_loop(x: np.ndarray, y: np.ndarray, block: int = 32) -> float:
    """Mean UIQI over non-overlapping blocks, one block at a time (np.cov, N-1)."""
    vals = []
    for i in range(0, x.shape[0], block):
        for j in range(0, x.shape[1], block):
            a = x[i : i + block, j : j + block].ravel()
            b = y[i : i + block, j : j + block].ravel()
            c = np.cov(a, b)
            vals.append(4 * c[0, 1] * a.mean() * b.mean() / ((c[0, 0] + c[1, 1]) * (a.mean() ** 2 + b.mean() ** 2)))
    return float(np.mean(vals))


def test_d_lambda_is_zero_when_the_mtf_of_fused_is_the_expanded_ms(wv2, injected) -> None:
    for fused in (wv2["ms_exp"], injected):
        low = wald.mtf_filter(fused, GAINS, RATIO)
        assert mfr.d_lambda_khan(fused, low, GAINS, RATIO) == pytest.approx(0.0, abs=1e-12)


def test_d_lambda_is_one_minus_q2n_with_the_expanded_ms_first(wv2, injected) -> None:
    ms_exp = wv2["ms_exp"]
    dl = mfr.d_lambda_khan(injected, ms_exp, GAINS, RATIO)
    low = wald.mtf_filter(injected, GAINS, RATIO)
    assert dl == pytest.approx(1.0 - mrr.q2n(ms_exp, low), abs=1e-15)
    assert dl != pytest.approx(1.0 - mrr.q2n(low, ms_exp), abs=1e-9)  # reference first matters
    assert 0.0 < dl < 0.3


def test_d_s_of_the_exp_image_against_a_block_loop(wv2) -> None:
    ms_exp, pan, pan_l = wv2["ms_exp"], wv2["pan"], wv2["pan_l"]
    expected = np.mean([abs(uiqi_loop(b, pan) - uiqi_loop(b, pan_l)) for b in ms_exp])
    got = mfr.d_s(ms_exp, pan, ms_exp, RATIO)
    assert got == pytest.approx(expected, rel=1e-10)
    assert got > 0.01
    assert mfr.uiqi_blocks(ms_exp[0], pan) == pytest.approx(uiqi_loop(ms_exp[0], pan), rel=1e-12)


def test_detail_injection_has_a_lower_d_s_than_exp(wv2, injected) -> None:
    ms_exp, pan = wv2["ms_exp"], wv2["pan"]
    assert mfr.d_s(injected, pan, ms_exp, RATIO) < 0.5 * mfr.d_s(ms_exp, pan, ms_exp, RATIO)


def test_d_lambda_qnr_against_a_pair_loop(wv2, injected) -> None:
    ms_exp = wv2["ms_exp"]
    assert mfr.d_lambda_qnr(ms_exp, ms_exp) == 0.0
    diffs = [abs(uiqi_loop(injected[i], injected[j]) - uiqi_loop(ms_exp[i], ms_exp[j]))
             for i in range(4) for j in range(4) if i != j]  # ordered pairs: same mean
    got = mfr.d_lambda_qnr(injected, ms_exp)
    assert got == pytest.approx(np.mean(diffs), rel=1e-10)
    assert got > 0.0


def test_full_resolution_combines_the_indices(wv2, injected) -> None:
    ms_exp, pan = wv2["ms_exp"], wv2["pan"]
    for fused in (ms_exp, injected):
        m = mfr.full_resolution(fused, pan, ms_exp, GAINS, RATIO)
        assert set(m) == {"d_lambda", "d_s", "hqnr", "qnr", "d_lambda_qnr"}
        assert m["d_lambda"] == mfr.d_lambda_khan(fused, ms_exp, GAINS, RATIO)
        assert m["d_s"] == mfr.d_s(fused, pan, ms_exp, RATIO)
        assert m["d_lambda_qnr"] == mfr.d_lambda_qnr(fused, ms_exp)
        assert m["hqnr"] == pytest.approx((1 - m["d_lambda"]) * (1 - m["d_s"]), abs=1e-15)
        assert m["qnr"] == pytest.approx((1 - m["d_lambda_qnr"]) * (1 - m["d_s"]), abs=1e-15)
        for k in ("hqnr", "qnr", "d_lambda", "d_s", "d_lambda_qnr"):
            assert 0.0 <= m[k] <= 1.0
    # the pan may also come as (1, H, W)
    assert mfr.full_resolution(injected, pan[None], ms_exp, GAINS, RATIO) == mfr.full_resolution(
        injected, pan, ms_exp, GAINS, RATIO)


def test_full_resolution_keeps_the_toolbox_d_s_and_adds_the_mtf_variant(wv2, injected) -> None:
    """pan_degradation='mtf' never changes d_s / hqnr / qnr (the toolbox's, bicubic PAN_L); it adds d_s_mtf
    (PAN_L = interp23(decimate(MTF_PAN(PAN)))) and hqnr_mtf = (1 - d_lambda)(1 - d_s_mtf)."""
    ms_exp, pan = wv2["ms_exp"], wv2["pan"]
    pan_gain = 0.11  # WorldView-2
    for fused in (ms_exp, injected):
        base = mfr.full_resolution(fused, pan, ms_exp, GAINS, RATIO)
        m = mfr.full_resolution(fused, pan, ms_exp, GAINS, RATIO, pan_degradation="mtf", pan_gain=pan_gain)
        assert list(m) == ["d_lambda", "d_s", "hqnr", "qnr", "d_lambda_qnr", "d_s_mtf", "hqnr_mtf"]
        assert {k: m[k] for k in base} == base
        pan_l = wald.interp23(wald.decimate(wald.mtf_filter(pan, pan_gain, RATIO), RATIO), RATIO)
        expected = np.mean([abs(uiqi_loop(f, pan) - uiqi_loop(b, pan_l)) for f, b in zip(fused, ms_exp, strict=True)])
        assert m["d_s_mtf"] == pytest.approx(expected, rel=1e-10)
        assert m["d_s_mtf"] == mfr.d_s(fused, pan, ms_exp, RATIO, pan_degradation="mtf", pan_gain=pan_gain)
        assert abs(m["d_s_mtf"] - m["d_s"]) > 1e-3
        assert m["hqnr_mtf"] == pytest.approx((1 - m["d_lambda"]) * (1 - m["d_s_mtf"]), abs=1e-15)
    with pytest.raises(ValueError, match="pan_gain"):
        mfr.full_resolution(ms_exp, pan, ms_exp, GAINS, RATIO, pan_degradation="mtf")
    with pytest.raises(ValueError, match="pan_degradation must be one of"):
        mfr.full_resolution(ms_exp, pan, ms_exp, GAINS, RATIO, pan_degradation="gauss")


def test_uiqi_blocks_pure_gain(wv2) -> None:
    x = wv2["ms_exp"][2]
    assert mfr.uiqi_blocks(x, 0.6 * x) == pytest.approx((2 * 0.6 / (1 + 0.36)) ** 2, abs=1e-12)


def test_flat_nodata_blocks_give_nan_with_a_warning(wv2, injected) -> None:
    ms_exp, pan, fused = wv2["ms_exp"].copy(), wv2["pan"].copy(), injected.copy()
    for a in (ms_exp, fused):
        a[:, :64, :64] = 0.0
    pan[:64, :64] = 0.0
    with pytest.warns(RuntimeWarning, match="flat"):
        ds = mfr.d_s(fused, pan, ms_exp, RATIO)
    assert math.isnan(ds)
    with pytest.warns(RuntimeWarning, match="flat"):
        m = mfr.full_resolution(fused, pan, ms_exp, GAINS, RATIO)
    assert math.isnan(m["hqnr"]) and math.isnan(m["qnr"]) and math.isnan(m["d_lambda_qnr"])


@pytest.mark.parametrize("shape", [(4, 500, 512), (4, 512, 520), (4, 16, 16)])
def test_sides_must_be_multiples_of_the_block(shape) -> None:
    img = np.ones(shape)
    pan = np.ones(shape[1:])
    for call in (lambda: mfr.d_lambda_khan(img, img, GAINS, RATIO),
                 lambda: mfr.d_s(img, pan, img, RATIO),
                 lambda: mfr.d_lambda_qnr(img, img),
                 lambda: mfr.full_resolution(img, pan, img, GAINS, RATIO)):
        with pytest.raises(ValueError, match=rf"\({shape[0]}, {shape[1]}, {shape[2]}\)"):
            call()


def test_shape_mismatches_are_errors() -> None:
    a, b = np.ones((4, 64, 64)), np.ones((3, 64, 64))
    pan = np.ones((64, 64))
    with pytest.raises(ValueError, match="shapes differ"):
        mfr.d_lambda_khan(a, b, GAINS, RATIO)
    with pytest.raises(ValueError, match="shapes differ"):
        mfr.d_s(a, pan, b, RATIO)
    with pytest.raises(ValueError, match="pan shape"):
        mfr.d_s(a, np.ones((64, 32)), a, RATIO)
    with pytest.raises(ValueError, match="pan must be"):
        mfr.full_resolution(a, np.ones((2, 64, 64)), a, GAINS, RATIO)
    with pytest.raises(ValueError, match="gains"):
        mfr.d_lambda_khan(a, a, (0.3, 0.3), RATIO)
