"""The ``prepare`` stage: raw scenes -> Wald-protocol train/valid/test HDF5 files.

Reduced resolution (Wald 1997; conventions of ``shared/design/protocol.md``): the
original MS is the ground truth ``gt``; the network input is ``ms`` = decimate(MTF(MS))
and ``pan`` = PAN degraded by the ratio (antialiased bicubic shrink, or MTF + decimation:
param ``pan_degradation``); ``lms`` = interp23(``ms``). Full resolution: the original pair,
``lms`` = interp23(MS), no ``gt``.

**Spatial split.** Each scene is first cut into regions on its MS grid, and the
degradation runs *per region* (replicate borders at region edges), so no pixel of a
test or validation region influences a training sample, even through the 41-tap filter.
A scene's ``role`` is ``all`` (default: a test strip of one tile height at the bottom,
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

**Scale.** Every file's ``scale`` attribute is the scenes' (``scene.json``: params ``scale``/``bits``,
a ``.mat``'s ``L``, else the sensor's); scenes of one dataset must agree. A reduced-resolution test
tile too small for ``evaluate.border_cut`` plus one ``evaluate.block`` is refused here (one line)
rather than by a traceback in ``evaluate``.

A dataset with ``source: pancollection`` is not prepared from scenes but imported from the field's
ready-made files (:mod:`bnnpan.data.pancollection`).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import bnnpan
from bnnpan.atomic import atomic_dir
from bnnpan.config import DatasetConfig, PanCollectionDataset, Params
from bnnpan.data import wald
from bnnpan.data.hdf5io import write_h5
from bnnpan.data.scene import SceneError, nodata_mask, read_raw_scene, sha256_file
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
    T = min(cfg.test_tile, _floor(w, 32), _floor(max(avail_h, 0), 32))
    if T < cfg.min_test_tile:
        need = "" if role == "test" else f" plus a {V}-row validation strip and one {P}-row training patch"
        raise SceneError(
            f"{what}: scene ({h} x {w} MS pixels) is smaller than one test tile "
            f"(params {key}.min_test_tile={cfg.min_test_tile}){need}"
        )
    if role == "test":
        regions = [Region("test", 0, _floor(h, T), 0, _floor(w, T))]
        F = min(cfg.fr_tile, _floor(ratio * h, 32), _floor(ratio * w, 32))
    else:
        n_t = w // T
        regions = [
            Region("train", 0, h - T - V, 0, w),
            Region("valid", h - T - V, h - T, 0, w),
            Region("test", h - T, h, 0, n_t * T),
        ]
        F = min(cfg.fr_tile, _floor(ratio * T, 32))
    if F < cfg.min_test_tile or F % ratio:
        raise SceneError(f"{what}: full-resolution tile {F} too small (params {key}.min_test_tile="
                         f"{cfg.min_test_tile})")
    return regions, T, F


@dataclass
class _Bucket:
    arrays: dict[str, list[np.ndarray]] = field(default_factory=lambda: {k: [] for k in ("gt", "lms", "ms", "pan")})
    window: list[tuple[int, int, int, int]] = field(default_factory=list)
    scene_index: list[int] = field(default_factory=list)
    geotransform: list[tuple[float, ...]] = field(default_factory=list)
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.window)


def _nodata_mask(pan: np.ndarray, ms: np.ndarray, nodata: float | None, ratio: int) -> np.ndarray:
    """Nodata on the MS grid: all MS bands nodata, or any PAN pixel under the MS pixel nodata."""
    h, w = ms.shape[1:]
    m = nodata_mask(pan[: h * ratio, : w * ratio], ms, ratio, nodata)
    return m.reshape(h, ratio, w, ratio).any(axis=(1, 3))


def _grid(n: int, size: int, stride: int) -> range:
    return range(0, n - size + 1, stride)


def _gt_list(t: list[float], row: int, col: int) -> tuple[float, ...]:
    """GDAL-order geotransform of a sub-grid starting at (row, col) of transform t (a, b, c, d, e, f)."""
    a, b, c, d, e, f = t
    return (c + a * col + b * row, a, b, f + d * col + e * row, d, e)


def _cut_reduced(bucket: _Bucket, reg: Region, pan: np.ndarray, ms: np.ndarray, mask: np.ndarray,
                 gains: tuple[float, ...], pan_gain: float, ratio: int, size: int, stride: int,
                 max_nodata: float, cfg: DatasetConfig, scene_idx: int, ms_t: list[float]) -> None:
    R = ratio
    gt_reg = ms[:, reg.r0 : reg.r1, reg.c0 : reg.c1]
    pan_reg = pan[R * reg.r0 : R * reg.r1, R * reg.c0 : R * reg.c1]
    ms_lr = wald.degrade_ms(gt_reg, gains, R)
    pan_lr = wald.degrade_pan(pan_reg, R, cfg.pan_degradation, gain=pan_gain)
    m = mask[reg.r0 : reg.r1, reg.c0 : reg.c1]
    hh, ww = reg.shape
    for y in _grid(hh, size, stride):
        for x in _grid(ww, size, stride):
            if m[y : y + size, x : x + size].mean() > max_nodata:
                bucket.dropped += 1
                continue
            ms_p = ms_lr[:, y // R : (y + size) // R, x // R : (x + size) // R]
            bucket.arrays["gt"].append(gt_reg[:, y : y + size, x : x + size])
            bucket.arrays["ms"].append(ms_p)
            bucket.arrays["lms"].append(wald.interp23(ms_p, R))
            bucket.arrays["pan"].append(pan_lr[None, y : y + size, x : x + size])
            bucket.window.append((reg.r0 + y, reg.c0 + x, size, size))
            bucket.scene_index.append(scene_idx)
            bucket.geotransform.append(_gt_list(ms_t, reg.r0 + y, reg.c0 + x))


def _cut_full(bucket: _Bucket, reg: Region, pan: np.ndarray, ms: np.ndarray, mask: np.ndarray,
              ratio: int, F: int, max_nodata: float, scene_idx: int, pan_t: list[float]) -> None:
    R, f = ratio, F // ratio
    hh, ww = reg.shape
    for y in _grid(hh, f, f):
        for x in _grid(ww, f, f):
            r, c = reg.r0 + y, reg.c0 + x
            if mask[r : r + f, c : c + f].mean() > max_nodata:
                bucket.dropped += 1
                continue
            ms_p = ms[:, r : r + f, c : c + f]
            bucket.arrays["ms"].append(ms_p)
            bucket.arrays["lms"].append(wald.interp23(ms_p, R))
            bucket.arrays["pan"].append(pan[None, R * r : R * r + F, R * c : R * c + F])
            bucket.window.append((r, c, f, f))
            bucket.scene_index.append(scene_idx)
            bucket.geotransform.append(_gt_list(pan_t, R * r, R * c))


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


def code_version() -> str:
    """Package version plus the git commit when run from a checkout (provenance only)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    return f"bnnpan {bnnpan.__version__} ({sha})"


def prepare_dataset(params: Params, dataset: str, out_dir: str | Path | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Build ``train.h5``, ``valid.h5``, ``test_rr.h5``, ``test_fr.h5`` and ``manifest.json``.

    Everything is written into a temporary directory beside ``out_dir`` and renamed into
    place at the end, so an interrupted run leaves the previous result (or nothing).
    ``progress(message, done, total)`` is called after each region is cut.
    """
    if dataset not in params.datasets:
        raise SceneError(f"unknown dataset {dataset!r}; params define {sorted(params.datasets)}")
    cfg = params.datasets[dataset]
    if isinstance(cfg, PanCollectionDataset):
        from bnnpan.data.pancollection import import_dataset

        return import_dataset(params, dataset, out_dir, progress)
    out_dir = Path(out_dir or Path(params.paths.prepared) / dataset)
    buckets = {s: _Bucket() for s in SPLITS}
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

    for idx, name in enumerate(cfg.scenes):
        if progress:
            progress(f"{dataset}: reading {name}", done, total)
        scene_dir = Path(params.paths.raw) / name
        pan, ms, meta = read_raw_scene(scene_dir)
        s = get_sensor(meta["sensor"])
        s_scale = float(meta.get("scale") or s.scale)
        if sensor is None:
            sensor, bands, scale = s, meta["bands"], s_scale
        elif s.name != sensor.name or meta["bands"] != bands or s_scale != scale:
            raise SceneError(
                f"{scene_dir}: sensor/bands/scale {s.name} {meta['bands']} {s_scale:g} differ from the dataset's "
                f"first scene ({sensor.name} {bands} {scale:g})"
            )
        names, gains = s.select(meta["bands"])
        R = s.ratio
        role = cfg.role(name)
        regions, T, F = plans[idx]
        mask = _nodata_mask(pan, ms, meta.get("nodata"), R)
        for reg in regions:
            if reg.split == "train":
                _cut_reduced(buckets["train"], reg, pan, ms, mask, gains, s.pan_gain, R, cfg.patch,
                             cfg.stride, cfg.max_nodata_fraction, cfg, idx, meta["ms_transform"])
                step(f"{name} train patches")
            elif reg.split == "valid":
                _cut_reduced(buckets["valid"], reg, pan, ms, mask, gains, s.pan_gain, R, cfg.patch,
                             cfg.patch, cfg.max_nodata_fraction, cfg, idx, meta["ms_transform"])
                step(f"{name} validation patches")
            else:
                _cut_reduced(buckets["test_rr"], reg, pan, ms, mask, gains, s.pan_gain, R, T, T,
                             cfg.test_max_nodata_fraction, cfg, idx, meta["ms_transform"])
                step(f"{name} reduced-resolution test tiles")
                _cut_full(buckets["test_fr"], reg, pan, ms, mask, R, F, cfg.test_max_nodata_fraction,
                          idx, meta["pan_transform"])
                step(f"{name} full-resolution test tiles")
        if T:
            tiles["test_tile"].append(T)
            tiles["fr_tile"].append(F)
        scenes_meta.append({
            "name": name, "role": role, "ms_shape": list(ms.shape), "pan_shape": list(pan.shape),
            "regions": [r.__dict__ for r in regions], "test_tile": T, "fr_tile": F,
            "nodata_fraction": float(mask.mean()), "crs": meta.get("crs"),
            "licence": meta.get("licence"), "attribution": meta.get("attribution"),
            "residual_shift_pan_px": meta.get("residual_shift_pan_px"),
        })
    assert sensor is not None and bands is not None
    for split in SPLITS:
        if len(buckets[split]) == 0:
            raise SceneError(
                f"dataset {dataset}: no {split} samples (scenes {cfg.scenes}; "
                f"{buckets[split].dropped} dropped for nodata) - check roles and sizes"
            )
    # The same tile side everywhere in a file (different scenes may allow different sizes).
    for key in ("test_tile", "fr_tile"):
        if len(set(tiles[key])) > 1:
            raise SceneError(f"dataset {dataset}: scenes allow different {key} sizes {tiles[key]}; "
                             f"set {key} to {min(tiles[key])}")
    dtype = np.dtype(cfg.dtype)
    settings = {
        **cfg.model_dump(mode="json"),
        "mtf_taps": 41, "kaiser_beta": 0.5, "decimation_offset": "ratio/2",
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
    files: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            b = buckets[split]
            arrays = {k: np.stack(v).astype(dtype) for k, v in b.arrays.items() if v}
            arrays["scene_index"] = np.asarray(b.scene_index, dtype=np.int16)
            arrays["window"] = np.asarray(b.window, dtype=np.int32)
            arrays["geotransform"] = np.asarray(b.geotransform, dtype=np.float64)
            attrs = {**common, "split": split.split("_")[0],
                     "resolution": "full" if split == "test_fr" else "reduced"}
            if split.startswith("test"):
                attrs["geotransform"] = arrays["geotransform"].tolist() if len(b) <= 1000 else "see dataset"
            path = write_h5(tmp / f"{split}.h5", arrays, attrs)
            files[f"{split}.h5"] = {
                "n": len(b), "dropped_nodata": b.dropped,
                "shapes": {k: list(v.shape) for k, v in arrays.items() if k in ("gt", "lms", "ms", "pan")},
                "bytes": path.stat().st_size, "sha256": sha256_file(path),
            }
        manifest = {
            "dataset": dataset, "sensor": sensor.name, "ratio": sensor.ratio, "scale": scale,
            "bands": list(bands), "dtype": cfg.dtype, "files": files, "scenes": scenes_meta,
            "settings": settings, "code_version": common["code_version"],
            "split": "spatial: per-scene regions (role 'all') or whole scenes; see scenes[].regions",
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if progress:
        progress(f"{dataset}: written to {out_dir}", total, total)
    return manifest
