"""The report's inputs: what ``bnnpan evaluate`` and ``bnnpan prepare`` wrote, read with clear errors.

* ``reports/<D>/<M>/metrics.json``: ``{"indices": {"rr": {...}, "fr": {...}}, "network_cost": {...},
  "setup": {...}}`` (:func:`load_metrics`). Keys this module does not know (an index added by a later
  evaluator, an ``environment`` block) are ignored, not an error; a file without the ``indices`` group
  (the older flat layout) is.
* ``reports/<D>/<M>/tiles.csv``: one row per test tile and resolution (:func:`load_tiles`), read per
  index as ``{(tile, seed): value}`` for the paired statistics (:func:`per_tile`).
* ``data/prepared/<D>/{test_rr.h5, manifest.json}``: the ground truth and PAN of one reduced-resolution
  tile (:func:`read_tile`), the tile count (:func:`n_test_tiles`), the scenes' licences
  (:func:`load_manifest`); ``reports/<D>/<M>/fused/rr_NNN.tif``: a fused tile (:func:`read_fused`).

Every problem with a file the report needs is a :class:`ValueError` that names the file and the
command that writes it (the CLI turns it into a one-line error).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio

from bnnpan.data.hdf5io import h5_errors, open_h5
from bnnpan.report import is_binary

# (key, label, higher_is_better), in table order.
METRICS: list[tuple[str, str, bool]] = [
    ("psnr", "PSNR dB", True),
    ("sam", "SAM °", False),
    ("ergas", "ERGAS", False),
    ("q2n", "Q2n", True),
    ("scc", "SCC", True),
    ("q", "Q", True),
    ("d_lambda", "D_λ", False),
    ("d_s", "D_s", False),
    ("hqnr", "HQNR", True),
    ("qnr", "QNR", True),
]
REDUCED_METRICS = ("psnr", "sam", "ergas", "q2n", "scc", "q")
FULL_METRICS = ("d_lambda", "d_s", "hqnr", "qnr")
# Full-resolution indices only some datasets have (``pan_degradation: mtf``): D_s and HQNR with an MTF-filtered,
# decimated PAN_L beside the toolbox's bicubic one. Columns of their own, shown only where some run has them.
OPTIONAL_METRICS: list[tuple[str, str, bool]] = [
    ("d_s_mtf", "D_s (MTF PAN_L)", False),
    ("hqnr_mtf", "HQNR (MTF PAN_L)", True),
]
ALL_METRICS = METRICS + OPTIONAL_METRICS
# The groups of metrics.json (bnnpan.eval.evaluate writes them; not imported, so that this stage
# depends on this file alone): indices.rr / indices.fr, network_cost (networks only), setup.
INDICES, COST, SETUP = "indices", "network_cost", "setup"
SEED_COLUMN = "seed"  # tiles.csv: the training seed of the row (optional; 0 when absent: one run per method)


def num(v: Any) -> float | None:
    """A JSON number as float; None for null, a missing value or NaN (inf is kept)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def load_metrics(path: Path) -> dict[str, Any]:
    """The metrics dictionary of one (dataset, method); a :class:`ValueError` naming ``path`` when it is
    missing, not JSON, not an object or of the older layout without the ``indices`` group."""
    if not path.is_file():
        raise ValueError(f"{path}: metrics file not found (run `bnnpan evaluate` for this dataset and method)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-run `bnnpan evaluate`") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object; re-run `bnnpan evaluate`")
    if not isinstance(data.get(INDICES), dict):
        raise ValueError(f"{path}: no `{INDICES}` group (a metrics file of an older layout); re-run `bnnpan evaluate`")
    return data


def stat(m: dict[str, Any], key: str) -> tuple[float | None, float | None]:
    """(mean, std) of index ``key`` in a metrics dictionary; None for a value not computed.

    Every index but the six reduced-resolution ones is read from ``indices.fr``."""
    group = (m.get(INDICES) or {}).get("rr" if key in REDUCED_METRICS else "fr") or {}
    v = group.get(key)
    if not isinstance(v, dict):
        return None, None
    return num(v.get("mean")), num(v.get("std"))


def setup(m: dict[str, Any]) -> dict[str, Any]:
    """The ``setup`` group of a metrics dictionary (conventions, kind, tile counts); {} when absent."""
    v = m.get(SETUP)
    return v if isinstance(v, dict) else {}


def binary_methods(methods: list[str], results: dict[str, dict[str, Any]]) -> list[str]:
    """The binary networks, in order: ``setup.kind == "network"``, not ``fp`` and not a ``bnnpan_*`` ablation."""
    return [m for m in methods if is_binary(m, setup(results[m]).get("kind") == "network")]


def load_tiles(path: Path) -> pd.DataFrame | None:
    """The per-tile indices of one (dataset, method); None when the file does not exist.

    Needs the columns ``resolution`` ("reduced" / "full") and ``tile`` (an integer); ``seed`` (an
    integer, the training seed of a network) is optional and 0 when absent, so that one
    ``(resolution, tile, seed)`` names one row. Index columns are optional (a missing one has no
    per-tile values) and columns this module does not know are ignored. A file that cannot be
    parsed, lacks a needed column or repeats a ``(resolution, tile, seed)`` is a :class:`ValueError`.
    """
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({e}); re-run `bnnpan evaluate`") from None
    missing = [c for c in ("resolution", "tile") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: needs the column(s) {missing}, has {list(df.columns)}; re-run `bnnpan evaluate`")
    if SEED_COLUMN not in df.columns:
        df[SEED_COLUMN] = 0
    for c in ("tile", SEED_COLUMN):
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any() or (v != v.round()).any():
            raise ValueError(f"{path}: column `{c}` must hold integers; re-run `bnnpan evaluate`")
        df[c] = v.astype(int)
    dup = df.duplicated(["resolution", "tile", SEED_COLUMN])
    if dup.any():
        row = df[dup].iloc[0]
        raise ValueError(f"{path}: more than one row for resolution {row['resolution']}, tile {row['tile']}, "
                         f"seed {row[SEED_COLUMN]}; re-run `bnnpan evaluate`")
    return df


def per_tile(tiles: pd.DataFrame | None, key: str) -> dict[tuple[int, int], float] | None:
    """Index ``key`` per test tile, ``{(tile, seed): value}``, from a frame of :func:`load_tiles`.

    The rows of the resolution the index is computed at: ``reduced`` for PSNR, SAM, ERGAS, Q2n, SCC
    and Q, ``full`` for D_λ, D_s, HQNR, QNR and the ``_mtf`` variants (the two are different sets of tiles).
    Missing and NaN values are left out; None when there is no frame or no column ``key`` (no per-tile values).
    """
    if tiles is None or key not in tiles.columns:
        return None
    rows = tiles[tiles["resolution"] == ("reduced" if key in REDUCED_METRICS else "full")]
    values = pd.to_numeric(rows[key], errors="coerce")
    return {(int(t), int(s)): float(v) for t, s, v in zip(rows["tile"], rows[SEED_COLUMN], values, strict=True)
            if pd.notna(v)}


def load_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: dataset manifest not found (run `bnnpan prepare`)")
    return json.loads(path.read_text())


def _decode_attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_tile(h5_path: Path, tile: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Ground truth (C x H x W), PAN (H x W) and attributes of reduced-resolution test tile ``tile``."""
    if not h5_path.is_file():
        raise ValueError(f"{h5_path}: test file not found (run `bnnpan prepare`)")
    with open_h5(h5_path) as f, h5_errors(h5_path, f"read test tile {tile}"):
        if "gt" not in f or "pan" not in f:
            raise ValueError(f"{h5_path}: needs datasets `gt` and `pan`, has {list(f)}")
        n = f["gt"].shape[0]
        if not 0 <= tile < n:
            raise ValueError(f"{h5_path}: tile {tile} out of range (the file has {n} tiles)")
        gt = np.asarray(f["gt"][tile], dtype=np.float64)
        pan = np.asarray(f["pan"][tile, 0], dtype=np.float64)
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
    return gt, pan, attrs


def read_fused(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A fused GeoTIFF as float64 ``C x H x W``; it must have the ground truth's ``shape``."""
    if not path.is_file():
        raise ValueError(f"{path}: fused tile not found (run `bnnpan evaluate`)")
    with rasterio.open(path) as src:
        a = src.read().astype(np.float64)
    if a.shape != shape:
        raise ValueError(f"{path}: shape {a.shape} does not match the ground truth {shape}")
    return a


def n_test_tiles(h5_path: Path) -> int:
    """The number of reduced-resolution test tiles in ``test_rr.h5``."""
    if not h5_path.is_file():
        raise ValueError(f"{h5_path}: test file not found (run `bnnpan prepare`)")
    with open_h5(h5_path) as f, h5_errors(h5_path, "read its tiles"):
        if "gt" not in f:
            raise ValueError(f"{h5_path}: needs dataset `gt`, has {list(f)}")
        return int(f["gt"].shape[0])


@dataclass
class Visual:
    """The inputs of the visual comparison: one reduced-resolution test tile and its fusions."""

    tile: int
    gt: np.ndarray
    pan: np.ndarray
    attrs: dict[str, Any]
    fused: dict[str, np.ndarray]


def load_visual(reports_dir: Path, prepared_dir: Path, dataset: str, methods: list[str], tile: int,
                folders: dict[str, str] | None = None) -> Visual:
    """Test tile ``tile`` of ``dataset`` (ground truth, PAN, attributes) and every method's fusion of it.

    ``folders[m]`` is the run folder of method ``m`` the fusion is read from (the first seed's run of a
    network trained with several seeds); ``m`` itself when absent."""
    gt, pan, attrs = read_tile(prepared_dir / dataset / "test_rr.h5", tile)
    folders = folders or {}
    fused = {m: read_fused(reports_dir / dataset / folders.get(m, m) / "fused" / f"rr_{tile:03d}.tif", gt.shape)
             for m in methods}
    return Visual(tile, gt, pan, attrs, fused)
