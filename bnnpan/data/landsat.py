"""Landsat Level-1 tarballs: safe extraction, MTL parsing, georeferencing and PAN offset.

A Level-1 product is a tar (or tar.gz) of one GeoTIFF per band (``*_B{n}.TIF``,
Collection-2 naming) plus the ODL metadata file ``*_MTL.txt``. Only the members needed
are extracted, into a temporary directory, after every member name of the archive has
been checked (:func:`check_members`): absolute names, ``..`` components, links and
devices are refused (and ``tarfile``'s ``filter="data"`` is used on top of that).

When the TIFFs carry GeoTIFF tags they are used as they are. Some crops (e.g. the
xlandsat sample in ``shared/data/landsat8/``) carry none: the MS grid is then rebuilt
from the MTL corner coordinates, which are the **centres** of the corner pixels of the
reflective grid (origin = UL centre - half a cell), in WGS84 / UTM north
(``EPSG:326{zone}``; Landsat uses north zones with negative northings in the south).
The PAN of such a crop need not match the PAN corner numbers of the MTL, so the PAN
grid is placed by an integer offset: the PAN pixel whose centre is MS pixel (0, 0)'s
centre, given in the config or estimated by correlation (:func:`estimate_pan_offset`).
The remaining half-PAN-pixel offset between PAN and MS pixel *areas* is intrinsic to
Landsat and is snapped by :func:`bnnpan.data.scene.coregister`.
"""

from __future__ import annotations

import re
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from bnnpan.config import LandsatTarScene
from bnnpan.data.download import FetchContext, resolve
from bnnpan.data.scene import RawScene, SceneError, sha256_file
from bnnpan.sensors import get_sensor

PAN_BAND = "B8"
#: Reflective bands whose spectral range the OLI PAN (0.50-0.68 um) covers (B2 marginally).
PAN_COVERED = ("B2", "B3", "B4")
DEFAULT_ATTRIBUTION = "U.S. Geological Survey"

_ODL_LINE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=\s*(.*?)\s*$")


# --------------------------------------------------------------------------------------
# MTL (ODL) parsing
# --------------------------------------------------------------------------------------
def _odl_value(raw: str) -> Any:
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return raw[1:-1]
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def parse_mtl(text: str, what: str = "MTL") -> dict[str, Any]:
    """Parse an ODL ``_MTL.txt`` into nested dicts (``GROUP = X`` ... ``END_GROUP = X``).

    Quoted values become strings, numbers int or float, anything else stays a string.
    """
    root: dict[str, Any] = {}
    stack: list[tuple[str, dict[str, Any]]] = [("", root)]
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s == "END":
            continue
        m = _ODL_LINE.match(s)
        if m is None:
            raise SceneError(f"{what}: line {lineno} is not `KEY = value`: {s[:60]!r}")
        key, val = m.group(1), m.group(2)
        if key == "GROUP":
            child: dict[str, Any] = {}
            stack[-1][1][val] = child
            stack.append((val, child))
        elif key == "END_GROUP":
            if len(stack) == 1 or stack[-1][0] != val:
                raise SceneError(f"{what}: line {lineno}: END_GROUP = {val} without matching GROUP")
            stack.pop()
        else:
            stack[-1][1][key] = _odl_value(val)
    if len(stack) != 1:
        raise SceneError(f"{what}: GROUP {stack[-1][0]} is never closed")
    return root


def mtl_get(mtl: dict[str, Any], key: str, what: str = "MTL") -> Any:
    """Value of ``key`` anywhere in the parsed MTL (first found, breadth first)."""
    todo = [mtl]
    while todo:
        d = todo.pop(0)
        if key in d and not isinstance(d[key], dict):
            return d[key]
        todo.extend(v for v in d.values() if isinstance(v, dict))
    raise SceneError(f"{what}: no {key} in the metadata")


def mtl_grid(mtl: dict[str, Any], what: str = "MTL") -> dict[str, Any]:
    """Georeferencing from the MTL: CRS, cell sizes, the UL pixel centre and the MS size."""
    proj = str(mtl_get(mtl, "MAP_PROJECTION", what)) if _has(mtl, "MAP_PROJECTION") else "UTM"
    if proj != "UTM":
        raise SceneError(f"{what}: MAP_PROJECTION {proj!r} not supported (only UTM)")
    datum = str(mtl_get(mtl, "DATUM", what))
    if datum != "WGS84":
        raise SceneError(f"{what}: DATUM {datum!r} not supported (only WGS84)")
    zone = int(mtl_get(mtl, "UTM_ZONE", what))
    if not 1 <= zone <= 60:
        raise SceneError(f"{what}: UTM_ZONE {zone} out of range 1..60")
    g: dict[str, Any] = {
        "crs": CRS.from_epsg(32600 + zone),
        "utm_zone": zone,
        "pan_cell": float(mtl_get(mtl, "GRID_CELL_SIZE_PANCHROMATIC", what)),
        "ms_cell": float(mtl_get(mtl, "GRID_CELL_SIZE_REFLECTIVE", what)),
        "lines": int(mtl_get(mtl, "REFLECTIVE_LINES", what)),
        "samples": int(mtl_get(mtl, "REFLECTIVE_SAMPLES", what)),
    }
    c = {
        f"{k}_{ax}": float(mtl_get(mtl, f"CORNER_{k}_PROJECTION_{ax}_PRODUCT", what))
        for k in ("UL", "UR", "LL", "LR")
        for ax in ("X", "Y")
    }
    g["corners"] = c
    cell = g["ms_cell"]
    # The corners are pixel centres: the grid must span (samples - 1) x (lines - 1) cells.
    checks = (
        ("UR_X - UL_X", c["UR_X"] - c["UL_X"], (g["samples"] - 1) * cell),
        ("LR_X - LL_X", c["LR_X"] - c["LL_X"], (g["samples"] - 1) * cell),
        ("UL_Y - LL_Y", c["UL_Y"] - c["LL_Y"], (g["lines"] - 1) * cell),
        ("UR_Y - LR_Y", c["UR_Y"] - c["LR_Y"], (g["lines"] - 1) * cell),
    )
    for name, got, want in checks:
        if abs(got - want) > 1e-3 * cell:
            raise SceneError(
                f"{what}: corner coordinates are not a north-up {g['samples']} x {g['lines']} grid "
                f"of {cell} m cells ({name} = {got}, expected {want})"
            )
    g["ul_centre"] = (c["UL_X"], c["UL_Y"])
    return g


def _has(mtl: dict[str, Any], key: str) -> bool:
    try:
        mtl_get(mtl, key)
    except SceneError:
        return False
    return True


def mtl_ms_transform(grid: dict[str, Any]) -> Affine:
    """MS geotransform (pixel corners) from the UL pixel centre of the MTL."""
    x, y = grid["ul_centre"]
    c = grid["ms_cell"]
    return Affine(c, 0.0, x - c / 2, 0.0, -c, y + c / 2)


def mtl_pan_transform(grid: dict[str, Any], offset: tuple[int, int]) -> Affine:
    """PAN geotransform given the PAN index (dy, dx) whose centre is MS pixel (0, 0)'s centre."""
    x, y = grid["ul_centre"]
    p = grid["pan_cell"]
    dy, dx = offset
    return Affine(p, 0.0, x - p * dx - p / 2, 0.0, -p, y + p * dy + p / 2)


# --------------------------------------------------------------------------------------
# PAN offset by correlation
# --------------------------------------------------------------------------------------
def _smooth121(a: np.ndarray) -> np.ndarray:
    """Separable [0.25, 0.5, 0.25] smoothing (edge rows/columns replicated)."""
    p = np.pad(a, 1, mode="edge")
    v = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    return 0.25 * v[:, :-2] + 0.5 * v[:, 1:-1] + 0.25 * v[:, 2:]


def estimate_pan_offset(
    pan: np.ndarray,
    ms_ref: np.ndarray,
    ratio: int,
    nodata: float | None = 0.0,
    max_ms_size: int = 1024,
) -> dict[str, Any]:
    """Integer PAN index (dy, dx) whose pixel centre is MS pixel (0, 0)'s centre.

    ``ms_ref`` is the MS bands the PAN covers, (C, h, w) (averaged) or already (h, w). For
    every candidate in ``range(-ratio, ratio + 1)`` squared, PAN smoothed with the separable
    [0.25, 0.5, 0.25] kernel is sampled at ``(ratio*i + dy, ratio*j + dx)`` on the MS interior
    (the same MS pixels for every candidate, nodata dropped) and correlated (Pearson) with the
    band mean. Large scenes use a central window of at most ``max_ms_size`` MS pixels a side.
    Returns ``{"offset": (dy, dx), "correlation": r, "runner_up": (dy, dx),
    "runner_up_correlation": r2}``.
    """
    R = int(ratio)
    stack = ms_ref if ms_ref.ndim == 3 else ms_ref[None]
    _, h, w = stack.shape
    # Central window: MS rows/cols [a, a + n) and the PAN rows/cols from R * a on.
    ia, ja = max(0, (h - max_ms_size) // 2), max(0, (w - max_ms_size) // 2)
    stack = stack[:, ia : ia + max_ms_size, ja : ja + max_ms_size]
    pan = pan[R * ia : R * (ia + max_ms_size) + R, R * ja : R * (ja + max_ms_size) + R]
    _, h, w = stack.shape
    H, W = pan.shape
    s = _smooth121(pan.astype(np.float64))
    # MS rows i with R*i + dy inside [1, H - 2] for every dy in [-R, R] (smoothing border out).
    i0, j0 = -(-(R + 1) // R), -(-(R + 1) // R)
    i1, j1 = min(h, (H - 2 - R) // R + 1), min(w, (W - 2 - R) // R + 1)
    if i1 - i0 < 3 or j1 - j0 < 3:
        raise SceneError(
            f"PAN {pan.shape} and MS {stack.shape[1:]} too small to estimate the PAN offset"
        )
    sub = stack[:, i0:i1, j0:j1].astype(np.float64)
    ref = sub.mean(axis=0)
    valid = np.all(np.isfinite(sub), axis=0)
    if nodata is not None:
        valid &= ~np.all(sub == nodata, axis=0)
    results = []
    for dy in range(-R, R + 1):
        for dx in range(-R, R + 1):
            win = (
                slice(R * i0 + dy, R * (i1 - 1) + dy + 1, R),
                slice(R * j0 + dx, R * (j1 - 1) + dx + 1, R),
            )
            smp = s[win]
            ok = valid & np.isfinite(smp)
            if nodata is not None:
                ok &= pan[win] != nodata
            a, b = smp[ok], ref[ok]
            if a.size < 10 or a.std() == 0 or b.std() == 0:
                r = -np.inf
            else:
                r = float(np.corrcoef(a, b)[0, 1])
            results.append((r, (dy, dx)))
    results.sort(key=lambda t: -t[0])
    (r1, best), (r2, second) = results[0], results[1]
    return {
        "offset": best,
        "correlation": r1,
        "runner_up": second,
        "runner_up_correlation": r2,
    }


# --------------------------------------------------------------------------------------
# Tar handling
# --------------------------------------------------------------------------------------
def check_members(members: list[tarfile.TarInfo], what: str) -> None:
    """Refuse the archive if any member could escape the extraction directory.

    Absolute names, ``..`` components, links (hard or symbolic), devices and FIFOs are
    errors naming the member (a Landsat product has no reason to hold any of them).
    """
    for m in members:
        name = m.name
        p = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or p.is_absolute() or re.match(r"^[A-Za-z]:", name):
            raise SceneError(f"{what}: unsafe archive member {name!r} (absolute path)")
        if ".." in p.parts:
            raise SceneError(f"{what}: unsafe archive member {name!r} ('..' component)")
        if m.issym() or m.islnk():
            raise SceneError(f"{what}: unsafe archive member {name!r} (link to {m.linkname!r})")
        if not (m.isfile() or m.isdir()):
            raise SceneError(f"{what}: unsafe archive member {name!r} (not a regular file)")


def _find_member(members: list[tarfile.TarInfo], suffix: str, what: str) -> tarfile.TarInfo:
    sfx = suffix.upper()
    hits = [m for m in members if m.isfile() and PurePosixPath(m.name).name.upper().endswith(sfx)]
    if not hits:
        raise SceneError(f"{what}: no member *{suffix} in the archive")
    if len(hits) > 1:
        raise SceneError(f"{what}: several members *{suffix}: {[m.name for m in hits]}")
    return hits[0]


def extract_members(archive: Path, suffixes: list[str], dest: Path) -> dict[str, Path]:
    """Extract the members ending in ``suffixes`` (one each) into ``dest``; return suffix -> path.

    Every member name is checked first (:func:`check_members`); a truncated or corrupt
    archive is a :class:`SceneError`.
    """
    what = str(archive)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()  # reads the whole archive: truncation shows up here
            check_members(members, what)
            wanted = {sfx: _find_member(members, sfx, what) for sfx in suffixes}
            for m in wanted.values():
                tar.extract(m, path=dest, filter="data")
    except SceneError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        msg = str(e).replace("\n", " ")
        raise SceneError(
            f"{what}: truncated or corrupt archive ({type(e).__name__}: {msg})"
        ) from None
    out: dict[str, Path] = {}
    root = dest.resolve()
    for sfx, m in wanted.items():
        p = (dest / m.name).resolve()
        if not p.is_relative_to(root) or not p.is_file():  # belt and braces
            raise SceneError(f"{what}: member {m.name!r} did not extract inside the temp dir")
        out[sfx] = p
    return out


def _read_tif(path: Path, label: str) -> tuple[np.ndarray, Affine, CRS | None, bool]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                if ds.count != 1:
                    raise SceneError(f"{label}: expected 1 band, found {ds.count}")
                arr = ds.read(1)
                t, crs = ds.transform, ds.crs
    except SceneError:
        raise
    except RasterioError as e:
        msg = str(e).replace("\n", " ")
        raise SceneError(f"{label}: cannot read GeoTIFF ({msg})") from None
    georef = crs is not None and t != Affine.identity()
    return arr, t, crs, georef


def load_landsat_tar(cfg: LandsatTarScene, ctx: FetchContext) -> RawScene:
    """Load a Landsat Level-1 tarball (see the module docstring) as an un-co-registered RawScene."""
    path, record = resolve(cfg.archive, ctx, what="Landsat archive")
    what = str(path)
    sensor = get_sensor(cfg.sensor or "landsat8")
    bands = list(cfg.bands) if cfg.bands is not None else list(sensor.bands)
    try:
        sensor.select(bands)
    except ValueError as e:
        raise SceneError(f"{what}: {e}") from None
    need_ref = cfg.pan_offset == "auto"
    read_bands = bands + [b for b in PAN_COVERED if need_ref and b not in bands]
    suffixes = [f"_{b}.TIF" for b in read_bands] + [f"_{PAN_BAND}.TIF", "_MTL.txt"]

    with tempfile.TemporaryDirectory(prefix="bnnpan-landsat-") as tmp:
        files = extract_members(path, suffixes, Path(tmp))
        mtl_path = files["_MTL.txt"]
        try:
            mtl_text = mtl_path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise SceneError(f"{what}: cannot read {mtl_path.name}: {e}") from None
        mtl = parse_mtl(mtl_text, what=f"{what}:{mtl_path.name}")
        members = []
        arrays: dict[str, np.ndarray] = {}
        tinfo: dict[str, tuple[Affine, CRS | None, bool]] = {}
        for b in [*read_bands, PAN_BAND]:
            f = files[f"_{b}.TIF"]
            label = f"{what}:{f.name}"
            arr, t, crs, georef = _read_tif(f, label)
            arrays[b], tinfo[b] = arr, (t, crs, georef)
            members.append({"member": f.name, "sha256": sha256_file(f)})
        members.append({"member": mtl_path.name, "sha256": sha256_file(mtl_path)})

    ms_shapes = {b: arrays[b].shape for b in read_bands}
    if len(set(ms_shapes.values())) != 1:
        raise SceneError(f"{what}: MS bands have different sizes {ms_shapes}")
    georefs = {b: tinfo[b][2] for b in [*read_bands, PAN_BAND]}
    extra: dict[str, Any] = {"landsat_product_id": _opt(mtl, "LANDSAT_PRODUCT_ID")}
    extra["acquired"] = str(_opt(mtl, "DATE_ACQUIRED"))
    extra["cloud_cover"] = _opt(mtl, "CLOUD_COVER")

    if all(georefs.values()):
        # The TIFFs carry GeoTIFF tags: trust them (coregister checks CRS and pixel sizes).
        t_ms, crs_ms, _ = tinfo[read_bands[0]]
        for b in read_bands:
            if tinfo[b][0] != t_ms or tinfo[b][1] != crs_ms:
                raise SceneError(
                    f"{what}: band {b} has a different geotransform or CRS from {read_bands[0]}"
                )
        pan_t, pan_crs, _ = tinfo[PAN_BAND]
        ms_t = t_ms
        extra.update(georeferencing="geotiff", ms_crs=crs_ms)
        crs = pan_crs
    elif any(georefs.values()):
        tagged = sorted(b for b, g in georefs.items() if g)
        raise SceneError(f"{what}: only some band files carry GeoTIFF tags ({tagged})")
    else:
        grid = mtl_grid(mtl, what=f"{what}:{mtl_path.name}")
        h, w = next(iter(ms_shapes.values()))
        if (h, w) != (grid["lines"], grid["samples"]):
            raise SceneError(
                f"{what}: MS bands are {h} x {w} but the MTL says REFLECTIVE_LINES x SAMPLES = "
                f"{grid['lines']} x {grid['samples']}"
            )
        cell_ratio = grid["ms_cell"] / grid["pan_cell"]
        if abs(cell_ratio - sensor.ratio) > 1e-6:
            raise SceneError(
                f"{what}: MTL cell sizes {grid['ms_cell']}/{grid['pan_cell']} give ratio "
                f"{cell_ratio}, sensor {sensor.name} needs {sensor.ratio}"
            )
        if cfg.pan_offset == "auto":
            ref = np.stack([arrays[b] for b in PAN_COVERED])
            est = estimate_pan_offset(arrays[PAN_BAND], ref, sensor.ratio, cfg.nodata)
            if not est["correlation"] > 0.8:
                raise SceneError(
                    f"{what}: cannot estimate the PAN offset reliably (best correlation "
                    f"{est['correlation']:.3f} at {est['offset']}); set `pan_offset: [row, col]`"
                )
            offset = tuple(int(v) for v in est["offset"])
            extra.update(
                pan_offset=list(offset),
                pan_offset_method="auto",
                pan_offset_correlation=round(est["correlation"], 6),
                pan_offset_runner_up=list(est["runner_up"]),
                pan_offset_runner_up_correlation=round(est["runner_up_correlation"], 6),
            )
        else:
            offset = (int(cfg.pan_offset[0]), int(cfg.pan_offset[1]))
            extra.update(pan_offset=list(offset), pan_offset_method="config")
        ms_t = mtl_ms_transform(grid)
        pan_t = mtl_pan_transform(grid, offset)
        crs = grid["crs"]
        extra.update(
            georeferencing="mtl", utm_zone=grid["utm_zone"], mtl_ul_centre=list(grid["ul_centre"])
        )

    ms = np.stack([arrays[b] for b in bands])
    record = dict(record)
    record["members"] = members
    return RawScene(
        pan=arrays[PAN_BAND], ms=ms, pan_transform=pan_t, ms_transform=ms_t, crs=crs,
        sensor=sensor, bands=tuple(cfg.bands) if cfg.bands is not None else (),
        nodata=cfg.nodata, sources=[record], licence=cfg.licence,
        attribution=cfg.attribution or _opt(mtl, "ORIGIN") or DEFAULT_ATTRIBUTION, extra=extra,
    )


def _opt(mtl: dict[str, Any], key: str) -> Any:
    try:
        return mtl_get(mtl, key)
    except SceneError:
        return None
