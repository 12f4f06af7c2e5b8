"""The normalised raw scene every source ends in, and its co-registration.

A raw scene is a PAN image (H x W) and an MS image (C x h x w) at their native
resolutions, **co-registered by geotransform** (never by array index): after
:func:`coregister`, ``H == ratio * h``, ``W == ratio * w`` and both grids start at the
same map corner, so MS pixel (i, j) covers exactly PAN pixels
``[ratio*i, ratio*i + ratio) x [ratio*j, ratio*j + ratio)`` (Wald's convention).

Sub-pixel offsets between the two grids cannot be removed without resampling the
data. Landsat PAN and MS pixel *centres* coincide, so their *areas* are offset by half
a PAN pixel by construction; such residual offsets up to ``max_shift_px`` PAN pixels are
snapped to the nearest whole PAN pixel and recorded in ``scene.json``
(``residual_shift_pan_px``); larger ones are an error.

On disk (``data/raw/<scene>/``): ``pan.tif`` (1 band), ``ms.tif`` (C bands), both
GeoTIFF with the geotransform and CRS, and ``scene.json`` (sensor, bands, CRS, bounds,
sha256 of the sources, licence/attribution, ``scale``). The directory is written to a temporary
sibling and renamed into place, so a failed fetch never leaves a half-written scene.

**Radiometry.** A scene's ``scale`` (the DN that means "full scale": the divisor of every
normalised input and the PSNR peak) is the one declared in params (``scale`` or ``bits``), else the
bit depth a ``.mat`` carries (``L``), else the sensor's (``2^bits - 1``); :func:`resolve_scale`. An
8-bit product of an 11-bit sensor is common (GeoEye-1, QuickBird browse products): with the sensor's
2047 its PSNR would be ~18 dB too high and its inputs 8x too dark. :func:`check_radiometry` makes a
DN above the scale an error and warns once when the maximum is below scale / 8, naming the bit depth
the data look like.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from bnnpan.atomic import atomic_dir  # noqa: F401 - re-exported for callers
from bnnpan.sensors import Sensor, get_sensor

log = logging.getLogger(__name__)


class SceneError(ValueError):
    """Bad input scene; the message names the file and the problem in one line."""


def likely_bits(max_dn: float) -> int:
    """The smallest bit depth that holds ``max_dn`` (241 -> 8, 1800 -> 11)."""
    return max(1, math.ceil(math.log2(float(max_dn) + 1)))


def resolve_scale(declared: float | None, file_bits: int | None, sensor: Sensor, what: str,
                  key: str = "the scene") -> tuple[float, str]:
    """``(scale, where it came from)``: the params' ``scale``/``bits``, else a file's bit depth, else the sensor's.

    A params value that contradicts the file's bit depth is a :class:`SceneError` (one line, ``what``
    names the file): one of the two is wrong and a silent choice would mis-scale every index.
    """
    file_scale = float(2**file_bits - 1) if file_bits is not None else None
    if declared is not None and file_scale is not None and declared != file_scale:
        raise SceneError(f"{what}: params give {key} scale {declared:g} but the file says {file_bits}-bit data "
                         f"(`L` = {file_bits}, scale {file_scale:g}); remove `scale`/`bits` to use the file's, "
                         "or fix it")
    if declared is not None:
        return declared, "params"
    if file_scale is not None:
        return file_scale, f"file (L = {file_bits} bits)"
    return sensor.scale, f"sensor {sensor.name} ({sensor.storage_bits} bits)"


def check_radiometry(max_dn: float, scale: float, source: str, what: str, key: str = "on the scene") -> None:
    """A DN above ``scale`` is a :class:`SceneError`; a maximum below ``scale / 8`` is one warning.

    ``source`` says where the scale came from (:func:`resolve_scale`), ``what`` names the file and
    ``key`` where to declare another scale (``on the scene``, ``on dataset wv3``).
    """
    if not math.isfinite(max_dn):
        raise SceneError(f"{what}: the data contain NaN or inf")
    if max_dn > scale:
        bits = likely_bits(max_dn)
        raise SceneError(f"{what}: DN up to {max_dn:g} exceed the scale {scale:g} (from {source}); the data look "
                         f"{bits}-bit: declare `bits: {bits}` (or the right `scale:`) {key}")
    if 0 < max_dn < scale / 8:
        bits = likely_bits(max_dn)
        log.warning("%s: the largest DN is %g, below 1/8 of the scale %g (from %s): the data look %d-bit; if so "
                    "declare `bits: %d` (scale %d) %s, or the PSNR peak and every normalised input are wrong",
                    what, max_dn, scale, source, bits, bits, 2**bits - 1, key)


def valid_max(a: np.ndarray, nodata: float | None) -> float:
    """Largest value of ``a`` that is not ``nodata`` (NaN ignored); 0 when there is none."""
    a = np.asarray(a)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        a = a[a != nodata]
    if a.size == 0:
        return 0.0
    if np.issubdtype(a.dtype, np.floating):
        finite = a[np.isfinite(a)]
        return float(finite.max()) if finite.size else 0.0
    return float(a.max())


@dataclass
class RawScene:
    """A PAN/MS pair with georeferencing (``crs`` may be None for un-georeferenced sources)."""

    pan: np.ndarray  # (H, W)
    ms: np.ndarray  # (C, h, w)
    pan_transform: Affine
    ms_transform: Affine
    crs: CRS | None
    sensor: Sensor
    bands: tuple[str, ...]
    nodata: float | None = 0.0
    sources: list[dict[str, Any]] = field(default_factory=list)  # {"name", "sha256", ...}
    licence: str | None = None
    attribution: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    scale: float | None = None  # DN scale (resolve_scale); None: the sensor's

    @property
    def ratio(self) -> int:
        return self.sensor.ratio


def nodata_mask(pan: np.ndarray, ms: np.ndarray, ratio: int, nodata: float | None) -> np.ndarray:
    """PAN-grid mask of nodata pixels: PAN == nodata, or every MS band == nodata (NaN allowed)."""
    if nodata is None:
        return np.zeros(pan.shape, dtype=bool)
    if isinstance(nodata, float) and math.isnan(nodata):
        pan_nd, ms_nd = np.isnan(pan), np.all(np.isnan(ms), axis=0)
    else:
        pan_nd, ms_nd = pan == nodata, np.all(ms == nodata, axis=0)
    ms_up = np.repeat(np.repeat(ms_nd, ratio, axis=0), ratio, axis=1)
    return pan_nd | ms_up


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def check_bands(n_bands: int, sensor: Sensor, bands: list[str] | tuple[str, ...] | None, what: str) -> tuple[str, ...]:
    """Validate the MS band count against the declared bands (default: all sensor bands)."""
    try:
        names, _ = sensor.select(bands)
    except ValueError as e:
        raise SceneError(f"{what}: {e}") from None
    if n_bands != len(names):
        hint = "" if bands else "; declare `bands:` in params.yaml to use a subset"
        raise SceneError(
            f"{what}: MS has {n_bands} band(s) but sensor {sensor.name} expects {len(names)} "
            f"({', '.join(names)}){hint}"
        )
    return names


def _pixel_size(t: Affine) -> tuple[float, float]:
    if abs(t.b) > 1e-9 * abs(t.a) or abs(t.d) > 1e-9 * abs(t.e):
        raise SceneError("rotated geotransforms are not supported")
    return t.a, t.e


def coregister(scene: RawScene, what: str = "scene") -> RawScene:
    """Crop PAN and MS to their common footprint on the MS grid, PAN exactly ratio x MS.

    Errors (one line, naming ``what``): different CRS, pixel sizes whose ratio is not the
    sensor ratio (1 % tolerance), no overlap, misregistration above ``extra['max_shift_px']``,
    or an overlap smaller than one MS pixel.
    """
    r = scene.ratio
    if scene.pan.ndim != 2 or scene.ms.ndim != 3:
        raise SceneError(f"{what}: expected PAN (H, W) and MS (C, h, w), got {scene.pan.shape} and {scene.ms.shape}")
    # Sources reading PAN and MS from separate files put the MS CRS in extra["ms_crs"].
    extra_in = dict(scene.extra)
    pan_crs, ms_crs = scene.crs, extra_in.pop("ms_crs", scene.crs)
    same = (pan_crs is None and ms_crs is None) or (
        pan_crs is not None and ms_crs is not None and CRS.from_user_input(pan_crs) == CRS.from_user_input(ms_crs)
    )
    if not same:
        raise SceneError(f"{what}: PAN and MS have different CRS ({pan_crs} vs {ms_crs})")
    pa, pe = _pixel_size(scene.pan_transform)
    ma, me = _pixel_size(scene.ms_transform)
    if pa <= 0 or pe >= 0 or ma <= 0 or me >= 0:
        raise SceneError(f"{what}: expected north-up geotransforms (positive x, negative y pixel size)")
    for got, axis in ((ma / pa, "x"), (me / pe, "y")):
        if abs(got / r - 1) > 0.01:
            k = r / got
            hint = ""
            if round(k) >= 2 and abs(k / round(k) - 1) < 0.01:  # MS pixels exactly k x too small
                hint = (f"; the MS pixels are exactly {round(k)}x smaller than the sensor's: if the MS product is "
                        f"stored nearest-upsampled, set `ms_upsampled: auto` (or {round(k)}) on the scene")
            raise SceneError(
                f"{what}: MS/PAN pixel-size ratio along {axis} is {got:.4f}, sensor "
                f"{scene.sensor.name} needs {r}{hint}"
            )
    # PAN-pixel offset of the MS grid origin relative to the PAN grid origin.
    off_c = (scene.ms_transform.c - scene.pan_transform.c) / pa
    off_r = (scene.ms_transform.f - scene.pan_transform.f) / pe
    snap_c, snap_r = math.floor(off_c + 0.5 - 1e-6), math.floor(off_r + 0.5 - 1e-6)
    res_c, res_r = off_c - snap_c, off_r - snap_r
    max_shift = float(extra_in.get("max_shift_px", 0.5))
    if max(abs(res_c), abs(res_r)) > max_shift + 1e-6:
        raise SceneError(
            f"{what}: PAN and MS grids are misaligned by ({res_r:.3f}, {res_c:.3f}) PAN pixels "
            f"(> max_shift_px={max_shift})"
        )
    H, W = scene.pan.shape
    _, h, w = scene.ms.shape
    # MS pixel j covers PAN columns snap_c + r*j .. + r; keep j with that range inside [0, W).
    def _range(snap: int, n_ms: int, n_pan: int) -> tuple[int, int]:
        j0 = max(0, math.ceil(-snap / r))
        j1 = min(n_ms, (n_pan - snap) // r)
        return j0, j1

    c0, c1 = _range(snap_c, w, W)
    r0, r1 = _range(snap_r, h, H)
    if c1 - c0 < 1 or r1 - r0 < 1:
        raise SceneError(f"{what}: PAN and MS footprints do not overlap")
    ms = scene.ms[:, r0:r1, c0:c1]
    pan = scene.pan[snap_r + r * r0 : snap_r + r * r1, snap_c + r * c0 : snap_c + r * c1]
    ms_t = scene.ms_transform @ Affine.translation(c0, r0)
    pan_t = Affine(ms_t.a / r, 0.0, ms_t.c, 0.0, ms_t.e / r, ms_t.f)
    extra = extra_in
    extra.update(
        residual_shift_pan_px=[round(res_r, 4) + 0.0, round(res_c, 4) + 0.0],
        ms_crop=[int(r0), int(r1), int(c0), int(c1)],
        pan_pixel_size_declared=[pa, pe],
    )
    return RawScene(
        pan=np.ascontiguousarray(pan), ms=np.ascontiguousarray(ms), pan_transform=pan_t,
        ms_transform=ms_t, crs=pan_crs, sensor=scene.sensor,
        bands=scene.bands, nodata=scene.nodata, sources=scene.sources, licence=scene.licence,
        attribution=scene.attribution, extra=extra, scale=scene.scale,
    )


def _write_tif(path: Path, arr: np.ndarray, transform: Affine, crs: CRS | None, nodata: float | None,
               descriptions: tuple[str, ...]) -> None:
    arr = arr[None] if arr.ndim == 2 else arr
    profile = dict(
        driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype=arr.dtype.name,
        transform=transform, crs=crs, nodata=nodata, compress="deflate", tiled=True,
        blockxsize=256, blockysize=256,
    )
    if arr.shape[1] < 256 or arr.shape[2] < 256:
        profile.update(tiled=False)
        profile.pop("blockxsize")
        profile.pop("blockysize")
    with warnings.catch_warnings():
        if crs is None:  # pixel coordinates (.mat): said once by the caller, not once per file
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(arr)
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)


def _storage_dtype(a: np.ndarray) -> np.ndarray:
    """Keep integer DN compact: float data holding only whole numbers in uint16 range -> uint16."""
    if a.dtype == np.uint16:
        return a
    if np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 65535:
        return a.astype(np.uint16)
    if np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 65535 \
            and np.array_equal(a, np.round(a)):
        return a.astype(np.uint16)
    return a.astype(np.float32)


def scene_metadata(scene: RawScene, name: str) -> dict[str, Any]:
    b = rasterio.transform.array_bounds(scene.pan.shape[0], scene.pan.shape[1], scene.pan_transform)
    return {
        "name": name,
        "sensor": scene.sensor.name,
        "ratio": scene.ratio,
        "bands": list(scene.bands),
        "rgb": scene.sensor.rgb_indices(scene.bands),
        "scale": scene.scale if scene.scale is not None else scene.sensor.scale,
        "crs": scene.crs.to_string() if scene.crs is not None else None,
        "bounds": {"left": b[0], "bottom": b[1], "right": b[2], "top": b[3]},
        "pan_shape": list(scene.pan.shape),
        "ms_shape": list(scene.ms.shape),
        "pan_transform": list(scene.pan_transform)[:6],
        "ms_transform": list(scene.ms_transform)[:6],
        "nodata": scene.nodata,
        "sources": scene.sources,
        "licence": scene.licence,
        "attribution": scene.attribution,
        **{k: v for k, v in scene.extra.items() if k not in ("max_shift_px",)},
    }


def write_raw_scene(scene: RawScene, out_dir: str | Path, name: str | None = None) -> Path:
    """Write ``pan.tif``, ``ms.tif`` and ``scene.json`` atomically (temp dir, then rename)."""
    out_dir = Path(out_dir)
    name = name or out_dir.name
    if scene.crs is None:
        log.info("scene %s: the source has no georeferencing: pan.tif and ms.tif are in pixel coordinates", name)
    with atomic_dir(out_dir) as tmp:
        _write_tif(tmp / "pan.tif", _storage_dtype(scene.pan), scene.pan_transform, scene.crs, scene.nodata, ("pan",))
        _write_tif(tmp / "ms.tif", _storage_dtype(scene.ms), scene.ms_transform, scene.crs, scene.nodata, scene.bands)
        meta = scene_metadata(scene, name)
        (tmp / "scene.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out_dir


class SceneReader:
    """Windowed float64 reads of a raw scene (``pan.tif``, ``ms.tif``, ``scene.json``) with rasterio.

    Reads only the rows and columns asked for (``prepare`` streams a scene through it; :func:`read_raw_scene`
    reads the whole extents): the stored DN cast to float64. GDAL's block cache is capped at
    ``cache_mb``. Errors name the scene directory.
    """

    def __init__(self, scene_dir: str | Path, cache_mb: int = 32) -> None:
        scene_dir = Path(scene_dir)
        self.dir = scene_dir
        meta_path = scene_dir / "scene.json"
        if not meta_path.is_file():
            raise SceneError(f"{scene_dir}: no scene.json (run `bnnpan fetch` first)")
        self.meta = json.loads(meta_path.read_text())
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(rasterio.Env(GDAL_CACHEMAX=cache_mb))
            # .mat / PanCollection scenes are in pixel coordinates: said once when fetched, not per open
            self._stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self._pan = self._stack.enter_context(rasterio.open(scene_dir / "pan.tif"))
            self._ms = self._stack.enter_context(rasterio.open(scene_dir / "ms.tif"))
        except rasterio.errors.RasterioError as e:
            self._stack.close()
            raise SceneError(f"{scene_dir}: cannot read raster: {e}") from None
        self.pan_shape = (self._pan.height, self._pan.width)
        self.ms_shape = (self._ms.count, self._ms.height, self._ms.width)
        r = get_sensor(self.meta["sensor"]).ratio
        if self.pan_shape != (self.ms_shape[1] * r, self.ms_shape[2] * r):
            self._stack.close()
            raise SceneError(f"{scene_dir}: PAN {self.pan_shape} is not ratio {r} x MS {self.ms_shape[1:]}")

    def _read(self, ds: Any, indexes: Any, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        try:
            return ds.read(indexes, window=Window(c0, r0, c1 - c0, r1 - r0)).astype(np.float64)
        except rasterio.errors.RasterioError as e:
            raise SceneError(f"{self.dir}: cannot read raster: {e}") from None

    def pan(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """PAN rows [r0, r1) x columns [c0, c1), float64 (H, W)."""
        return self._read(self._pan, 1, r0, r1, c0, c1)

    def ms(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """MS rows [r0, r1) x columns [c0, c1) of every band, float64 (C, h, w)."""
        return self._read(self._ms, None, r0, r1, c0, c1)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()



def read_raw_scene(scene_dir: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a raw scene written by :func:`write_raw_scene`: (pan (H,W) float64, ms (C,h,w) float64, meta)."""
    with SceneReader(scene_dir) as r:
        c, h, w = r.ms_shape
        return r.pan(0, r.pan_shape[0], 0, r.pan_shape[1]), r.ms(0, h, 0, w), r.meta
