"""The ``prepare`` stage: raw scenes -> Wald-protocol train/valid/test HDF5 files.

Reduced resolution (Wald 1997; conventions of ``shared/design/protocol.md``): the
original MS is the ground truth ``gt``; the network input is ``ms`` = decimate(MTF(MS))
and ``pan`` = PAN degraded by the ratio (antialiased bicubic shrink, or MTF + decimation:
param ``pan_degradation``); ``lms`` = interp23(``ms``). Full resolution: the original pair,
``lms`` = interp23(MS), no ``gt``.

**Spatial split.** Each scene is first cut into regions on its MS grid, and the
degradation runs *per region* (replicate borders at region edges), so no pixel of a
test or validation region influences a training sample, even through the 41-tap filter.
A scene's ``role`` is ``all`` (default: a test strip of ``test_rows`` tile heights at the bottom,
a validation strip of ``valid_size`` rows above it, training above that), or ``train``,
``valid`` or ``test`` for the whole scene. Every sample's footprint is stored
(``window``) so the split can be audited (``tests/test_prepare.py`` does).

**Tile sizes.** Reduced-resolution test tiles are ``test_tile`` (256) HR pixels, or the
largest multiple of 32 that the scene allows (recorded in the manifest) and never below
``min_test_tile``: a scene smaller than that is an error. Full-resolution tiles are
``fr_tile`` (512) PAN pixels, shrunk the same way. Samples whose footprint has more than
``max_nodata_fraction`` nodata (``test_max_nodata_fraction`` for test tiles; 0 by
default: the no-reference indices are undefined on flat blocks) are dropped.

``lms`` is interpolated per sample from that sample's ``ms`` (PanCollection convention),
so ``lms`` can always be recomputed from ``ms`` and carries nothing from outside the
footprint.

**Streaming.** Memory does not grow with the scene: the raw GeoTIFFs are read by windows
(rasterio, GDAL's block cache capped at :data:`GDAL_CACHE_MB`); a region is degraded at once when
it fits in :data:`STRIP_BYTES`, else window by window (:func:`_cut_reduced`), each window read
with the context its filters need (20 pixels for the 41-tap MTF, the region's edges replicated as
the one-shot filter pads them; the bicubic shrink's band of input rows), so the values are the
one-shot ones; and every sample is appended to its file as it is made
(:class:`bnnpan.data.hdf5io.SampleWriter`). What stays in memory is one window, one block of
samples per file, the scene's nodata mask (one bool per MS pixel) and 66 bytes of provenance per
sample. Cost: the rows shared by two windows (filter margins) are filtered twice.

**Scale.** Every file's ``scale`` attribute is the scenes' (``scene.json``: params ``scale``/``bits``,
a ``.mat``'s ``L``, else the sensor's); scenes of one dataset must agree. A reduced-resolution test
tile too small for ``evaluate.border_cut`` plus one ``evaluate.block`` is refused here (one line)
rather than by a traceback in ``evaluate``.

A dataset with ``source: pancollection`` is not prepared from scenes but imported from the field's
ready-made files (:mod:`bnnpan.data.pancollection`).
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import bnnpan
from bnnpan.atomic import atomic_dir
from bnnpan.config import DatasetConfig, PanCollectionDataset, Params
from bnnpan.data import wald
from bnnpan.data.hdf5io import SampleWriter
from bnnpan.data.scene import SceneError, SceneReader, nodata_mask, sha256_file
from bnnpan.eval.metrics_rr import smallest_tile
from bnnpan.sensors import get_sensor

SPLITS = ("train", "valid", "test_rr", "test_fr")


@dataclass(frozen=True)
class Region:
    """A rectangle on a scene's MS grid [r0, r1) x [c0, c1) with the split it feeds."""

    split: str  # train | valid | test
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0


def _floor(x: int, m: int) -> int:
    return (x // m) * m


def plan_regions(h: int, w: int, role: str, cfg: DatasetConfig, ratio: int, what: str, key: str = "datasets.<name>"
                 ) -> tuple[list[Region], int, int]:
    """Cut an h x w MS grid into regions; return (regions, test tile side, FR tile side).

    The grid is first cropped to multiples of the ratio. Raises :class:`SceneError` when
    the scene cannot hold what its role needs. ``what`` names the scene, ``key`` the params
    section (``datasets.<name>``) whose values the user would change.
    """
    for k in ("patch", "stride", "valid_size"):
        if getattr(cfg, k) % ratio:
            v = getattr(cfg, k)
            raise SceneError(f"params {key}.{k}={v} must be a multiple of the sensor's ratio {ratio} "
                             f"(scene {what}); e.g. {k}={max(ratio, v // ratio * ratio)}")
    h, w = _floor(h, ratio), _floor(w, ratio)
    P, V = cfg.patch, cfg.valid_size
    if role in ("train", "valid"):
        if min(h, w) < P:
            raise SceneError(f"{what}: scene ({h} x {w} MS pixels) is smaller than one {P}-pixel patch "
                             f"(params {key}.patch)")
        return [Region(role, 0, h, 0, w)], 0, 0
    avail_h = h if role == "test" else h - V - P
    rows = 1 if role == "test" else cfg.test_rows
    T = min(cfg.test_tile, _floor(w, 32), _floor(max(avail_h, 0) // rows, 32))
    if T < cfg.min_test_tile:
        need = "" if role == "test" else (f" ({rows} rows of them: params {key}.test_rows)" * (rows > 1)
                                          + f" plus a {V}-row validation strip and one {P}-row training patch")
        raise SceneError(
            f"{what}: scene ({h} x {w} MS pixels) is smaller than one test tile "
            f"(params {key}.min_test_tile={cfg.min_test_tile}){need}"
        )
    if role == "test":
        regions = [Region("test", 0, _floor(h, T), 0, _floor(w, T))]
        F = min(cfg.fr_tile, _floor(ratio * h, 32), _floor(ratio * w, 32))
    else:
        n_t, S = w // T, rows * T  # S: height of the test strip
        regions = [
            Region("train", 0, h - S - V, 0, w),
            Region("valid", h - S - V, h - S, 0, w),
            Region("test", h - S, h, 0, n_t * T),
        ]
        F = min(cfg.fr_tile, _floor(ratio * S, 32))
    if F < cfg.min_test_tile or F % ratio:
        raise SceneError(f"{what}: full-resolution tile {F} too small (params {key}.min_test_tile="
                         f"{cfg.min_test_tile})")
    return regions, T, F


#: Bytes of a window being degraded (float64 MS + PAN reads, filter margins, padded copies, FFT buffers:
#: :func:`_row_bytes`): a larger region is degraded window by window (:func:`_cut_reduced`), so memory
#: does not grow with the scene. The default scene's regions fit in one window (the one-shot
#: computation, bit for bit).
STRIP_BYTES = 64 * 2**20
#: GDAL's raster block cache while reading a scene (MB): bounded, whatever the machine's RAM.
GDAL_CACHE_MB = 32
MTF_TAPS = 41
_MARGIN = (MTF_TAPS - 1) // 2  # rows/columns of context the MTF filter needs on each side


class _Split:
    """One output file being written: samples streamed to disk, per-sample provenance kept compactly
    (66 bytes a sample: :meth:`arrays` gives it back as the int16 / int32 / float64 arrays of the file)."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.writer = SampleWriter(path, dtype)
        self.window = array.array("i")  # 4 per sample
        self.scene_index = array.array("h")
        self.geotransform = array.array("d")  # 6 per sample
        self.dropped = 0

    def add(self, sample: dict[str, np.ndarray], window: tuple[int, int, int, int], scene_idx: int,
            geotransform: tuple[float, ...]) -> None:
        self.writer.append(sample)
        self.window.extend(window)
        self.scene_index.append(scene_idx)
        self.geotransform.extend(geotransform)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"scene_index": np.asarray(self.scene_index, dtype=np.int16),
                "window": np.asarray(self.window, dtype=np.int32).reshape(-1, 4),
                "geotransform": np.asarray(self.geotransform, dtype=np.float64).reshape(-1, 6)}

    def __len__(self) -> int:
        return len(self.scene_index)


def _nodata_mask(pan: np.ndarray, ms: np.ndarray, nodata: float | None, ratio: int) -> np.ndarray:
    """Nodata on the MS grid: all MS bands nodata, or any PAN pixel under the MS pixel nodata."""
    h, w = ms.shape[1:]
    m = nodata_mask(pan[: h * ratio, : w * ratio], ms, ratio, nodata)
    return m.reshape(h, ratio, w, ratio).any(axis=(1, 3))


def _scene_mask(reader: SceneReader, nodata: float | None, ratio: int) -> np.ndarray:
    """:func:`_nodata_mask` of the whole scene (one bool per MS pixel), read in row blocks."""
    c, h, w = reader.ms_shape
    mask = np.zeros((h, w), dtype=bool)
    if nodata is None:
        return mask
    rows = max(1, STRIP_BYTES // (8 * (c * w + 2 * ratio * ratio * w)))
    for a in range(0, h, rows):
        b = min(h, a + rows)
        mask[a:b] = _nodata_mask(reader.pan(ratio * a, ratio * b, 0, ratio * w), reader.ms(a, b, 0, w), nodata, ratio)
    return mask


def _grid(n: int, size: int, stride: int) -> range:
    return range(0, n - size + 1, stride)


def _gt_list(t: list[float], row: int, col: int) -> tuple[float, ...]:
    """GDAL-order geotransform of a sub-grid starting at (row, col) of transform t (a, b, c, d, e, f)."""
    a, b, c, d, e, f = t
    return (c + a * col + b * row, a, b, f + d * col + e * row, d, e)


def _clamped(n: int, a: int, b: int, lo: int) -> np.ndarray:
    """Indices, relative to a read starting at ``lo``, of positions ``a - m .. b + m - 1`` of an axis of
    length ``n`` clamped to ``[0, n)`` (``m`` = the MTF margin): the replicate padding of a region's
    one-shot filter, seen through a window."""
    return np.clip(np.arange(a - _MARGIN, b + _MARGIN), 0, n - 1) - lo


def _mtf_window(read: Callable[[int, int, int, int], np.ndarray], H: int, W: int, a: int, b: int, c: int,
                d: int, gains: Any, ratio: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x[a:b, c:d], decimate(mtf_filter(x), ratio)[a/R:b/R, c/R:d/R])`` for the ``H x W`` region ``x``.

    ``read(r0, r1, c0, c1)`` returns region rows/columns (2-D or bands first). Only the window and its
    20-pixel margins are read; margins beyond the region are its edge values, as the one-shot filter's
    replicate padding, so the values are the one-shot ones (bit for bit when the window is the region,
    to FFT rounding otherwise).
    """
    m = _MARGIN
    r0, r1, c0, c1 = max(0, a - m), min(H, b + m), max(0, c - m), min(W, d + m)
    src = read(r0, r1, c0, c1)
    rows, cols = _clamped(H, a, b, r0), _clamped(W, c, d, c0)
    padded = src[..., rows, :][..., cols]
    low = wald.decimate(wald.mtf_filter(padded, gains, ratio, MTF_TAPS, padded=True), ratio)
    return src[..., a - r0 : b - r0, c - c0 : d - c0], low


def _degrade_window(reader: SceneReader, reg: Region, a: int, b: int, c: int, d: int, gains: tuple[float, ...],
                    pan_gain: float, ratio: int, cfg: DatasetConfig, taps: dict[str, Any]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows [a, b) x columns [c, d) (region-relative, multiples of ``ratio``) of the region's Wald degradation.

    Returns ``(gt, ms_lr, pan_lr)``: the original MS window, the window's part of
    ``degrade_ms(region MS)`` (rows [a/R, b/R), columns [c/R, d/R)) and of ``degrade_pan(region PAN)``
    (rows [a, b), columns [c, d)), computed from what the filters need around the window: 20 pixels
    of margin for the 41-tap MTF (:func:`_mtf_window`), the band of input rows/columns of
    :func:`bnnpan.data.wald.shrink_taps` for the bicubic PAN. So a region cut into windows gives the
    one-shot values: exactly for ``gt`` and the bicubic PAN, up to FFT rounding (~1e-16 relative) for
    the MTF-filtered arrays, exactly again when the window is the whole region.
    """
    R = ratio
    hh, ww = reg.shape

    def ms(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return reader.ms(reg.r0 + r0, reg.r0 + r1, reg.c0 + c0, reg.c0 + c1)

    def pan(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return reader.pan(R * reg.r0 + r0, R * reg.r0 + r1, R * reg.c0 + c0, R * reg.c0 + c1)

    gt, ms_lr = _mtf_window(ms, hh, ww, a, b, c, d, gains, R)
    if cfg.pan_degradation == "mtf":
        pan_lr = _mtf_window(pan, R * hh, R * ww, R * a, R * b, R * c, R * d, pan_gain, R)[1]
    else:  # bicubic: output row i reads input rows lo[i] .. lo[i] + K - 1 (columns alike)
        (lo_r, w_r), (lo_c, w_c) = taps["rows"], taps["cols"]
        r0, r1 = int(lo_r[a:b].min()), int(lo_r[a:b].max()) + w_r.shape[1]
        c0, c1 = int(lo_c[c:d].min()), int(lo_c[c:d].max()) + w_c.shape[1]
        pan_lr = wald.apply_taps(pan(r0, r1, c0, c1), lo_r[a:b] - r0, w_r[a:b], axis=0)
        pan_lr = wald.apply_taps(pan_lr, lo_c[c:d] - c0, w_c[c:d], axis=1)
    return gt, ms_lr, pan_lr


def _row_bytes(c: int, ratio: int, width: int) -> int:
    """Rough bytes per MS row of a ``width``-column window being degraded: the float64 MS and PAN reads,
    their padded copies and the FFT buffers of one band (what :data:`STRIP_BYTES` budgets)."""
    w = width + 2 * _MARGIN
    return 8 * (2 * c * w + 6 * w + 3 * ratio * (ratio * width + 2 * _MARGIN))


def _cut_reduced(out: _Split, reader: SceneReader, reg: Region, mask: np.ndarray, gains: tuple[float, ...],
                 pan_gain: float, ratio: int, size: int, stride: int, max_nodata: float, cfg: DatasetConfig,
                 scene_idx: int, ms_t: list[float]) -> None:
    """Reduced-resolution samples of one region (patches or test tiles), streamed window by window.

    The same samples, in the same order (rows, then columns), as degrading the whole region at once:
    a sample whose footprint is more than ``max_nodata`` nodata is dropped (counted) before anything
    is computed, and no window is degraded for dropped samples only. Three ways, by size:

    * the region with its margins fits in :data:`STRIP_BYTES`: one window, the whole region (the
      one-shot computation, bit for bit);
    * overlapping samples (``stride < size``, training patches): full-width blocks of rows, each
      degraded once, kept in a rolling buffer until the sample rows they feed are written (memory:
      one block plus ``size`` + one block of degraded rows);
    * non-overlapping samples (validation patches, test tiles): one sample row at a time, in windows
      of as many samples as the budget allows.
    """
    R = ratio
    m = mask[reg.r0 : reg.r1, reg.c0 : reg.c1]
    hh, ww = reg.shape
    xs = list(_grid(ww, size, stride))
    keep: dict[int, list[int]] = {}
    for y in _grid(hh, size, stride):
        keep[y] = []
        for x in xs:
            if m[y : y + size, x : x + size].mean() > max_nodata:
                out.dropped += 1
            else:
                keep[y].append(x)
    rows_needed = [y for y, v in keep.items() if v]
    if not rows_needed:
        return
    c = reader.ms_shape[0]
    taps: dict[str, Any] = {}
    if cfg.pan_degradation != "mtf":
        taps = {"rows": wald.shrink_taps(R * hh, R), "cols": wald.shrink_taps(R * ww, R)}

    def emit(y: int, x: int, gt: np.ndarray, ms_lr: np.ndarray, pan_lr: np.ndarray, a: int, c0: int) -> None:
        """Sample (y, x) from a degraded window whose first row is ``a`` and first column ``c0``."""
        ms_p = ms_lr[:, (y - a) // R : (y - a + size) // R, (x - c0) // R : (x - c0 + size) // R]
        out.add({"gt": gt[:, y - a : y - a + size, x - c0 : x - c0 + size], "lms": wald.interp23(ms_p, R),
                 "ms": ms_p, "pan": pan_lr[None, y - a : y - a + size, x - c0 : x - c0 + size]},
                (reg.r0 + y, reg.c0 + x, size, size), scene_idx, _gt_list(ms_t, reg.r0 + y, reg.c0 + x))

    if (hh + 2 * _MARGIN) * _row_bytes(c, R, ww) <= STRIP_BYTES:  # the whole region at once
        win = _degrade_window(reader, reg, 0, hh, 0, ww, gains, pan_gain, R, cfg, taps)
        for y in rows_needed:
            for x in keep[y]:
                emit(y, x, *win, 0, 0)
        return
    if stride >= size:  # sample rows do not overlap: one row at a time, in windows of whole samples
        span = size  # the widest window within the budget (at least one sample)
        while span + stride <= ww and (size + 2 * _MARGIN) * _row_bytes(c, R, span + stride) <= STRIP_BYTES:
            span += stride
        for y in rows_needed:
            groups: list[list[int]] = []
            for x in keep[y]:
                if groups and x + size - groups[-1][0] <= span:
                    groups[-1].append(x)
                else:
                    groups.append([x])
            for group in groups:
                win = _degrade_window(reader, reg, y, y + size, group[0], group[-1] + size, gains, pan_gain, R,
                                      cfg, taps)
                for x in group:
                    emit(y, x, *win, y, group[0])
        return
    # Overlapping sample rows: degrade full-width row blocks [a, b) once each, keep the rows still needed.
    block = max(R, (STRIP_BYTES // _row_bytes(c, R, ww) - 2 * _MARGIN) // R * R)
    buf: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    buf_a = 0  # first region row held in buf
    pending = list(rows_needed)
    a = 0
    while pending:
        a = max(a, pending[0] - pending[0] % R)  # skip rows no kept sample needs
        b = min(hh, a + block)
        new = _degrade_window(reader, reg, a, b, 0, ww, gains, pan_gain, R, cfg, taps)
        if buf is None or buf_a + buf[0].shape[1] != a:
            buf, buf_a = new, a
        else:
            buf = (np.concatenate([buf[0], new[0]], axis=1), np.concatenate([buf[1], new[1]], axis=1),
                   np.concatenate([buf[2], new[2]], axis=0))
        while pending and pending[0] + size <= b:
            y = pending.pop(0)
            for x in keep[y]:
                emit(y, x, *buf, buf_a, 0)
        if pending:  # drop the rows no pending sample needs (keep a multiple of R for ms_lr)
            cut = (min(pending[0], b) - buf_a) // R * R
            buf = (buf[0][:, cut:], buf[1][:, cut // R :], buf[2][cut:])
            buf_a += cut
        a = b


def _cut_full(out: _Split, reader: SceneReader, reg: Region, mask: np.ndarray, ratio: int, F: int,
              max_nodata: float, scene_idx: int, pan_t: list[float]) -> None:
    """Full-resolution test tiles of one region: the original PAN and MS, read tile by tile."""
    R, f = ratio, F // ratio
    hh, ww = reg.shape
    for y in _grid(hh, f, f):
        for x in _grid(ww, f, f):
            r, c = reg.r0 + y, reg.c0 + x
            if mask[r : r + f, c : c + f].mean() > max_nodata:
                out.dropped += 1
                continue
            ms_p = reader.ms(r, r + f, c, c + f)
            pan_p = reader.pan(R * r, R * r + F, R * c, R * c + F)[None]
            out.add({"lms": wald.interp23(ms_p, R), "ms": ms_p, "pan": pan_p}, (r, c, f, f), scene_idx,
                    _gt_list(pan_t, R * r, R * c))


def check_test_tiles(rr: int, fr: int, params: Params, what: str) -> None:
    """Refuse test tiles the indices cannot score with the ``evaluate`` section's conventions (one line).

    Reduced resolution: ``evaluate.border_cut`` then one ``evaluate.block`` must fit
    (:func:`bnnpan.eval.metrics_rr.smallest_tile`, 73 for 21 and 32). Full resolution: sides multiples of
    the block (the no-reference indices use a grid of whole blocks). 0 = no such tiles.
    """
    cut, block = params.evaluate.border_cut, params.evaluate.block
    need = smallest_tile(cut, block)
    if rr and rr < need:
        raise SceneError(f"{what}: reduced-resolution test tiles of {rr} x {rr} are too small for the indices: "
                         f"evaluate.border_cut={cut} and one {block} x {block} block (evaluate.block) need at "
                         f"least {need} x {need}; use larger tiles or scenes, or lower evaluate.border_cut")
    if fr and (fr % block or fr < block):
        raise SceneError(f"{what}: full-resolution test tiles of {fr} x {fr} are not a whole number of "
                         f"{block} x {block} blocks (evaluate.block)")


PREPARE_MODULE = "bnnpan/data/prepare.py"  # this file, the root of the prepared data's code digest


def code_version(files: Sequence[str] | None = None) -> str:
    """The package version and a digest of the code that writes prepared data (provenance), e.g.
    ``bnnpan 0.1.0 (prepare code 3f2a9c1e04b7)``.

    The digest is the sha256 of the code that writes the files (``files``, default this module and what it
    imports, transitively: :func:`bnnpan.codedeps.closure`; not the CLI's MLflow logging), not the git commit:
    a commit that does not touch that code
    leaves the prepared files byte-identical, so re-running ``prepare`` (a profile run, ``dvc repro``) does not
    look like new data to DVC, Snakemake or the training digests, and nothing retrains for nothing.
    """
    from bnnpan.codedeps import closure

    root = Path(bnnpan.__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted(files if files is not None else closure([PREPARE_MODULE])):
        path = root / f
        h.update(f.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"(missing)") + b"\0")
    return f"bnnpan {bnnpan.__version__} (prepare code {h.hexdigest()[:12]})"


def prepare_dataset(params: Params, dataset: str, out_dir: str | Path | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Build ``train.h5``, ``valid.h5``, ``test_rr.h5``, ``test_fr.h5`` and ``manifest.json``.

    Everything is written into a temporary directory beside ``out_dir`` and renamed into
    place at the end, so an interrupted run leaves the previous result (or nothing).
    ``progress(message, done, total)`` is called after each region is cut.

    Memory does not grow with the scenes: each scene is read by windows (its nodata mask, one
    bool per MS pixel, is the only whole-scene array), degraded strip by strip
    (:data:`STRIP_BYTES`) and every sample is appended to its file as it is made
    (:class:`bnnpan.data.hdf5io.SampleWriter`).
    """
    if dataset not in params.datasets:
        raise SceneError(f"unknown dataset {dataset!r}; params define {sorted(params.datasets)}")
    cfg = params.datasets[dataset]
    if isinstance(cfg, PanCollectionDataset):
        from bnnpan.data.pancollection import import_dataset

        return import_dataset(params, dataset, out_dir, progress)
    out_dir = Path(out_dir or Path(params.paths.prepared) / dataset)
    scenes_meta: list[dict[str, Any]] = []
    sensor = None
    bands: list[str] | None = None
    tiles: dict[str, list[int]] = {"test_tile": [], "fr_tile": []}
    # Plan every scene from its scene.json first (cheap), so the progress bar knows its total:
    # one step per region, two for a test region (reduced + full resolution).
    plans = []
    for name in cfg.scenes:
        scene_dir = Path(params.paths.raw) / name
        if not (scene_dir / "scene.json").is_file():
            raise SceneError(f"{scene_dir}: no scene.json (run `bnnpan fetch` first)")
        m = json.loads((scene_dir / "scene.json").read_text())
        ratio = get_sensor(m["sensor"]).ratio
        plans.append(plan_regions(m["ms_shape"][1], m["ms_shape"][2], cfg.role(name), cfg, ratio,
                                  f"{name} ({scene_dir})", key=f"datasets.{dataset}"))
        check_test_tiles(plans[-1][1], plans[-1][2], params, f"dataset {dataset}: scene {name} ({scene_dir})")
    total = sum(len(r) + sum(x.split == "test" for x in r) for r, _, _ in plans)
    done = 0

    def step(msg: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(f"{dataset}: {msg}", done, total)

    dtype = np.dtype(cfg.dtype)
    with atomic_dir(out_dir) as tmp, contextlib.ExitStack() as files:
        outs = {s: _Split(tmp / f"{s}.h5", dtype) for s in SPLITS}
        for o in outs.values():
            files.enter_context(o.writer)
        for idx, name in enumerate(cfg.scenes):
            if progress:
                progress(f"{dataset}: reading {name}", done, total)
            scene_dir = Path(params.paths.raw) / name
            with SceneReader(scene_dir, GDAL_CACHE_MB) as reader:
                meta = reader.meta
                s = get_sensor(meta["sensor"])
                s_scale = float(meta.get("scale") or s.scale)
                if sensor is None:
                    sensor, bands, scale = s, meta["bands"], s_scale
                elif s.name != sensor.name or meta["bands"] != bands or s_scale != scale:
                    raise SceneError(
                        f"{scene_dir}: sensor/bands/scale {s.name} {meta['bands']} {s_scale:g} differ from the "
                        f"dataset's first scene ({sensor.name} {bands} {scale:g})"
                    )
                names, gains = s.select(meta["bands"])
                R = s.ratio
                role = cfg.role(name)
                regions, T, F = plans[idx]
                mask = _scene_mask(reader, meta.get("nodata"), R)
                for reg in regions:
                    if reg.split == "train":
                        _cut_reduced(outs["train"], reader, reg, mask, gains, s.pan_gain, R, cfg.patch,
                                     cfg.stride, cfg.max_nodata_fraction, cfg, idx, meta["ms_transform"])
                        step(f"{name} train patches")
                    elif reg.split == "valid":
                        _cut_reduced(outs["valid"], reader, reg, mask, gains, s.pan_gain, R, cfg.patch,
                                     cfg.patch, cfg.max_nodata_fraction, cfg, idx, meta["ms_transform"])
                        step(f"{name} validation patches")
                    else:
                        _cut_reduced(outs["test_rr"], reader, reg, mask, gains, s.pan_gain, R, T, T,
                                     cfg.test_max_nodata_fraction, cfg, idx, meta["ms_transform"])
                        step(f"{name} reduced-resolution test tiles")
                        _cut_full(outs["test_fr"], reader, reg, mask, R, F, cfg.test_max_nodata_fraction,
                                  idx, meta["pan_transform"])
                        step(f"{name} full-resolution test tiles")
                if T:
                    tiles["test_tile"].append(T)
                    tiles["fr_tile"].append(F)
                scenes_meta.append({
                    "name": name, "role": role, "ms_shape": list(reader.ms_shape),
                    "pan_shape": list(reader.pan_shape),
                    "regions": [r.__dict__ for r in regions], "test_tile": T, "fr_tile": F,
                    "nodata_fraction": float(mask.mean()), "crs": meta.get("crs"),
                    "licence": meta.get("licence"), "attribution": meta.get("attribution"),
                    "residual_shift_pan_px": meta.get("residual_shift_pan_px"),
                })
        assert sensor is not None and bands is not None
        for split in SPLITS:
            # a test-only dataset (models_from) has empty train and valid files: nothing trains on it
            if len(outs[split]) == 0 and (cfg.models_from is None or split.startswith("test")):
                raise SceneError(
                    f"dataset {dataset}: no {split} samples (scenes {cfg.scenes}; "
                    f"{outs[split].dropped} dropped for nodata) - check roles and sizes"
                )
        # The same tile side everywhere in a file (different scenes may allow different sizes).
        for key in ("test_tile", "fr_tile"):
            if len(set(tiles[key])) > 1:
                raise SceneError(f"dataset {dataset}: scenes allow different {key} sizes {tiles[key]}; "
                                 f"set {key} to {min(tiles[key])}")
        settings = {
            **cfg.model_dump(mode="json"),
            "mtf_taps": MTF_TAPS, "kaiser_beta": 0.5, "decimation_offset": "ratio/2",
            "interpolator": "23-tap polynomial (circular borders), per sample",
            "test_tile_used": tiles["test_tile"][0] if tiles["test_tile"] else None,
            "fr_tile_used": tiles["fr_tile"][0] if tiles["fr_tile"] else None,
        }
        common = {
            "sensor": sensor.name, "ratio": sensor.ratio, "scale": scale, "bands": list(bands),
            "rgb": list(sensor.rgb_indices(tuple(bands)) or []), "scenes": list(cfg.scenes),
            "crs": {m["name"]: m["crs"] for m in scenes_meta}, "code_version": code_version(),
            "dataset": dataset, "settings": settings, "value_unit": "DN (divide by scale)",
        }
        for split in SPLITS:
            o = outs[split]
            meta_arrays = o.arrays()
            attrs = {**common, "split": split.split("_")[0],
                     "resolution": "full" if split == "test_fr" else "reduced"}
            if split.startswith("test"):
                attrs["geotransform"] = meta_arrays["geotransform"].tolist() if len(o) <= 1000 else "see dataset"
            o.writer.finish(meta_arrays, attrs)
        files.close()  # every file complete and renamed into the temporary directory
        files_meta: dict[str, Any] = {}
        for split in SPLITS:
            o, path = outs[split], tmp / f"{split}.h5"
            files_meta[f"{split}.h5"] = {
                "n": len(o), "dropped_nodata": o.dropped,
                "shapes": {k: [len(o), *v] for k, v in o.writer.shapes.items()},
                "bytes": path.stat().st_size, "sha256": sha256_file(path),
            }
        manifest = {
            "dataset": dataset, "sensor": sensor.name, "ratio": sensor.ratio, "scale": scale,
            "bands": list(bands), "dtype": cfg.dtype, "files": files_meta, "scenes": scenes_meta,
            "settings": settings, "code_version": common["code_version"],
            "split": "spatial: per-scene regions (role 'all') or whole scenes; see scenes[].regions",
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if progress:
        progress(f"{dataset}: written to {out_dir}", total, total)
    return manifest
