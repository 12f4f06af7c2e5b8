"""Read a PAN/MS window of a STAC item (Maxar Open Data layout) without downloading whole files.

Maxar Open Data publishes each acquisition as a STAC item whose assets ``pan_analytic`` and
``ms_analytic`` are large Cloud-Optimized GeoTIFFs (hrefs usually relative to the item).
Downloading them whole would cost gigabytes for a scene of a few hundred metres, so the
rasters are opened with rasterio over GDAL's ``/vsicurl/``, which fetches only the COG
header and the tiles under the requested window with HTTP range requests.

What comes from where (never from the item id):

* sensor: ``properties.platform`` (``WV02`` -> ``worldview2`` via
  :func:`bnnpan.sensors.sensor_from_platform`), or ``cfg.sensor`` (both given and different
  is an error);
* band order: ``eo:bands`` (or STAC 1.1 ``bands``) of the MS asset, Maxar names
  (``BAND_B``...) or common names (``blue``, ``rededge``, ``nir08``...) mapped to the sensor's
  band names, unless ``cfg.bands`` declares them;
* the window: ``cfg.window`` on the MS grid; the PAN window is the same map rectangle
  on the PAN grid, rounded to whole PAN pixels and clipped to the PAN asset;
* licence/attribution: ``cfg``, else the item's ``license`` / ``license`` link, else
  Maxar Open Data's CC BY-NC 4.0.

The item itself is verified like any download when ``cfg.item.sha256`` is given; without
one it is read directly and its sha256 recorded with the note ``unverified: no sha256 given``.
The returned :class:`~bnnpan.data.scene.RawScene` is not yet co-registered: the caller runs
:func:`~bnnpan.data.scene.coregister` (``extra`` carries ``ms_crs`` and ``max_shift_px``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pystac
import rasterio
import requests
from affine import Affine
from rasterio.errors import RasterioError
from rasterio.windows import Window

from bnnpan.config import Location, StacScene
from bnnpan.data.download import FetchContext, file_url_path, resolve, sha256_bytes
from bnnpan.data.scene import RawScene, SceneError, check_bands
from bnnpan.sensors import Sensor, get_sensor, sensor_from_platform

DEFAULT_LICENCE = "CC BY-NC 4.0 (Maxar Open Data)"
DEFAULT_ATTRIBUTION = "Maxar Open Data"
# Seconds before GDAL gives up on a silent server (and per-request timeout of HEAD/GET here).
HTTP_TIMEOUT = 30
HTTP_CONNECT_TIMEOUT = 10
UNVERIFIED_NOTE = "unverified: no sha256 given"

# Maxar band names (IMD/eo:bands ``name``) and STAC common names -> candidate sensor band
# names, first match in the sensor's bands wins (4-band sensors call their NIR band "nir").
_MAXAR_NAMES: dict[str, tuple[str, ...]] = {
    "BAND_C": ("coastal",), "BAND_B": ("blue",), "BAND_G": ("green",), "BAND_Y": ("yellow",),
    "BAND_R": ("red",), "BAND_RE": ("red_edge",), "BAND_N": ("nir1", "nir"),
    "BAND_N2": ("nir2",),
}
_COMMON_NAMES: dict[str, tuple[str, ...]] = {
    "coastal": ("coastal",), "blue": ("blue",), "green": ("green",), "yellow": ("yellow",),
    "red": ("red",), "rededge": ("red_edge",), "red_edge": ("red_edge",),
    "nir": ("nir1", "nir"), "nir08": ("nir1", "nir"), "nir09": ("nir2",),
}
_NO_LICENCE = {"", "proprietary", "various", "other", "none", "unknown"}


def gdal_env(**overrides: Any) -> rasterio.Env:
    """The GDAL settings for windowed COG reads over HTTP.

    No directory listing on open (one request instead of a listing of an S3 prefix), no
    probing of sidecar files (only ``.tif`` names are fetched), a few retries of 429/5xx
    answers, short timeouts (a dead server is an error, not a hang) and a block cache.
    """
    opts: dict[str, Any] = dict(
        GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
        CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif,.TIF,.tiff,.TIFF",
        GDAL_HTTP_MAX_RETRY=3,
        GDAL_HTTP_RETRY_DELAY=0.5,
        GDAL_HTTP_TIMEOUT=HTTP_TIMEOUT,
        GDAL_HTTP_CONNECTTIMEOUT=HTTP_CONNECT_TIMEOUT,
        VSI_CACHE=True,
        VSI_CACHE_SIZE=64 << 20,
    )
    opts.update(overrides)
    return rasterio.Env(**opts)


def _where(loc: Location) -> str:
    return str(loc.url if loc.url is not None else loc.path)


def read_item(loc: Location, ctx: FetchContext) -> tuple[pystac.Item, dict[str, Any]]:
    """Read the STAC item at ``loc``; return it (hrefs resolving against ``loc``) and its record.

    With a sha256 the item goes through :func:`resolve` (downloaded, cached, verified);
    without one it is read directly and recorded as unverified.
    """
    where = _where(loc)
    if loc.path is not None or loc.sha256 is not None:
        local, rec = resolve(loc, ctx, "STAC item")
        data = local.read_bytes()
        # Relative asset hrefs resolve against where the item lives, never the cache copy.
        href = loc.url if loc.url is not None else str(Path(str(loc.path)).resolve())
    else:
        assert loc.url is not None
        data = _read_url(loc.url)
        href = loc.url
        rec = {"url": loc.url, "sha256": sha256_bytes(data)}
    if loc.sha256 is None:
        rec["note"] = UNVERIFIED_NOTE
    try:
        d = json.loads(data)
        item = pystac.Item.from_dict(d, href=href, preserve_dict=False)
    except (ValueError, KeyError, TypeError, pystac.STACError, pystac.STACTypeError) as e:
        raise SceneError(f"{where}: not a STAC item ({' '.join(str(e).split())})") from None
    return item, {"name": "item", **rec}


def _read_url(url: str) -> bytes:
    scheme = urlparse(url).scheme
    try:
        if scheme == "file":
            return file_url_path(url).read_bytes()
        if scheme in ("http", "https"):
            r = requests.get(url, timeout=(HTTP_CONNECT_TIMEOUT, HTTP_TIMEOUT))
            r.raise_for_status()
            return r.content
    except (OSError, requests.RequestException) as e:
        raise SceneError(f"{url}: cannot read STAC item ({' '.join(str(e).split())})") from None
    raise SceneError(f"{url}: scheme {scheme!r} not allowed (use http, https, file)")


def item_sensor(item: pystac.Item, declared: str | None, where: str) -> Sensor:
    """The sensor of an item: its ``platform``, checked against a declared ``sensor``."""
    platform = item.properties.get("platform")
    from_platform: Sensor | None = None
    if platform:
        try:
            from_platform = sensor_from_platform(str(platform))
        except ValueError as e:
            if declared is None:
                raise SceneError(f"{where}: {e}; declare `sensor:`") from None
    if declared is not None:
        sensor = get_sensor(declared)
        if from_platform is not None and from_platform.name != sensor.name:
            raise SceneError(
                f"{where}: sensor {declared!r} disagrees with the item's platform {platform!r} "
                f"({from_platform.name})"
            )
        return sensor
    if from_platform is None:
        raise SceneError(f"{where}: the item has no `platform` property; declare `sensor:`")
    return from_platform


def _band_entries(asset: pystac.Asset, item: pystac.Item) -> list[dict[str, Any]] | None:
    for fields in (asset.extra_fields, item.properties):
        for key in ("eo:bands", "bands"):
            v = fields.get(key)
            if isinstance(v, list) and v:
                return [b if isinstance(b, dict) else {} for b in v]
    return None


def item_bands(
    asset: pystac.Asset, item: pystac.Item, sensor: Sensor, where: str
) -> list[str] | None:
    """Sensor band names of the MS asset in file order, from its ``eo:bands`` (None if absent)."""
    entries = _band_entries(asset, item)
    if entries is None:
        return None
    names: list[str] = []
    for i, b in enumerate(entries, start=1):
        name = str(b.get("name") or "")
        common = str(b.get("common_name") or b.get("eo:common_name") or "").lower()
        candidates = (
            *_MAXAR_NAMES.get(name.upper(), ()), *_COMMON_NAMES.get(common, ()), name, name.lower()
        )
        hit = next((c for c in candidates if c in sensor.bands), None)
        if hit is None:
            raise SceneError(
                f"{where}: MS band {i} ({name or '?'}, common_name {common or '?'}) is not a band "
                f"of sensor {sensor.name} ({', '.join(sensor.bands)}); declare `bands:`"
            )
        names.append(hit)
    if len(set(names)) != len(names):
        raise SceneError(f"{where}: eo:bands map to duplicate band names {names}; declare `bands:`")
    return names


def item_licence(item: pystac.Item) -> str | None:
    """The licence the item declares (``properties.license`` or a ``license`` link), if any."""
    lic = str(item.properties.get("license") or "").strip()
    if lic.lower() not in _NO_LICENCE:
        return lic
    for link in item.links:
        if link.rel == "license":
            return link.title or link.href
    return None


def _gdal_path(href: str) -> str:
    scheme = urlparse(href).scheme
    if scheme in ("http", "https"):
        return f"/vsicurl/{href}"
    if scheme == "file":
        return str(file_url_path(href))
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return href
    raise SceneError(f"{href}: scheme {scheme!r} not supported for assets (use http, https, file)")


def _asset(item: pystac.Item, key: str, where: str) -> tuple[pystac.Asset, str]:
    asset = item.assets.get(key)
    if asset is None:
        have = ", ".join(sorted(item.assets))
        raise SceneError(f"{where}: item has no asset {key!r} (assets: {have})")
    href = asset.get_absolute_href() or asset.href
    return asset, href


def window_transform(window: Window, transform: Affine) -> Affine:
    """The geotransform of a window (``rasterio.windows.transform``, without its deprecated
    ``*`` on Affine)."""
    return transform @ Affine.translation(window.col_off, window.row_off)


def pan_window(ms_window: Window, ms_transform: Affine, pan_transform: Affine,
               pan_shape: tuple[int, int]) -> Window:
    """The PAN pixel window covering the map rectangle of an MS window (whole pixels, clipped)."""
    w = ms_window
    corners = [ms_transform @ (c, r) for c in (w.col_off, w.col_off + w.width)
               for r in (w.row_off, w.row_off + w.height)]
    px = [~pan_transform @ xy for xy in corners]
    c0, c1 = round(min(p[0] for p in px)), round(max(p[0] for p in px))
    r0, r1 = round(min(p[1] for p in px)), round(max(p[1] for p in px))
    c0, c1 = max(0, c0), min(pan_shape[1], c1)
    r0, r1 = max(0, r0), min(pan_shape[0], r1)
    if c1 <= c0 or r1 <= r0:
        raise SceneError("the window does not overlap the PAN asset")
    return Window(c0, r0, c1 - c0, r1 - r0)


def _gdal_message(e: BaseException) -> str:
    """One line from a rasterio error, preferring GDAL's own message (rasterio's read errors
    only say "see previous exception", which is the chained CPLE error)."""
    msg = str(e)
    cause = e.__cause__ or e.__context__
    if cause is not None and "previous exception" in msg:
        msg = str(cause)
    return " ".join(msg.split())


def _window_dict(w: Window) -> dict[str, int]:
    return {"col_off": int(w.col_off), "row_off": int(w.row_off),
            "width": int(w.width), "height": int(w.height)}


def _array_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()


def _http_facts(href: str) -> dict[str, Any]:
    """ETag and size of an asset, when cheaply available (one HEAD request, or a stat)."""
    scheme = urlparse(href).scheme
    try:
        if scheme in ("http", "https"):
            r = requests.head(href, timeout=(HTTP_CONNECT_TIMEOUT, 10), allow_redirects=True)
            if r.ok:
                out = {}
                if "ETag" in r.headers:
                    out["etag"] = r.headers["ETag"]
                if "Content-Length" in r.headers:
                    out["content-length"] = int(r.headers["Content-Length"])
                return out
            return {}
        path = file_url_path(href) if scheme == "file" else Path(href)
        return {"content-length": path.stat().st_size}
    except (OSError, ValueError, requests.RequestException):
        return {}


def load_stac_scene(cfg: StacScene, ctx: FetchContext) -> RawScene:
    """Read ``cfg.window`` (MS grid; None = whole asset) of a STAC item's PAN and MS assets.

    Returns an un-co-registered :class:`RawScene` (PAN (H, W), MS (C, h, w), windowed
    transforms, PAN CRS in ``crs`` and MS CRS in ``extra["ms_crs"]``). Every problem (item,
    sensor, bands, window, unreadable or truncated COG) is a one-line :class:`SceneError`.
    """
    where = _where(cfg.item)
    item, item_rec = read_item(cfg.item, ctx)
    sensor = item_sensor(item, cfg.sensor, where)
    pan_asset, pan_href = _asset(item, cfg.pan_asset, where)
    ms_asset, ms_href = _asset(item, cfg.ms_asset, where)
    declared = (
        list(cfg.bands) if cfg.bands is not None else item_bands(ms_asset, item, sensor, where)
    )
    pan_path, ms_path = _gdal_path(pan_href), _gdal_path(ms_href)
    current = ms_href
    try:
        with gdal_env():
            with rasterio.open(ms_path) as ms_ds:
                try:
                    bands = check_bands(ms_ds.count, sensor, declared, f"{where} ({cfg.ms_asset})")
                except SceneError:
                    raise
                except ValueError as e:  # Sensor.select: unknown or duplicate band names
                    raise SceneError(f"{where}: {e}") from None
                if cfg.window is None:
                    ms_win = Window(0, 0, ms_ds.width, ms_ds.height)
                else:
                    w = cfg.window
                    ms_win = Window(w.col_off, w.row_off, w.width, w.height)
                    if w.col_off + w.width > ms_ds.width or w.row_off + w.height > ms_ds.height:
                        raise SceneError(
                            f"{where}: window {_window_dict(ms_win)} is outside the MS asset "
                            f"({ms_ds.width} x {ms_ds.height} pixels)"
                        )
                ms = ms_ds.read(window=ms_win)
                ms_t = window_transform(ms_win, ms_ds.transform)
                ms_crs, ms_nodata, ms_transform = ms_ds.crs, ms_ds.nodata, ms_ds.transform
            current = pan_href
            with rasterio.open(pan_path) as pan_ds:
                if pan_ds.count != 1:
                    raise SceneError(f"{where}: PAN asset has {pan_ds.count} bands, expected 1")
                if ms_crs is not None and pan_ds.crs is not None and ms_crs != pan_ds.crs:
                    raise SceneError(
                        f"{where}: PAN and MS assets have different CRS ({pan_ds.crs} vs {ms_crs})"
                    )
                try:
                    pan_win = pan_window(ms_win, ms_transform, pan_ds.transform,
                                         (pan_ds.height, pan_ds.width))
                except SceneError as e:
                    raise SceneError(f"{where}: {e}") from None
                pan = pan_ds.read(1, window=pan_win)
                pan_t = window_transform(pan_win, pan_ds.transform)
                pan_crs, pan_nodata = pan_ds.crs, pan_ds.nodata
    except RasterioError as e:
        raise SceneError(f"{current}: cannot read the COG ({_gdal_message(e)})") from None

    if "nodata" in cfg.model_fields_set:
        nodata = cfg.nodata
    else:
        tag = ms_nodata if ms_nodata is not None else pan_nodata
        nodata = float(tag) if tag is not None else cfg.nodata
    sources = [item_rec]
    for name, key, href, win, arr in (
        ("pan", cfg.pan_asset, pan_href, pan_win, pan),
        ("ms", cfg.ms_asset, ms_href, ms_win, ms),
    ):
        sources.append({
            "name": name, "asset": key, "url": href, "window": _window_dict(win),
            "shape": list(arr.shape), "dtype": arr.dtype.name, "sha256": _array_sha256(arr),
            "sha256_of": "array bytes (C order) of the window read",
            **_http_facts(href),
        })
    extra: dict[str, Any] = {
        "ms_crs": ms_crs,
        "max_shift_px": cfg.max_shift_px,
        "stac_item": item.id,
        "platform": item.properties.get("platform"),
        "ms_window": _window_dict(ms_win),
        "pan_window": _window_dict(pan_win),
    }
    if item.properties.get("gsd") is not None:
        extra["gsd"] = item.properties["gsd"]
    return RawScene(
        pan=pan, ms=ms, pan_transform=pan_t, ms_transform=ms_t, crs=pan_crs, sensor=sensor,
        bands=tuple(bands), nodata=nodata, sources=sources,
        licence=cfg.licence or item_licence(item) or DEFAULT_LICENCE,
        attribution=cfg.attribution or DEFAULT_ATTRIBUTION, extra=extra,
    )
