"""A method's runs (one per training seed) read and combined, and what the report says about them.

A network trained with the seeds ``[0, 1, 2]`` has three runs, each evaluated into its own folder
``reports/<D>/<run_name(m, s)>/`` (:func:`bnnpan.config.run_name`: ``m`` for seed 0, ``m_seed<s>``
otherwise); a classical method has one run, seed 0. Why combine them rather than show seed 0: one
training run of a small network is one draw from the distribution of its results, and two networks
a few hundredths of a Q2n apart can swap ranks with the seed. So:

* :func:`combine` turns the runs of one method into what the rest of the report reads for a method:
  one metrics dictionary whose mean and std are over **every (tile, seed) value** (the population std,
  as ``bnnpan evaluate`` gives over the tiles of one run), and one per-tile frame of all runs (its
  ``seed`` column keys the pairs of the paired statistics). One run is passed through unchanged, so a
  single-seed study's report is what it always was.
* :func:`seed_rows` gives the "Seeds" table: per network the mean ± std **over seeds** of the per-seed
  tile means (how much a result moves with the seed) beside the mean within-seed std over tiles (how
  much it moves from tile to tile).
* :func:`environment_line` says on which machine and library versions the compared runs were evaluated,
  and warns when their ``run_environment`` blocks differ: float results need not agree in the last
  digits across CPUs, thread counts or versions (:mod:`bnnpan.environment`).
* :func:`tiles_frame` is ``reports/metrics_tiles.csv``: every per-(tile, seed) value behind the tables.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bnnpan.config import run_name
from bnnpan.report.load import (
    ALL_METRICS,
    INDICES,
    METRICS,
    REDUCED_METRICS,
    SEED_COLUMN,
    load_metrics,
    load_tiles,
    per_tile,
    setup,
    stat,
)

BASE = {k for k, _, _ in METRICS}
ENVIRONMENT = "run_environment"  # the metrics.json block bnnpan.environment.run_environment fills
#: the indices of the "Seeds" table, in column order
SEED_INDICES = ("q2n", "ergas", "sam", "hqnr")
#: a value shared by more runs than this is named "the other N runs" in the environment warning
NAME_AT_MOST = 6


@dataclass
class Run:
    """One evaluated training run of a method: its seed, folder name, metrics.json and tiles.csv."""

    seed: int
    name: str
    metrics: dict[str, Any]
    tiles: pd.DataFrame | None

    @property
    def environment(self) -> dict[str, Any] | None:
        env = self.metrics.get(ENVIRONMENT)
        return env if isinstance(env, dict) else None


def seeds_of(method: str, seeds: Mapping[str, Sequence[int] | None] | None) -> list[int]:
    """The training seeds of ``method``: ``seeds[method]`` without duplicates, in order; [0] when not given."""
    given = (seeds or {}).get(method)
    return list(dict.fromkeys(int(s) for s in given)) if given else [0]


def load_runs(reports_dir: Path, dataset: str, method: str, seeds: Sequence[int]) -> list[Run]:
    """Every run of ``method`` on ``dataset``, in the order of ``seeds``.

    A run's ``tiles.csv`` without a ``seed`` column (or with seed 0 throughout, what :func:`load_tiles`
    gives for it) is given the run's seed; one whose ``seed`` column names another seed is a
    :class:`ValueError`, since its rows would pair with the wrong run's.
    """
    runs = []
    for s in seeds:
        name = run_name(method, s)
        folder = reports_dir / dataset / name
        tiles = load_tiles(folder / "tiles.csv")
        if tiles is not None:
            found = set(tiles[SEED_COLUMN].tolist())
            if found and found != {s}:
                if found != {0}:
                    raise ValueError(f"{folder / 'tiles.csv'}: the `seed` column holds {sorted(found)}, but this "
                                     f"is the run of seed {s}; re-run `bnnpan evaluate`")
                tiles = tiles.assign(**{SEED_COLUMN: s})
        runs.append(Run(s, name, load_metrics(folder / "metrics.json"), tiles))
    return runs


def present_indices(runs: Sequence[Run]) -> list[tuple[str, str, bool]]:
    """The indices a set of runs has: the ten of METRICS always, an optional one (``d_s_mtf``, ``hqnr_mtf``)
    when some run's metrics.json or tiles.csv has it; in :data:`ALL_METRICS` order."""
    out = []
    for key, label, up in ALL_METRICS:
        if key in BASE or any(
                key in ((r.metrics.get(INDICES) or {}).get("fr") or {})
                or (r.tiles is not None and key in r.tiles.columns) for r in runs):
            out.append((key, label, up))
    return out


def _pooled(runs: Sequence[Run], key: str) -> tuple[float | None, float | None]:
    """Mean and population std over every (tile, seed) value of ``key``: from the runs' per-tile values when
    they all have them, else pooled exactly from each run's mean, std and tile count (the law of total
    variance); (None, None) when some run has neither."""
    values = [per_tile(r.tiles, key) for r in runs]
    if all(v for v in values):
        a = np.array([x for v in values for _, x in sorted(v.items())], dtype=np.float64)
        if np.all(np.isfinite(a)):
            return float(a.mean()), float(a.std())
        return float(a.mean()), None
    stats, weights = [], []
    for r in runs:
        mean, std = stat(r.metrics, key)
        n = (setup(r.metrics).get("n_tiles") or {}).get("rr" if key in REDUCED_METRICS else "fr")
        if mean is None or std is None or not isinstance(n, int) or n <= 0:
            return None, None
        stats.append((mean, std))
        weights.append(n)
    w = np.array(weights, dtype=np.float64) / sum(weights)
    m = np.array([s[0] for s in stats])
    sd = np.array([s[1] for s in stats])
    if not np.all(np.isfinite(m)):
        return float(np.sum(w * m)), None
    mean = float(np.sum(w * m))
    return mean, float(math.sqrt(max(0.0, float(np.sum(w * (sd**2 + (m - mean) ** 2))))))


def combine(runs: Sequence[Run]) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """One method's metrics dictionary and per-tile frame from its runs (see the module docstring).

    The first run's dictionary is the base (setup, network cost, environment); each index's mean and std
    are replaced by those over all runs' (tile, seed) values, and ``setup.seeds`` lists the seeds. The
    frame is every run's rows (None when no run has a ``tiles.csv``). One run: returned as it is.
    """
    if len(runs) == 1:
        return runs[0].metrics, runs[0].tiles
    out = copy.deepcopy(runs[0].metrics)
    groups = out.setdefault(INDICES, {})
    for key, _, _ in present_indices(runs):
        mean, std = _pooled(runs, key)
        groups.setdefault("rr" if key in REDUCED_METRICS else "fr", {})[key] = {"mean": mean, "std": std}
    out.setdefault("setup", {})["seeds"] = [r.seed for r in runs]
    frames = [r.tiles for r in runs if r.tiles is not None]
    tiles = pd.concat(frames, ignore_index=True) if frames else None
    return out, tiles


# ----------------------------------------------------------------------------- the "Seeds" table


@dataclass(frozen=True)
class SeedCell:
    """One index of one network over its seeds."""

    n: int  # seeds with a value
    mean: float | None  # mean over seeds of the per-seed tile means
    std: float | None  # sample std (ddof 1) over seeds of the per-seed tile means; None with one seed
    within: float | None  # mean over seeds of the per-seed std over tiles


def seed_cell(runs: Sequence[Run], key: str) -> SeedCell:
    """The per-seed tile means (each run's metrics.json mean) of ``key``: their mean and sample std over the
    seeds, and the mean of the runs' std over tiles."""
    means, stds = [], []
    for r in runs:
        mean, std = stat(r.metrics, key)
        if mean is not None and math.isfinite(mean):
            means.append(mean)
            if std is not None and math.isfinite(std):
                stds.append(std)
    if not means:
        return SeedCell(0, None, None, None)
    a = np.array(means)
    return SeedCell(len(means), float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None,
                    float(np.mean(stds)) if stds else None)


def seed_rows(methods: Sequence[str], runs: Mapping[str, Sequence[Run]]) -> dict[str, dict[str, SeedCell]]:
    """``{network: {index: SeedCell}}`` for the networks (``setup.kind == "network"``) among ``methods``, in
    order, over :data:`SEED_INDICES`."""
    return {m: {key: seed_cell(runs[m], key) for key in SEED_INDICES} for m in methods
            if setup(runs[m][0].metrics).get("kind") == "network"}


def multi_seed(runs: Mapping[str, Sequence[Run]]) -> bool:
    """Whether any method has more than one run (the report then adds the "Seeds" table)."""
    return any(len(r) > 1 for r in runs.values())


# ----------------------------------------------------------------------------- environment


def _names(names: list[str], total: int, largest: bool) -> str:
    if largest and len(names) > NAME_AT_MOST and len(names) < total:
        return f"the other {len(names)} runs"
    return ", ".join(names)


def _value(v: Any) -> str:
    return "null" if v is None else str(v)


def environment_line(runs: Sequence[Run]) -> str:
    """One line on the compared runs' ``run_environment`` blocks (see the module docstring).

    All recorded blocks equal: "Run environment (all N runs): CPU ..., torch ..., T threads, device ...".
    Different: "⚠ runs from different environments: threads 2 (fp, bnn) vs 16 (bbcu); ...", a part per
    field that differs, the runs of each value named (the most common value, when more than
    :data:`NAME_AT_MOST` runs share it, as "the other N runs"). Runs without the block are named as
    "environment not recorded".
    """
    recorded = [r for r in runs if r.environment is not None]
    missing = [r.name for r in runs if r.environment is None]
    parts = []
    if recorded:
        fields = list(dict.fromkeys(k for r in recorded for k in r.environment))  # type: ignore[union-attr]
        differ = []
        for f in fields:
            groups: dict[str, list[str]] = {}
            for r in recorded:
                groups.setdefault(_value(r.environment.get(f)), []).append(r.name)  # type: ignore[union-attr]
            if len(groups) > 1:
                ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))  # stable: ties keep run order
                differ.append(f"{f} " + " vs ".join(
                    f"{v} ({_names(names, len(recorded), i == 0)})" for i, (v, names) in enumerate(ordered)))
        if differ:
            parts.append("⚠ runs from different environments: " + "; ".join(differ)
                         + "; float results may differ in the last digits.")
        else:
            env = recorded[0].environment or {}
            bits = [f"CPU {_value(env.get('cpu'))}", f"torch {_value(env.get('torch'))}",
                    f"numpy {_value(env.get('numpy'))}", f"{_value(env.get('threads'))} threads",
                    f"device {_value(env.get('device'))}"]
            if env.get("gpu"):
                bits.append(f"GPU {env['gpu']}")
            what = f"all {len(recorded)} runs" if not missing else f"the {len(recorded)} runs that recorded it"
            parts.append(f"Run environment ({what}): " + ", ".join(bits) + ".")
    if missing:
        parts.append(f"Environment not recorded for: {', '.join(missing)} (evaluated before bnnpan recorded it).")
    return " ".join(parts)


# ----------------------------------------------------------------------------- metrics_tiles.csv

TILE_KEYS = ["dataset", "method", "seed", "resolution", "tile"]
RESOLUTION_ORDER = {"reduced": 0, "full": 1}


def tiles_frame(order: Mapping[str, Sequence[str]], runs: Mapping[str, Mapping[str, Sequence[Run]]]) -> pd.DataFrame:
    """``metrics_tiles.csv``: one row per (dataset, method, seed, resolution, tile) of every run with a
    ``tiles.csv``: ``run`` (its folder), ``scene`` when known, and every index column present in any run
    (empty where a run lacks it). Sorted by dataset and method in report order, then seed, resolution
    (reduced first), tile, so the same inputs give the same file."""
    keys = [k for k, _, _ in present_indices([r for d in order for m in order[d] for r in runs[d][m]])]
    frames = []
    for di, d in enumerate(order):
        for mi, m in enumerate(order[d]):
            for r in runs[d][m]:
                if r.tiles is None:
                    continue
                t = r.tiles
                f = pd.DataFrame({"dataset": d, "method": m, "run": r.name, "seed": t[SEED_COLUMN].astype(int),
                                  "resolution": t["resolution"].astype(str), "tile": t["tile"].astype(int),
                                  "scene": t["scene"] if "scene" in t.columns else None})
                for k in keys:
                    f[k] = pd.to_numeric(t[k], errors="coerce") if k in t.columns else np.nan
                f["_d"], f["_m"] = di, mi
                frames.append(f)
    cols = [*TILE_KEYS[:2], "run", *TILE_KEYS[2:], "scene", *keys]
    if not frames:
        return pd.DataFrame(columns=cols)
    df = pd.concat(frames, ignore_index=True)
    df["_r"] = df["resolution"].map(RESOLUTION_ORDER).fillna(len(RESOLUTION_ORDER))
    df = df.sort_values(["_d", "_m", "seed", "_r", "resolution", "tile"], kind="mergesort")
    return df[cols].reset_index(drop=True)

