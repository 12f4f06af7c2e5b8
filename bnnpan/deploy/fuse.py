"""``bnnpan fuse``: apply a registered method to a whole scene, tile by tile, into a Cloud-Optimized GeoTIFF.

A method is a classical one (:mod:`bnnpan.models.classical`, built through :mod:`bnnpan.models.registry`) or a
trained network (``models/<dataset>/<method>.pt`` or any checkpoint file: :func:`load_model`). The scene is a
raw scene as ``bnnpan fetch`` writes it for every source kind (``pan.tif``, ``ms.tif``, ``scene.json``:
:func:`bnnpan.data.sources.fetch_scene`); two GeoTIFFs that are not in params go through the same fetch (a
``source: geotiff`` scene fetched into a temporary folder), so there is one reader for every source.

**Inputs, exactly as prepare makes its full-resolution test tiles** (:func:`bnnpan.data.prepare._cut_full`):
the original PAN, the original MS and ``lms = interp23(MS, R)`` with the 23-tap interpolator's circular
borders, all in DN as float64, the scene's ``scale`` and the scene's band selection (``scene.json``). The
scene (or the ``window`` asked for, on the MS grid) plays the role of one test tile: fusing the window of a
prepared ``test_fr`` tile gives the image ``evaluate`` fuses for it (``tests/test_fuse.py`` checks it).

**Tiling.** The scene is cut into cores of ``tile`` x ``tile`` PAN pixels (``tile / R`` MS pixels); each
core is computed from the pixels around it that the method reads (its halo), so the stitched image is the
single-pass one up to float rounding (tested: 1e-5 of the scale), whatever the tile size:

* ``lms`` needs the MS 12 pixels around the core (the interpolator's support is ``11 (R - 1) / R`` < 11
  MS pixels). Those rows and columns are read **modulo the scene size**, because the single-pass
  interpolator wraps circularly: a core at the scene's edge reads the opposite edge, as ``interp23`` of the
  whole scene does.
* The GLP low-pass of MTF-GLP(-HPM) (``interp23(decimate(MTF(P)))``) needs the decimated, MTF-filtered PAN
  12 MS pixels around the core (wrapped likewise), each of which needs the PAN 20 pixels around it (the 41-tap
  MTF filter), **clamped** at the scene's edges (the filter's replicate borders). GSA's ``PAN_lr`` needs the
  20 PAN pixels of the MTF filter.
* A network needs its receptive field (:func:`receptive_field`: the conv stack's radius, checked and if need
  be enlarged by an impulse test), rounded up to whole MS pixels: 6 PAN pixels for the depth-4 baselines,
  10 for XNOR-Net (its 3 x 3 K map per block). Its window is cut at the scene's edges, not padded, so the
  network's zero padding falls on the scene's edges as in a single pass. Binary activations make a network
  sensitive to float rounding (a pre-activation at 0 +- 1e-7 flips its sign): the tiled and the single-pass
  results agree to float32 rounding at one thread count, as ``evaluate``'s do; another torch thread count
  changes sums, hence signs (``bnnpan fuse`` applies params' ``threads``, as ``evaluate`` does).

**Whole-image statistics.** Every classical method but EXP uses statistics of the whole image
(:mod:`bnnpan.models.classical` computes them over its input tile): Brovey and the MTF-GLP family the mean /
std of the PAN and of ``lms`` (PAN equalisation), GSA also the regression of the degraded PAN on the MS and
the covariances of ``lms``, and the division guards of Brovey and MTF-GLP-HPM a threshold of ``1e-9`` times
the largest denominator (``max |I|``, ``max |P_L,b|``). They are computed in **streaming passes** over the
tiles before the fusion pass (means and co-moment matrices merged tile by tile with Chan et al.'s pairwise
update, maxima by ``max``), so the tiled result equals the single-pass one: no method is refused for it. The
statistics run over every pixel, nodata included, exactly as the single-pass formulas do. Passes: EXP 0,
MTF-GLP-HPM 1 (``max |P_L,b|``), Brovey / GSA / MTF-GLP 1, MTF-GLP-HPM-EQ 2 (its ``P_L,b`` depends on the
equalisation). A network with per-image statistics (BNNPan: the mean / std of each binary unit's input, CDC's
and the prior encoder's global average pools, all through :func:`bnnpan.models.imagestats.channel_moments`) is
streamed the same way, one pass per statistic in forward order: pass k runs every tile's window up to
statistic k (the earlier ones the scene's) and adds the share of its core; the fusion pass uses them all
(5 passes for a depth-2 BNNPan, 9 at depth 4; none when the scene is one tile). Its halo also covers what
each statistic's input reads (the impulse test with the statistics held), and windows start on the grid of
its coarsest statistic (16 PAN pixels: E2's pooled map). The statistics are merged in float64 and rounded
as the single pass rounds its float64 reduction, so they are the single pass's to float32 rounding (on
Momotombo at one torch thread, bit for bit: the image is off by at most 3e-8 of the scale). oneDNN picks
convolution kernels by the input's size and, with several threads, splits them by it: a tile's features can
then differ from the whole image's by float32 rounding, and a binary activation that close to its threshold
flips (a depth-2 test BNNPan at 2 threads, tiles of 160: 0.12 % of the pixels off by up to 8e-4 of the
scale). A method registered later without a tiled form here is fused in one pass when the scene fits in one
tile and refused in one line otherwise (``--tile`` can be raised).

**Memory** is bounded by the tile, not the scene: one tile's arrays with their halos, the statistics (a few
C x C matrices) and GDAL's block cache (:data:`GDAL_CACHE_MB`). Output rows are written tile by tile.
Measured (MTF-GLP-HPM, 3 bands, default tile): peak RSS 230 MB for the 668 x 934 Momotombo scene (one tile),
319 MB and 337 MB for 2672 x 3736 and 5344 x 7472 PAN mirror-tilings of it (12 and 48 tiles).
``--pan/--ms`` files go through ``fetch``, which reads them whole (as ``bnnpan fetch`` always does): that
step, not the fusion, bounds the size of two files given on the command line.

**Output**: a Cloud-Optimized GeoTIFF (GDAL's COG driver: 512 x 512 tiles, DEFLATE with a predictor,
overviews by averaging) on the PAN grid of the raw scene (``pan.tif``: the PAN's CRS, and its transform as
``fetch`` co-registers it, i.e. PAN pixel = MS pixel / R from the MS origin; for the window, shifted to it;
for WorldView-2 SpaceNet files this differs from the PAN file's own pixel size by 6e-5), one band per
MS band described by its name, in the source MS file's dtype (``--dtype float32`` for an unrounded image).
Values are clipped to ``[0, scale]`` (integer dtypes are rounded to the nearest DN). A pixel that is nodata
in the PAN or in every MS band (:func:`bnnpan.data.scene.nodata_mask`) is written as the scene's nodata value
(the file's nodata tag); a valid value equal to the nodata value (a fused 0 with nodata 0) is moved one step
into the valid range (0 -> 1 DN) so that it does not read as nodata. The fused tiles go to a temporary tiled
GeoTIFF beside the output, which GDAL then copies into the COG, itself written to a temporary name and renamed
(:mod:`bnnpan.atomic`): a failed run leaves no output file.

**Model check**: a network's training sensor, bands, ratio and scale (its checkpoint, and the prepared
dataset it was trained on) must be the scene's; anything else is a one-line :class:`FuseError`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from bnnpan.atomic import atomic_path
from bnnpan.data import wald
from bnnpan.data.scene import SceneReader, nodata_mask
from bnnpan.models import classical
from bnnpan.models.registry import KIND, MethodContext, build_method, known_methods
from bnnpan.sensors import get_sensor

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TILE", "FuseError", "check_model_fits", "fuse_scene", "load_model", "receptive_field",
           "run_fuse"]

#: Default core side of a tile, in PAN pixels (one 8-band tile with its halo: ~0.5 GB of float64 arrays).
DEFAULT_TILE = 1024
#: MS pixels of context the 23-tap interpolator needs around a window (its support is < 11 at any ratio).
INTERP_HALO = 12
#: PAN pixels of context the 41-tap MTF filter needs on each side.
MTF_MARGIN = 20
#: GDAL's raster block cache while reading and writing (MB): bounded whatever the scene's size.
GDAL_CACHE_MB = 64
#: Side of the COG's internal tiles (and of the temporary GeoTIFF's blocks).
COG_BLOCK = 512


class FuseError(ValueError):
    """A scene, method or model that cannot be fused; the message is one line naming the problem."""


# ------------------------------------------------------------------------------------------------
# reading a scene by windows
# ------------------------------------------------------------------------------------------------
def _runs(u: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of consecutive integers in the sorted, unique ``u``."""
    if u.size == 0:
        return []
    cut = np.nonzero(np.diff(u) != 1)[0] + 1
    starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [u.size]])
    return [(int(u[s]), int(u[e - 1]) + 1) for s, e in zip(starts, ends, strict=True)]


def _gather(read: Callable[[int, int, int, int], np.ndarray], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``img[..., rows, :][..., cols]`` for arbitrary in-range index arrays, reading only the runs they span.

    ``read(r0, r1, c0, c1)`` returns a contiguous block. Wrapped (``i mod h``) or clamped indices then cost one
    read per run (at most two per axis near an edge) instead of a bounding box that could span the scene.
    """
    ur, ir = np.unique(rows, return_inverse=True)
    uc, ic = np.unique(cols, return_inverse=True)
    rr, cr = _runs(ur), _runs(uc)
    block = np.concatenate([np.concatenate([read(a, b, c, d) for c, d in cr], axis=-1) for a, b in rr], axis=-2)
    if np.array_equal(ir, np.arange(len(ur))) and np.array_equal(ic, np.arange(len(uc))):
        return block
    return block[..., ir[:, None], ic[None, :]]


class _Scene:
    """A raw scene (or a window of it on the MS grid, fused as if it were the whole scene) and the quantities
    of the method inputs over any window: reads, ``lms`` and the GLP low-pass with the single-pass borders."""

    def __init__(self, reader: SceneReader, window: Sequence[int] | None = None) -> None:
        meta = reader.meta
        self.reader, self.meta = reader, meta
        self.sensor = get_sensor(meta["sensor"])
        self.R = self.sensor.ratio
        c, h, w = reader.ms_shape
        r0, c0, hh, ww = (0, 0, h, w) if window is None else (int(v) for v in window)
        if hh < 1 or ww < 1 or r0 < 0 or c0 < 0 or r0 + hh > h or c0 + ww > w:
            raise FuseError(f"{reader.dir}: window (row {r0}, col {c0}, {hh} x {ww}) is not inside the scene's "
                            f"{h} x {w} MS pixels")
        self.r0, self.c0, self.C, self.h, self.w = r0, c0, c, hh, ww
        self.H, self.W = self.R * hh, self.R * ww
        self.bands = tuple(meta["bands"])
        self.scale = float(meta.get("scale") or self.sensor.scale)
        _, self.gains = self.sensor.select(list(self.bands))
        self.nodata = meta.get("nodata")
        t = Affine(*meta["pan_transform"][:6])
        self.transform = t @ Affine.translation(self.R * c0, self.R * r0)  # the window's PAN grid
        self.crs = meta.get("crs")
        self.ctx = MethodContext(sensor=self.sensor.name, ratio=self.R, ms_gains=self.gains,
                                 pan_gain=self.sensor.pan_gain, scale=self.scale, bands=self.bands)

    # --- contiguous reads, window-relative -----------------------------------------------------
    def ms(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return self.reader.ms(self.r0 + r0, self.r0 + r1, self.c0 + c0, self.c0 + c1)

    def pan(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        R = self.R
        return self.reader.pan(R * self.r0 + r0, R * self.r0 + r1, R * self.c0 + c0, R * self.c0 + c1)

    # --- derived quantities --------------------------------------------------------------------
    def lms(self, i0: int, i1: int, j0: int, j1: int) -> np.ndarray:
        """``interp23(MS, R)`` of the whole scene on the PAN pixels of MS rows [i0, i1) x columns [j0, j1).

        The MS ``INTERP_HALO`` pixels around the window are read modulo the scene size (the interpolator's
        circular borders), interpolated, and the window cut out: the single-pass values.
        """
        s = INTERP_HALO
        rows = np.arange(i0 - s, i1 + s) % self.h
        cols = np.arange(j0 - s, j1 + s) % self.w
        up = wald.interp23(_gather(self.ms, rows, cols), self.R)
        R = self.R
        return up[:, R * s : R * (s + i1 - i0), R * s : R * (s + j1 - j0)]

    def lowres(self, rows: np.ndarray, cols: np.ndarray, bands: Callable[[np.ndarray], np.ndarray],
               gains: Sequence[float], unit_dc: bool) -> np.ndarray:
        """``decimate(MTF_b(bands(PAN)) [/ DC_b], R)`` of the whole scene at the MS pixels ``rows`` x ``cols``.

        ``bands`` maps a PAN block to the (C', ...) images to filter (e.g. the equalised PAN per band), so
        pixel-wise transforms with whole-scene statistics need no second array. Each run of MS indices is
        computed from the PAN it covers plus the filter's 20-pixel margins, whose indices are clamped to the
        scene (the filter's replicate borders): the single-pass values up to FFT rounding.
        """
        R, m = self.R, MTF_MARGIN
        gains = list(gains)
        dc = np.array([_mtf_kernel(g, R).sum() for g in gains]) if unit_dc else None
        ur, ir = np.unique(rows, return_inverse=True)
        uc, ic = np.unique(cols, return_inverse=True)
        blocks = []
        for a, b in _runs(ur):
            rowblocks = []
            hr = np.clip(np.arange(R * a - m, R * b + m), 0, self.H - 1)
            for c, d in _runs(uc):
                hc = np.clip(np.arange(R * c - m, R * d + m), 0, self.W - 1)
                img = bands(_gather(self.pan, hr, hc))
                low = wald.mtf_filter(img, gains, R, 2 * m + 1, padded=True)
                if dc is not None:
                    low = low / dc[:, None, None]
                rowblocks.append(wald.decimate(low, R))
            blocks.append(np.concatenate(rowblocks, axis=-1))
        out = np.concatenate(blocks, axis=-2)
        return out[..., ir[:, None], ic[None, :]]

    def glp(self, i0: int, i1: int, j0: int, j1: int, bands: Callable[[np.ndarray], np.ndarray],
            gains: Sequence[float], unit_dc: bool = True) -> np.ndarray:
        """:func:`bnnpan.models.classical.glp_lowpass` of ``bands(PAN)`` over the whole scene, on the PAN
        pixels of MS rows [i0, i1) x columns [j0, j1): the decimated low-pass ``INTERP_HALO`` MS pixels around
        the window (wrapped, as ``interp23`` wraps), interpolated, the window cut out."""
        s, R = INTERP_HALO, self.R
        rows = np.arange(i0 - s, i1 + s) % self.h
        cols = np.arange(j0 - s, j1 + s) % self.w
        up = wald.interp23(self.lowres(rows, cols, bands, gains, unit_dc), R)
        return up[:, R * s : R * (s + i1 - i0), R * s : R * (s + j1 - j0)]


@functools.lru_cache(maxsize=64)
def _mtf_kernel(gain: float, ratio: int) -> np.ndarray:
    """:func:`bnnpan.data.wald.mtf_kernel` (41 taps), computed once per gain and ratio."""
    k = wald.mtf_kernel(gain, ratio, 2 * MTF_MARGIN + 1)
    k.flags.writeable = False
    return k


@dataclass
class _Tile:
    """One core of the scene: MS rows [i0, i1) x columns [j0, j1), PAN ``R`` times that."""

    scene: _Scene
    i0: int
    i1: int
    j0: int
    j1: int

    @property
    def pan_window(self) -> tuple[int, int, int, int]:
        R = self.scene.R
        return R * self.i0, R * self.i1, R * self.j0, R * self.j1

    @cached_property
    def pan(self) -> np.ndarray:
        return self.scene.pan(*self.pan_window)

    @cached_property
    def ms(self) -> np.ndarray:
        return self.scene.ms(self.i0, self.i1, self.j0, self.j1)

    @cached_property
    def lms(self) -> np.ndarray:
        return self.scene.lms(self.i0, self.i1, self.j0, self.j1)

    def glp(self, bands: Callable[[np.ndarray], np.ndarray], gains: Sequence[float]) -> np.ndarray:
        return self.scene.glp(self.i0, self.i1, self.j0, self.j1, bands, gains)

    def pan_lr(self, gain: float) -> np.ndarray:
        """``decimate(MTF_PAN(PAN))`` on the core's MS pixels (GSA's degraded PAN), (h, w)."""
        return self.scene.lowres(np.arange(self.i0, self.i1), np.arange(self.j0, self.j1), lambda p: p[None],
                                 [gain], unit_dc=False)[0]


# ------------------------------------------------------------------------------------------------
# whole-image statistics, streamed
# ------------------------------------------------------------------------------------------------
class _Moments:
    """Mean, co-moment matrix and largest magnitude of k variables, merged batch by batch.

    Chan, Golub & LeVeque's pairwise update: for batches A and B, ``n = n_A + n_B``,
    ``d = mean_B - mean_A``, ``mean = mean_A + d n_B / n`` and ``M = M_A + M_B + d d^T n_A n_B / n``, where
    ``M = sum (x - mean)(x - mean)^T``; the population covariance is ``M / n`` (the ddof = 0 of the
    classical methods). Each batch is centred on its own mean first, so no large sums cancel.
    """

    def __init__(self, k: int) -> None:
        self.n = 0
        self.mean = np.zeros(k)
        self.m2 = np.zeros((k, k))
        self.absmax = np.zeros(k)

    def add(self, x: np.ndarray) -> None:
        """Add the samples of ``x`` (k, ...) (every axis after the first is flattened)."""
        x = np.asarray(x, dtype=np.float64).reshape(len(self.mean), -1)
        nb = x.shape[1]
        if nb == 0:
            return
        mb = x.mean(axis=1)
        xc = x - mb[:, None]
        mb2 = xc @ xc.T
        self.absmax = np.maximum(self.absmax, np.abs(x).max(axis=1))
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, mb2
            return
        n = self.n + nb
        d = mb - self.mean
        self.mean = self.mean + d * (nb / n)
        self.m2 = self.m2 + mb2 + np.outer(d, d) * (self.n * nb / n)
        self.n = n

    @property
    def cov(self) -> np.ndarray:
        return self.m2 / self.n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(np.diag(self.m2) / self.n, 0.0))


@dataclass(frozen=True)
class _Equalizer:
    """:func:`bnnpan.models.classical.equalize` with whole-scene statistics: ``(P - mean P) s + mean T`` with
    ``s = std T / std P``, or 0 for a flat PAN (``std P <= 1e-12 max |P|``)."""

    pan_mean: float
    scale: float
    target_mean: float

    @classmethod
    def of(cls, pan: _Moments, target_mean: float, target_std: float) -> _Equalizer:
        s_p, m_p = float(pan.std[0]), float(pan.mean[0])
        flat = s_p <= 1e-12 * float(pan.absmax[0]) if pan.n else True
        return cls(m_p, 0.0 if flat else float(target_std) / s_p, float(target_mean))

    def __call__(self, pan: np.ndarray) -> np.ndarray:
        return (pan - self.pan_mean) * self.scale + self.target_mean


def _safe_ratio(num: np.ndarray, den: np.ndarray, den_absmax: float) -> np.ndarray:
    """:func:`bnnpan.models.classical._safe_ratio` with the threshold from the whole scene's ``max |den|``."""
    ok = den > classical.GLP_EPS * den_absmax
    out = np.ones_like(num)
    np.divide(num, den, out=out, where=ok)
    return out


# ------------------------------------------------------------------------------------------------
# tiled forms of the methods
# ------------------------------------------------------------------------------------------------
class _TiledMethod:
    """A method in tiled form: ``passes`` streaming passes of :meth:`accumulate` over every tile (whole-scene
    statistics, closed by :meth:`end_pass`), then :meth:`fuse` of each tile's core. ``halo``: PAN pixels of
    context around a core (reported; the reads take what they need)."""

    name = ""
    passes = 0
    halo = 0
    #: the tiles must be the whole scene (a method that cannot be tiled: single pass)
    single_pass = False

    def accumulate(self, k: int, t: _Tile) -> None:  # pragma: no cover - methods without passes
        raise NotImplementedError

    def end_pass(self, k: int) -> None:
        pass

    def fuse(self, t: _Tile) -> np.ndarray:
        raise NotImplementedError


_GLP_HALO_LR = INTERP_HALO  # MS pixels of decimated low-pass around a core ...
_GLP_HALO_PAN = MTF_MARGIN  # ... each with the MTF filter's PAN margin


class _Exp(_TiledMethod):
    """EXP: ``F = lms``; no statistics."""

    def __init__(self, m: classical.Exp, ratio: int) -> None:
        self.name, self.halo = m.name, INTERP_HALO * ratio

    def fuse(self, t: _Tile) -> np.ndarray:
        return t.lms


class _Brovey(_TiledMethod):
    """Brovey: one pass for mean / std / max of the PAN and of ``I = mean_b lms_b``."""

    passes = 1

    def __init__(self, m: classical.Brovey, ratio: int) -> None:
        self.name, self.halo = m.name, INTERP_HALO * ratio
        self.pan_m, self.int_m = _Moments(1), _Moments(1)

    def accumulate(self, k: int, t: _Tile) -> None:
        self.pan_m.add(t.pan[None])
        self.int_m.add(t.lms.mean(axis=0)[None])

    def end_pass(self, k: int) -> None:
        self.eq = _Equalizer.of(self.pan_m, self.int_m.mean[0], self.int_m.std[0])

    def fuse(self, t: _Tile) -> np.ndarray:
        intensity = t.lms.mean(axis=0)
        gain = _safe_ratio(self.eq(t.pan), intensity, float(self.int_m.absmax[0]))
        return t.lms * gain[None]


class _Gsa(_TiledMethod):
    """GSA: one pass for the co-moments of ``[MS, PAN_lr]`` on the MS grid (the regression), of ``lms`` and of
    the PAN; then, with ``C = cov(lms)``: ``w = cov(MS)^+ cov(MS, PAN_lr)`` (the least squares of the
    zero-mean data; its intercept is 0), ``std I = sqrt(w^T C w)``, ``g = C w / (w^T C w)``."""

    passes = 1

    def __init__(self, m: classical.Gsa, ratio: int, c: int) -> None:
        if m.pan_degradation != "mtf":
            raise FuseError(f"method {m.name}: no tiled form for pan_degradation={m.pan_degradation!r}")
        self.name, self.pan_gain, self.c = m.name, m.pan_gain, c
        self.halo = max(INTERP_HALO * ratio, MTF_MARGIN)
        self.lr_m, self.lms_m, self.pan_m = _Moments(c + 1), _Moments(c), _Moments(1)

    def accumulate(self, k: int, t: _Tile) -> None:
        self.lr_m.add(np.concatenate([t.ms, t.pan_lr(self.pan_gain)[None]]))
        self.lms_m.add(t.lms)
        self.pan_m.add(t.pan[None])

    def end_pass(self, k: int) -> None:
        c = self.c
        m = self.lr_m.m2
        self.w, *_ = np.linalg.lstsq(m[:c, :c], m[:c, c], rcond=None)
        self.w0 = 0.0  # zero-mean target on zero-mean regressors: the intercept of the least squares
        cov = self.lms_m.cov
        cw = cov @ self.w
        var_i = float(self.w @ cw)
        self.eq = _Equalizer.of(self.pan_m, self.w0, math.sqrt(max(var_i, 0.0)))
        lms_max = float(self.lms_m.absmax.max())
        self.g = cw / var_i if math.sqrt(max(var_i, 0.0)) > 1e-12 * lms_max else np.zeros(c)

    def fuse(self, t: _Tile) -> np.ndarray:
        means = self.lms_m.mean[:, None, None]
        lms0 = t.lms - means
        intensity = np.tensordot(self.w, lms0, axes=1) + self.w0
        detail = self.eq(t.pan) - intensity
        return lms0 + self.g[:, None, None] * detail[None] + means


class _Glp(_TiledMethod):
    """MTF-GLP (additive) and MTF-GLP-HPM (multiplicative), raw or mean/std-equalised PAN.

    Passes: the equalisation's mean / std of the PAN and of each ``lms`` band (if equalised), then for HPM
    ``max |P_L,b|`` of the division guard (which needs the equalisation).
    """

    def __init__(self, m: classical.MtfGlp | classical.MtfGlpHpm, ratio: int, c: int) -> None:
        self.name, self.c = m.name, c
        self.halo = _GLP_HALO_LR * ratio + _GLP_HALO_PAN
        self.hpm = isinstance(m, classical.MtfGlpHpm)
        self.equalized = m.equalization == "mean_std"
        if not m.unit_dc:
            raise FuseError(f"method {m.name}: no tiled form for unit_dc=False")
        self.gains = classical._gains_for(m.ms_gains, c, m.name)
        self.passes = int(self.equalized) + int(self.hpm)
        self.pan_m, self.lms_m = _Moments(1), _Moments(c)
        self.lp_max = np.zeros(c)
        self.eqs: list[_Equalizer] = []

    def bands(self, pan: np.ndarray) -> np.ndarray:
        """The PAN as each band sees it: equalised to the band (whole-scene statistics), or repeated."""
        if not self.equalized:
            return np.repeat(pan[None], self.c, axis=0)
        return np.stack([eq(pan) for eq in self.eqs])

    def lowpass(self, t: _Tile) -> np.ndarray:
        """``P_L,b`` on the core; with the raw PAN every band with the same gain has the same one: computed once."""
        if self.equalized:
            return t.glp(self.bands, self.gains)
        unique = sorted(set(self.gains))
        lp = t.glp(lambda p: np.repeat(p[None], len(unique), axis=0), unique)
        return lp[[unique.index(g) for g in self.gains]]

    def accumulate(self, k: int, t: _Tile) -> None:
        if self.equalized and k == 0:
            self.pan_m.add(t.pan[None])
            self.lms_m.add(t.lms)
        else:  # the HPM guard's max |P_L,b|
            self.lp_max = np.maximum(self.lp_max, np.abs(self.lowpass(t)).max(axis=(1, 2)))

    def end_pass(self, k: int) -> None:
        if self.equalized and k == 0:
            self.eqs = [_Equalizer.of(self.pan_m, self.lms_m.mean[b], self.lms_m.std[b]) for b in range(self.c)]

    def fuse(self, t: _Tile) -> np.ndarray:
        pan_eq = self.bands(t.pan)
        pan_lp = self.lowpass(t)
        if not self.hpm:
            return t.lms + (pan_eq - pan_lp)
        out = np.empty_like(t.lms)
        for b in range(self.c):
            out[b] = t.lms[b] * _safe_ratio(pan_eq[b], pan_lp[b], float(self.lp_max[b]))
        return out


def _tiled_classical(name: str, ctx: MethodContext) -> tuple[_TiledMethod, Any]:
    """The tiled form of registered method ``name`` (from the instance the registry builds, so its settings
    are the evaluated ones), or a single-pass wrapper when there is none."""
    m = build_method(name, ctx)
    c = len(ctx.bands)
    if type(m) is classical.Exp:
        return _Exp(m, ctx.ratio), m
    if type(m) is classical.Brovey:
        return _Brovey(m, ctx.ratio), m
    if type(m) is classical.Gsa and m.pan_degradation == "mtf":
        return _Gsa(m, ctx.ratio, c), m
    if type(m) in (classical.MtfGlp, classical.MtfGlpHpm) and m.unit_dc:
        return _Glp(m, ctx.ratio, c), m
    return _SinglePass(name, m.fuse), m


class _SinglePass(_TiledMethod):
    """A method without a tiled form: ``fuse(lms, pan, ms)`` on the whole scene (one tile) or refused."""

    single_pass = True

    def __init__(self, name: str, fuse: Callable[..., np.ndarray], why: str = "has no tiled form") -> None:
        self.name, self._fuse, self.why = name, fuse, why

    def fuse(self, t: _Tile) -> np.ndarray:
        return np.asarray(self._fuse(t.lms, t.pan, t.ms), dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# networks
# ------------------------------------------------------------------------------------------------
def _conv_bound(model: Any) -> tuple[int, int]:
    """``(radius, stride)``: the receptive-field radius (input pixels) the conv stack allows, and the product of
    its strides. Every conv / pooling layer is counted as if in series (an upper bound for parallel
    branches); XNOR-Net's K map (``F.avg_pool2d``, not a module) by its ``window``; strided layers
    multiply the bound by their stride (conservative)."""
    from torch import nn

    from bnnpan.models.layers import XNORBlock

    r, stride = 0, 1
    for mod in model.modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            k, d, s = mod.kernel_size, mod.dilation, mod.stride
            r += max((di * (ki - 1) + 1) // 2 for ki, di in zip(k, d, strict=True))
            stride *= max(s)
        elif isinstance(mod, (nn.AvgPool2d, nn.MaxPool2d)):
            ks = mod.kernel_size if isinstance(mod.kernel_size, int) else max(mod.kernel_size)
            st = mod.stride if isinstance(mod.stride, int) else max(mod.stride or (ks,))
            r += ks // 2
            stride *= st
        elif isinstance(mod, XNORBlock):
            r += mod.window // 2
    return r * stride, stride


def _reach(diff: Any, c: int, f: int = 1) -> int:
    """Largest Chebyshev distance (input pixels) from pixel ``c, c`` to a pixel of a changed feature (``diff`` > 0,
    (H, W) on a grid of ``f`` input pixels per feature pixel); -1 when nothing changed."""
    import torch

    ys, xs = torch.nonzero(diff > 0, as_tuple=True)
    if ys.numel() == 0:
        return -1
    ext = [(v * f - c).abs().max() for v in (ys, xs)] + [(v * f + f - 1 - c).abs().max() for v in (ys, xs)]
    return int(torch.stack(ext).max())


def _impulse_radius(model: Any, channels: int, n: int) -> tuple[int, int]:
    """``(output reach, statistics reach)`` of an impulse at the centre of an ``n x n`` input, in float64 on the CPU
    (any change counts: no rounding hides one): the largest distance (Chebyshev, pixels) at which the output
    changes, and at which the input of a per-image statistic (:mod:`bnnpan.models.imagestats`) changes, plus
    twice its grid (the slack of a tile's share of a coarse feature map). The statistics themselves are held
    at the unperturbed input's, so what is measured is the reach of everything else: what a tile's halo must
    hold once the statistics are the scene's."""
    import torch

    from bnnpan.models import imagestats

    m = copy.deepcopy(model).to("cpu", torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    lms = 0.2 + 0.4 * torch.rand((1, channels, n, n), generator=g, dtype=torch.float64)
    pan = 0.2 + 0.4 * torch.rand((1, 1, n, n), generator=g, dtype=torch.float64)
    c = n // 2
    lms2, pan2 = lms.clone(), pan.clone()
    lms2[..., c, c] += 0.3  # a large step: binary activations flip around it, as the conv stack lets them
    pan2[..., c, c] += 0.3
    with torch.no_grad():
        with imagestats.recording() as rec:
            m(lms, pan)
        frozen = imagestats.SceneStats(known=[(mu, var) for _, mu, var, _ in rec])
        whole = imagestats.Window((0, 0), (0, n, 0, n))
        cap_a: list = []
        cap_b: list = []
        with imagestats.streaming(frozen, whole, cap_a):
            a = m(lms, pan)
        with imagestats.streaming(frozen, whole, cap_b):
            b = m(lms2, pan2)
    out = _reach((a - b).abs().amax(dim=(0, 1)), c)
    stats = -1
    for (mod, xa), (_, xb) in zip(cap_a, cap_b, strict=True):
        f = int(getattr(mod, "stat_stride", 1))
        r = _reach((xa - xb).abs().amax(dim=(0, 1)), c, f)
        if r >= 0:
            stats = max(stats, r + 2 * f)
    return max(out, 0), max(stats, 0)


def stat_strides(model: Any, channels: int) -> list[int]:
    """The grid (``stat_stride``) of each per-image statistic of ``model``'s forward pass, in order (empty for a
    local network): one streaming pass each when a scene is fused in several tiles."""
    import torch

    from bnnpan.models import imagestats

    p = next(model.parameters())
    n = 64
    with torch.no_grad(), imagestats.recording() as rec:
        model(torch.full((1, channels, n, n), 0.5, dtype=p.dtype, device=p.device),
              torch.full((1, 1, n, n), 0.5, dtype=p.dtype, device=p.device))
    return [int(getattr(mod, "stat_stride", 1)) for mod, *_ in rec]


def receptive_field(model: Any, channels: int) -> int | None:
    """The radius in PAN pixels of the input a tile's core needs around it, or None when a change reaches
    arbitrarily far (an operation over the whole image that does not go through
    :func:`bnnpan.models.imagestats.channel_moments`).

    The conv stack's radius (:func:`_conv_bound`) is checked by an impulse test (:func:`_impulse_radius`, per-image
    statistics held fixed) on an input wider than twice that: a change farther out means operations the stack
    does not show (functional filters, strided branches). If the change reaches the input's edge, the test is
    repeated on an input twice as wide; reaching that edge too means a global operation (None). Otherwise the
    larger of the radii is returned.
    """
    bound, _ = _conv_bound(model)
    n = 32 * math.ceil((2 * bound + 34) / 32)
    for _ in range(2):
        r_out, r_stats = _impulse_radius(model, channels, n)
        if r_out < n // 2 - 1 and r_stats < n // 2 - 1:
            return max(bound, r_out, r_stats)
        n *= 2
    return None


class _Network(_TiledMethod):
    """A trained network: each core with ``halo`` PAN pixels of context (its receptive field), its window cut
    at the scene's edges (the network's own zero padding then falls there, as in one pass).

    A network with per-image statistics (BNNPan) needs one streaming pass per statistic, in forward order
    (:mod:`bnnpan.models.imagestats`): pass k runs each tile up to statistic k, with 0..k-1 the scene's, and
    adds its core's share; the fusion pass then uses all of them. A scene in one tile needs none.
    """

    def __init__(self, model: Any, meta: dict[str, Any], ratio: int, device: Any) -> None:
        import torch

        from bnnpan.models import imagestats

        self.model, self.meta = model, meta
        self.name = str(meta.get("method") or "network")
        self.scale = float(meta["scale"])
        self.device = next(model.parameters()).device if device is None else torch.device(device)
        self.model.to(self.device).eval()
        channels = int(meta.get("in_channels") or len(meta.get("bands") or ()))
        rf = receptive_field(model, channels)
        strides = stat_strides(model, channels)
        self.passes = len(strides)
        self.stats = imagestats.SceneStats()
        _, stride = _conv_bound(model)
        align = math.lcm(stride, *strides)  # PAN pixels: windows start on the strided layers' grid
        self.align_lr = align // math.gcd(align, ratio)
        if rf is None:
            self.single_pass, self.why = True, ("changes everywhere when one pixel does, through an operation on the "
                                                "whole image that is not streamed, so it cannot be tiled exactly")
            self.halo_lr = 0
        else:
            self.halo_lr = self.align_lr * math.ceil(math.ceil(rf / ratio) / self.align_lr)
        self.halo = self.halo_lr * ratio

    def one_tile(self) -> None:
        """The scene is one tile: its own statistics are the scene's, no pass needed."""
        self.passes = 0

    def _window(self, t: _Tile) -> tuple[tuple[int, int, int, int], Any]:
        from bnnpan.models import imagestats

        s, R, hn = t.scene, t.scene.R, self.halo_lr
        ia, ib, ja, jb = max(0, t.i0 - hn), min(s.h, t.i1 + hn), max(0, t.j0 - hn), min(s.w, t.j1 + hn)
        where = imagestats.Window((R * ia, R * ja), (R * t.i0, R * t.i1, R * t.j0, R * t.j1))
        return (ia, ib, ja, jb), where

    def _run(self, t: _Tile, stream: bool) -> np.ndarray | None:
        """:meth:`bnnpan.models.checkpoint.NetworkFuser.fuse`'s arithmetic (float32 inputs divided by the scale)
        on the tile's window; with ``stream``, inside the scene's statistics (None when the pass stops early)."""
        import torch

        from bnnpan.models import imagestats

        s, R = t.scene, t.scene.R
        (ia, ib, ja, jb), where = self._window(t)

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / self.scale).to(self.device)

        lms, pan = tensor(s.lms(ia, ib, ja, jb))[None], tensor(s.pan(R * ia, R * ib, R * ja, R * jb))[None, None]
        out = None
        ctx = imagestats.streaming(self.stats, where) if stream else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            out = self.model(lms, pan)[0]
        if out is None:
            return None
        out = out.double().cpu().numpy() * self.scale
        return out[:, R * (t.i0 - ia) : R * (t.i1 - ia), R * (t.j0 - ja) : R * (t.j1 - ja)]

    def accumulate(self, k: int, t: _Tile) -> None:
        if self.stats.closed != k:
            raise RuntimeError(f"statistics pass {k} of {self.name} with {self.stats.closed} closed")
        if self._run(t, stream=True) is not None:
            raise FuseError(f"network {self.name}: pass {k + 1} reached no per-image statistic (the model's "
                            "statistics differ between inputs?)")

    def end_pass(self, k: int) -> None:
        self.stats.close()

    def fuse(self, t: _Tile) -> np.ndarray:
        return self._run(t, stream=self.passes > 0)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def _training_data(prepared: Path, dataset: str) -> dict[str, Any] | None:
    """Sensor, bands, ratio and scale of a prepared dataset (its manifest, else its train.h5 attributes)."""
    d = Path(prepared) / dataset
    if (d / "manifest.json").is_file():
        m = json.loads((d / "manifest.json").read_text())
    elif (d / "train.h5").is_file():
        from bnnpan.data.hdf5io import read_attrs

        m = read_attrs(d / "train.h5")
    else:
        return None
    return {"sensor": m["sensor"], "bands": list(m["bands"]), "ratio": int(m["ratio"]), "scale": float(m["scale"]),
            "trained_on": dataset}


def load_model(source: str | Path | tuple[str, str], device: Any = "cpu", *, models: str | Path = "models",
               prepared: str | Path = "data/prepared", dataset: str | None = None, seed: int = 0
               ) -> tuple[Any, dict[str, Any]]:
    """Load a trained network for fusion: ``(model in eval mode, meta)``.

    ``source`` is a file, or ``(dataset, method)`` for ``<models>/<dataset>/<run_name(method, seed)>.pt``.
    ``meta`` holds ``method``, ``network``, ``in_channels``, ``ratio``, ``scale`` (from the checkpoint) and
    ``sensor``, ``bands``, ``trained_on`` (from the prepared dataset it was trained on: ``dataset``, else the
    checkpoint's folder name when ``<prepared>/<folder>`` exists; None when unknown), ``source`` (the file).

    A torch checkpoint (a zip archive, read with ``weights_only=True`` by
    :func:`bnnpan.models.checkpoint.load_network`) is the only format read here; any other file is handed to
    ``bnnpan.deploy.export.load_exported`` (the self-describing exported format), which returns the same keys.
    """
    from bnnpan.config import run_name
    from bnnpan.train.loop import CheckpointError

    if isinstance(source, tuple):
        dataset, method = source
        path = Path(models) / dataset / f"{run_name(method, seed)}.pt"
    else:
        path = Path(source)
    if not path.is_file():
        hint = ""
        if isinstance(source, tuple):
            hint = f" (train it: `bnnpan train --dataset {dataset} --method {source[1]}`)"
        raise CheckpointError(f"{path}: model file not found{hint}")
    if zipfile.is_zipfile(path):
        from bnnpan.models.checkpoint import load_network

        model, ckpt = load_network(path, device)
        net = dict(ckpt["net"])
        meta: dict[str, Any] = {
            "method": str(net.get("method") or net["name"]), "network": str(net["name"]),
            "in_channels": int(net["in_channels"]), "ratio": int(net.get("ratio", 4)), "scale": float(ckpt["scale"]),
            "sensor": None, "bands": None, "trained_on": None, "source": str(path),
        }
        ds = dataset or (path.parent.name if (Path(prepared) / path.parent.name).is_dir() else None)
        data = _training_data(Path(prepared), ds) if ds else None
        if data is None:
            where = f"{Path(prepared) / ds} is not here" if ds else "unknown: pass --dataset"
            log.warning("%s: the prepared dataset it was trained on (%s) tells its sensor and band names: only its "
                        "band count, ratio and scale can be checked", path, where)
        else:
            for k in ("ratio", "scale"):
                if data[k] != meta[k]:
                    raise FuseError(f"{path}: the checkpoint's {k} {meta[k]:g} differs from its training dataset "
                                    f"{ds}'s {data[k]:g}")
            meta.update(data)
        return model, meta
    try:
        from bnnpan.deploy.export import load_exported  # the exported format (bnnpan export)
    except ImportError:
        raise FuseError(f"{path}: not a bnnpan checkpoint (a torch zip archive)") from None
    model, meta = load_exported(path, device)
    meta = dict(meta)
    meta.setdefault("source", str(path))
    meta.setdefault("in_channels", len(meta.get("bands") or ()))
    meta.setdefault("network", str(meta["net"]["name"]))
    return model, meta


def _describe(sensor: Any, bands: Any, ratio: Any, scale: Any) -> str:
    # no square brackets: the CLI prints errors through rich, which would read "[blue,...]" as markup
    b = ",".join(bands) if bands else f"{len(bands or ())} unnamed"
    return f"{sensor or 'unknown sensor'} (bands {b}, ratio {ratio}, scale {float(scale):g})"


def check_model_fits(meta: dict[str, Any], sensor: str, bands: Sequence[str], ratio: int, scale: float) -> None:
    """A one-line :class:`FuseError` unless the model was trained on this sensor, bands, ratio and scale."""
    wrong = []
    if meta.get("sensor") and meta["sensor"] != sensor:
        wrong.append("sensor")
    if meta.get("bands") is not None and list(meta["bands"]) != list(bands):
        wrong.append("bands")
    elif int(meta.get("in_channels") or len(bands)) != len(bands):
        wrong.append("band count")
    if int(meta["ratio"]) != int(ratio):
        wrong.append("ratio")
    if float(meta["scale"]) != float(scale):
        wrong.append("scale")
    if wrong:
        raise FuseError(
            f"model {meta.get('method')} ({meta.get('source')}) was trained on "
            f"{_describe(meta.get('sensor'), meta.get('bands'), meta['ratio'], meta['scale'])} but the scene is "
            f"{_describe(sensor, bands, ratio, scale)}: {', '.join(wrong)} differ")


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _to_output(fused: np.ndarray, mask: np.ndarray | None, dtype: np.dtype, scale: float,
               nodata: float | None) -> np.ndarray:
    """Clip to [0, scale] (round for integer dtypes), nodata where ``mask``, valid values off the nodata value."""
    integer = np.issubdtype(dtype, np.integer)
    out = np.nan_to_num(fused, nan=0.0, posinf=scale, neginf=0.0)
    out = np.clip(out, 0.0, scale)
    if integer:
        out = np.rint(out)
    if nodata is not None and not math.isnan(nodata):
        if 0.0 <= nodata <= scale:  # a valid pixel could carry the nodata value: move it one step inside
            step = 1.0 if integer else float(np.spacing(np.float32(max(abs(nodata), 1.0))))
            clash = out == nodata
            if mask is not None:
                clash &= ~mask[None]
            out[clash] = nodata + step if nodata + step <= scale else nodata - step
        if mask is not None:
            out[:, mask] = nodata
    elif nodata is not None and mask is not None:  # NaN nodata (float outputs only)
        out[:, mask] = np.nan
    return out.astype(dtype)


def _tiles(h: int, w: int, t: int) -> list[tuple[int, int, int, int]]:
    return [(i, min(h, i + t), j, min(w, j + t)) for i in range(0, h, t) for j in range(0, w, t)]


def fuse_scene(scene_dir: str | Path, out: str | Path, *, method: str | None = None,
               model: tuple[Any, dict[str, Any]] | None = None, window: Sequence[int] | None = None,
               tile: int = DEFAULT_TILE, dtype: str = "source", device: Any = None,
               progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Fuse the raw scene in ``scene_dir`` (or its MS-grid ``window`` = row, col, height, width) into the COG ``out``.

    ``method``: a registered (classical) method; or ``model``: ``(network, meta)`` from :func:`load_model`.
    ``tile``: core side in PAN pixels (rounded down to whole MS pixels); ``dtype``: ``source`` (the MS
    file's) or a numpy dtype name such as ``float32``. Returns a summary (method, kind, shape, tiles, halo,
    passes, dtype, nodata, seconds). ``progress(message, done, total)`` is called after each tile of each pass.
    """
    t_start = time.perf_counter()
    scene_dir, out = Path(scene_dir), Path(out)
    if (method is None) == (model is None):
        raise FuseError("give a registered method or a trained model (not both)")
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), SceneReader(scene_dir, GDAL_CACHE_MB) as reader:
        scene = _Scene(reader, window)
        with rasterio.open(scene_dir / "ms.tif") as src:
            src_dtype = np.dtype(src.dtypes[0])
        out_dtype = src_dtype if dtype == "source" else np.dtype(dtype)
        if model is not None:
            net, meta = model
            check_model_fits(meta, scene.sensor.name, scene.bands, scene.R, scene.scale)
            oracle = getattr(getattr(net, "switches", None), "ldpc", "") == "oracle"
            if getattr(net, "needs_reference", False) or oracle:
                raise FuseError(f"{meta.get('method')} needs the reference image (oracle prior): reduced resolution "
                                "only, it cannot fuse a scene")
            tm: _TiledMethod = _Network(net, meta, scene.R, device)
            kind = "network"
        else:
            if method not in known_methods():
                raise FuseError(f"unknown method {method!r}; registered methods: {', '.join(known_methods())} "
                                "(a trained network: --dataset/--model)")
            tm, _ = _tiled_classical(method, scene.ctx)
            kind = KIND.get(method, "classical")
        R = scene.R
        align = getattr(tm, "align_lr", 1)
        t_lr = max(1, int(tile) // R)
        t_lr = max(align, t_lr // align * align)
        cores = _tiles(scene.h, scene.w, t_lr)
        if len(cores) == 1 and hasattr(tm, "one_tile"):
            tm.one_tile()
        if tm.single_pass and len(cores) > 1:
            raise FuseError(f"method {tm.name} {getattr(tm, 'why', 'has no tiled form')}; the scene "
                            f"({scene.H} x {scene.W} PAN pixels) is larger than one tile ({R * t_lr}): fuse it in "
                            f"one pass with --tile {R * max(scene.h, scene.w)} (memory grows with the tile)")
        total, done = (tm.passes + 1) * len(cores) + 1, 0

        def step(msg: str) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(msg, done, total)

        for k in range(tm.passes):
            for c in cores:
                tm.accumulate(k, _Tile(scene, *c))
                step(f"{tm.name}: statistics, pass {k + 1} of {tm.passes}")
            tm.end_pass(k)
        nodata = scene.nodata
        nodata = None if nodata is None else float(nodata)
        if nodata is not None and math.isnan(nodata) and np.issubdtype(out_dtype, np.integer):
            raise FuseError(f"{scene_dir}: nodata NaN cannot be written as {out_dtype}: use --dtype float32")
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, stage = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tiles.tif", dir=out.parent)
        os.close(fd)
        stage_path = Path(stage)
        try:
            profile = dict(driver="GTiff", width=scene.W, height=scene.H, count=scene.C, dtype=out_dtype.name,
                           crs=scene.crs, transform=scene.transform, nodata=nodata, tiled=True,
                           blockxsize=COG_BLOCK, blockysize=COG_BLOCK, compress="deflate", zlevel=1,
                           bigtiff="IF_SAFER")
            with warnings.catch_warnings():
                if scene.crs is None:  # pixel coordinates (.mat sources): said when the scene was fetched
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(stage_path, "w", **profile) as dst:
                    for i, name in enumerate(scene.bands, start=1):
                        dst.set_band_description(i, name)
                    for c in cores:
                        t = _Tile(scene, *c)
                        fused = tm.fuse(t)
                        r0, r1, c0, c1 = t.pan_window
                        if fused.shape != (scene.C, r1 - r0, c1 - c0):
                            raise FuseError(f"method {tm.name} returned {fused.shape} for a "
                                            f"{(scene.C, r1 - r0, c1 - c0)} tile")
                        mask = None if nodata is None else nodata_mask(t.pan, t.ms, R, nodata)
                        dst.write(_to_output(fused, mask, out_dtype, scene.scale, nodata),
                                  window=Window(c0, r0, c1 - c0, r1 - r0))
                        step(f"{tm.name}: fused tile {c[0] * R},{c[2] * R}")
                predictor = "FLOATING_POINT" if np.issubdtype(out_dtype, np.floating) else "STANDARD"
                with atomic_path(out) as tmp:
                    rasterio.shutil.copy(stage_path, tmp, driver="COG", COMPRESS="DEFLATE", PREDICTOR=predictor,
                                         BLOCKSIZE=COG_BLOCK, OVERVIEWS="IGNORE_EXISTING", RESAMPLING="AVERAGE",
                                         BIGTIFF="IF_SAFER")
                    Path(f"{tmp}.aux.xml").unlink(missing_ok=True)
        finally:
            stage_path.unlink(missing_ok=True)
            Path(f"{stage_path}.aux.xml").unlink(missing_ok=True)
        step(f"{tm.name}: written {out}")
    return {"out": str(out), "method": tm.name, "kind": kind, "sensor": scene.sensor.name,
            "bands": list(scene.bands), "shape": [scene.C, scene.H, scene.W], "tiles": len(cores),
            "tile": R * t_lr, "halo_pan_px": int(tm.halo), "passes": tm.passes, "dtype": out_dtype.name,
            "nodata": nodata, "scale": scene.scale, "seconds": round(time.perf_counter() - t_start, 3)}


# ------------------------------------------------------------------------------------------------
# the command: scene / files / method / model resolution
# ------------------------------------------------------------------------------------------------
def _files_scene(pan: Path, ms: Path, sensor: str, bands: Sequence[str] | None, ms_upsampled: str | int,
                 nodata: float | None, downloads: Path, out_dir: Path) -> Path:
    """Fetch two GeoTIFFs as a ``source: geotiff`` scene into ``out_dir`` (co-registered, validated)."""
    from pydantic import ValidationError

    from bnnpan.config import GeoTiffScene
    from bnnpan.data.download import FetchContext
    from bnnpan.data.sources import fetch_scene

    raw = {"source": "geotiff", "sensor": sensor, "pan": str(pan), "ms": str(ms), "nodata": nodata,
           "ms_upsampled": ms_upsampled if ms_upsampled == "auto" else int(ms_upsampled)}
    if bands:
        raw["bands"] = list(bands)
    try:
        cfg = GeoTiffScene.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise FuseError(f"--{where.replace('_', '-')}: {err['msg']}" if where else err["msg"]) from None
    return fetch_scene(pan.stem, cfg, FetchContext(downloads=downloads, progress=False), out_dir)


def run_fuse(params: Any, *, out: Path, scene: str | None = None, pan: Path | None = None, ms: Path | None = None,
             sensor: str | None = None, bands: Sequence[str] | None = None, ms_upsampled: str = "1",
             nodata: float | None = 0.0, method: str | None = None, dataset: str | None = None, seed: int = 0,
             model: Path | None = None, window: Sequence[int] | None = None, tile: int = DEFAULT_TILE,
             dtype: str = "source", device: str | None = None,
             progress: Callable[[str, int, int], None] | None = None, runtime: str = "packed") -> dict[str, Any]:
    """What ``bnnpan fuse`` does: resolve the scene (a params scene, fetched into ``paths.raw/<scene>`` unless
    already there; or two files fetched into a temporary folder beside ``out``) and the method (registered,
    ``--dataset`` network, or ``--model`` file), then :func:`fuse_scene`. ``params`` may be None for files
    with a registered method or a model file. ``runtime``: a network's binary convs on the packed 1-bit kernels
    (``packed``, where available; :mod:`bnnpan.models.packed_runtime`) or the float simulation (``float``)."""
    from bnnpan.config import ConfigError

    if (scene is None) == (pan is None and ms is None):
        raise ConfigError("give --scene NAME, or --pan FILE --ms FILE --sensor NAME (not both)")
    if scene is None and (pan is None or ms is None or sensor is None):
        raise ConfigError("two files need --pan, --ms and --sensor")
    if scene is not None and (sensor or bands):
        raise ConfigError("--sensor and --bands are for --pan/--ms files; a params scene has its own")
    if params is None and (scene is not None or (model is None and method not in known_methods())):
        raise ConfigError("params file not found: --scene and --dataset need it (--params)")
    dev = device or (params.device if params is not None else "cpu")
    if model is not None or (params is not None and method in params.train.methods and method not in known_methods()):
        from bnnpan.devices import resolve_device

        dev = resolve_device(dev)
        if model is not None:
            models_dir = params.paths.models if params is not None else "models"
            prepared = params.paths.prepared if params is not None else "data/prepared"
            net, meta = load_model(model, dev, models=models_dir, prepared=prepared, dataset=dataset, seed=seed)
            if method is not None and method != meta["method"]:
                raise FuseError(f"{model}: holds method {meta['method']}, not {method}")
        else:
            trained = [d for d, m in params.trained() if m == method]
            if dataset is None:
                if len(trained) != 1:
                    raise ConfigError(f"method {method} is trained on {trained or 'no dataset'}: pick one with "
                                      "--dataset")
                dataset = trained[0]
            ds = params.models_dataset(dataset) if dataset in params.datasets else dataset
            net, meta = load_model((ds, method), dev, models=params.paths.models, prepared=params.paths.prepared,
                                   seed=seed)
        from bnnpan.models.packed_runtime import apply_runtime

        rt = apply_runtime(net, runtime)
        log.info("%s: %s runtime (%s binary layer(s) packed%s)", meta.get("method"), runtime, rt["packed"],
                 f"; {rt['reason']}" if rt["reason"] else "")
        spec: dict[str, Any] = {"model": (net, meta), "device": dev}
    else:
        if method is None:
            raise ConfigError("give --method (a registered method or a trained network) or --model FILE")
        if method not in known_methods():
            nets = sorted(params.train.methods) if params is not None else []
            raise ConfigError(f"unknown method {method!r}; registered methods: {', '.join(known_methods())}"
                              + (f"; trained networks: {', '.join(nets)}" if nets else ""))
        if dataset is not None:
            raise ConfigError(f"--dataset is for trained networks; {method} is a registered method")
        spec = {"method": method}
    if scene is not None:
        if scene not in params.scenes:
            raise ConfigError(f"unknown scene {scene!r}; params define {sorted(params.scenes)}")
        scene_dir = Path(params.paths.raw) / scene
        if not (scene_dir / "scene.json").is_file():
            from bnnpan.data.download import FetchContext
            from bnnpan.data.sources import fetch_scene

            if progress:
                progress(f"fetching {scene} into {scene_dir}", 0, 1)
            fetch_scene(scene, params.scenes[scene], FetchContext(downloads=Path(params.paths.downloads),
                                                                  progress=False), scene_dir)
        return fuse_scene(scene_dir, out, window=window, tile=tile, dtype=dtype, progress=progress, **spec)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.scene-", dir=out.parent) as tmp:
        downloads = Path(params.paths.downloads) if params is not None else Path(tmp) / "downloads"
        assert pan is not None and ms is not None and sensor is not None
        scene_dir = _files_scene(pan, ms, sensor, bands, ms_upsampled, nodata, downloads, Path(tmp) / "scene")
        with contextlib.suppress(Exception):
            log.info("%s + %s: fetched as a %s scene", pan, ms, json.loads((scene_dir / "scene.json").read_text())
                     ["sensor"])
        return fuse_scene(scene_dir, out, window=window, tile=tile, dtype=dtype, progress=progress, **spec)
