"""The report's input readers (bnnpan.report.load): clear errors, and tolerance of keys added later."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bnnpan.codedeps import code_deps
from bnnpan.report.load import (
    FULL_METRICS,
    METRICS,
    REDUCED_METRICS,
    load_metrics,
    load_tiles,
    num,
    per_tile,
    setup,
    stat,
)

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, obj: object) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_missing_metrics_names_the_file_and_the_command(tmp_path):
    with pytest.raises(ValueError, match=r"nope[/\\]metrics\.json: metrics file not found.*bnnpan evaluate"):
        load_metrics(tmp_path / "nope" / "metrics.json")


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"psnr": {"mean": 30.0, "std": 1.0}}, "no `indices` group"),
    ({"indices": [1]}, "no `indices` group"),
])
def test_malformed_metrics_is_a_clear_error(tmp_path, content, message):
    p = _write(tmp_path / "metrics.json", content)
    with pytest.raises(ValueError, match=rf"metrics\.json: {message}.*re-run `bnnpan evaluate`"):
        load_metrics(p)


def test_unknown_keys_are_tolerated(tmp_path):
    """Later evaluators add indices (d_s_mtf, hqnr_mtf) and blocks (environment): read the known, ignore the rest."""
    data = {
        "indices": {"rr": {"q2n": {"mean": 0.91, "std": 0.01}, "new_rr_index": {"mean": 3.0}},
                    "fr": {"hqnr": {"mean": 0.93, "std": 0.02}, "d_s_mtf": {"mean": 0.05, "std": 0.01},
                           "hqnr_mtf": {"mean": 0.9, "std": 0.02}},
                    "xr": {"odd": 1}},
        "environment": {"python": "3.11", "torch": "2.x", "gpu": None},
        "setup": {"kind": "network", "n_tiles": {"rr": 2, "fr": 2}},
        "something_else": [1, 2, 3],
    }
    m = load_metrics(_write(tmp_path / "metrics.json", data))
    assert stat(m, "q2n") == (0.91, 0.01)
    assert stat(m, "hqnr") == (0.93, 0.02)
    assert stat(m, "ergas") == (None, None)  # not computed
    assert setup(m)["kind"] == "network"


def test_stat_reads_the_right_group():
    """An RR index is read from indices.rr only, an FR index from indices.fr only (the same key in the other
    group must not be picked up)."""
    m = {"indices": {"rr": {"hqnr": {"mean": 1.0, "std": 0.0}, "sam": {"mean": 2.5, "std": 0.1}},
                     "fr": {"sam": {"mean": 9.0, "std": 0.0}, "hqnr": {"mean": 0.8, "std": None}}}}
    assert stat(m, "sam") == (2.5, 0.1)
    assert stat(m, "hqnr") == (0.8, None)
    assert set(REDUCED_METRICS) | set(FULL_METRICS) == {k for k, _, _ in METRICS}
    assert not set(REDUCED_METRICS) & set(FULL_METRICS)


def test_num_and_setup_edge_cases():
    assert num(None) is None and num(True) is None and num("x") is None and num(float("nan")) is None
    assert num("1.5") == 1.5 and num(3) == 3.0 and num(float("inf")) == math.inf
    assert setup({}) == {} and setup({"setup": [1]}) == {}


def test_load_tiles_absent_is_none(tmp_path):
    assert load_tiles(tmp_path / "tiles.csv") is None
    (tmp_path / "tiles.csv").write_text("resolution,tile,q2n,extra_col\nreduced,0,0.9,7\n")
    df = load_tiles(tmp_path / "tiles.csv")
    assert list(df.columns) == ["resolution", "tile", "q2n", "extra_col", "seed"] and df.q2n.iloc[0] == 0.9
    assert df.seed.tolist() == [0]  # one run per method: seed 0


@pytest.mark.parametrize(("content", "message"), [
    ("tile,q2n\n0,0.9\n", r"needs the column\(s\) \['resolution'\]"),
    ("resolution,tile,q2n\nreduced,0.5,0.9\n", "column `tile` must hold integers"),
    ("resolution,tile,q2n\nreduced,,0.9\n", "column `tile` must hold integers"),
    ("resolution,tile,q2n\nreduced,0,0.9\nfull,0,0.8\nreduced,0,0.7\n",
     "more than one row for resolution reduced, tile 0, seed 0"),
    ("", "not a readable CSV"),
])
def test_malformed_tiles_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "tiles.csv").write_text(content)
    with pytest.raises(ValueError, match=rf"tiles\.csv: {message}.*re-run `bnnpan evaluate`"):
        load_tiles(tmp_path / "tiles.csv")


def test_per_tile_pairs_by_resolution_tile_and_seed(tmp_path):
    """Reduced- and full-resolution tiles are different sets: an RR index is read from the ``reduced`` rows
    only, an FR index from the ``full`` rows only; NaN values are left out; a ``seed`` column is part of the key."""
    (tmp_path / "tiles.csv").write_text(
        "resolution,tile,scene,q2n,ergas,hqnr,d_s_mtf\n"
        "reduced,0,s,0.91,1.2,,\n"
        "reduced,1,s,0.92,,,\n"
        "full,0,s,,,0.80,0.1\n"
        "full,1,s,,,0.81,0.1\n"
        "full,2,s,,,0.82,0.1\n")
    df = load_tiles(tmp_path / "tiles.csv")
    assert per_tile(df, "q2n") == {(0, 0): 0.91, (1, 0): 0.92}
    assert per_tile(df, "ergas") == {(0, 0): 1.2}  # the NaN of tile 1 is left out
    assert per_tile(df, "hqnr") == {(0, 0): 0.80, (1, 0): 0.81, (2, 0): 0.82}
    assert per_tile(df, "sam") is None and per_tile(None, "q2n") is None  # no column / no file: no values
    (tmp_path / "seeds.csv").write_text("resolution,tile,seed,q2n\nreduced,0,0,0.9\nreduced,0,1,0.8\n"
                                        "reduced,1,1,0.7\n")
    assert per_tile(load_tiles(tmp_path / "seeds.csv"), "q2n") == {(0, 0): 0.9, (0, 1): 0.8, (1, 1): 0.7}


def test_every_report_module_is_a_dependency_of_the_report_stage():
    """DVC re-runs the report when its code changes: every module of bnnpan/report is among its derived deps."""
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "bnnpan" / "report").glob("*.py")}
    assert modules <= set(code_deps(("bnnpan", "report")))
