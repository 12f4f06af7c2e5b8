"""Windowed reads of a STAC item's COG assets over HTTP range requests (Maxar Open Data layout).

The fixture turns the real SpaceNet-6 WorldView-2 tile 1 into Cloud-Optimized GeoTIFFs (PAN
600 x 600 at 0.5 m; MS 4 x 150 x 150 at 2 m, the native grid of the x2-upsampled product)
plus a 4 x 4 tiled copy (PAN 2400 x 2400, MS 600 x 600) for the bytes-served test, and a
Maxar-style STAC item (platform WV02, eo:bands, relative asset hrefs) next to them. Each
test serves them from a real HTTP server on 127.0.0.1 (``tests/httpserver.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from bnnpan.config import Location, PixelWindow, StacScene
from bnnpan.data import stac
from bnnpan.data.download import FetchContext
from bnnpan.data.scene import SceneError, coregister, sha256_file
from bnnpan.data.stac import DEFAULT_LICENCE, UNVERIFIED_NOTE, load_stac_scene

try:
    from tests.httpserver import RangeHTTPServer, http_server  # noqa: F401
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from httpserver import RangeHTTPServer, http_server  # noqa: F401

WV2_BANDS = [  # SpaceNet-6 MS: blue, green, red, NIR1 (Maxar names and STAC common names)
    {"name": "BAND_B", "common_name": "blue"},
    {"name": "BAND_G", "common_name": "green"},
    {"name": "BAND_R", "common_name": "red"},
    {"name": "BAND_N", "common_name": "nir08"},
]


def _write_cog(path: Path, arr: np.ndarray, transform: Affine, crs: Any, block: int) -> None:
    arr = arr[None] if arr.ndim == 2 else arr
    with rasterio.open(
        path, "w", driver="COG", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
        dtype=arr.dtype.name, transform=transform, crs=crs, BLOCKSIZE=block, COMPRESS="DEFLATE",
        OVERVIEWS="AUTO",
    ) as dst:
        dst.write(arr)


@pytest.fixture(scope="module")
def cogs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Any]:
    src = shared_data / "worldview2-spacenet6"
    if not (src / "pan1.tif").is_file():
        pytest.skip(f"real WorldView-2 tile not found: {src / 'pan1.tif'}")
    with rasterio.open(src / "pan1.tif") as ds:
        pan, pan_t, crs = ds.read(1), ds.transform, ds.crs
    with rasterio.open(src / "ms1.tif") as ds:
        ms_up, ms_up_t = ds.read(), ds.transform
    ms = np.round(ms_up[:, ::2, ::2]).astype(np.uint16)  # undo the nearest x2 upsampling
    ms_t = ms_up_t @ Affine.scale(2)
    out = tmp_path_factory.mktemp("cogs")
    (out / "small").mkdir()
    (out / "big").mkdir()
    _write_cog(out / "small" / "pan.tif", pan, pan_t, crs, 128)
    _write_cog(out / "small" / "ms.tif", ms, ms_t, crs, 128)
    big_pan, big_ms = np.tile(pan, (4, 4)), np.tile(ms, (1, 4, 4))
    _write_cog(out / "big" / "pan.tif", big_pan, pan_t, crs, 128)
    _write_cog(out / "big" / "ms.tif", big_ms, ms_t, crs, 128)
    return {"dir": out, "pan": pan, "ms": ms, "big_pan": big_pan, "big_ms": big_ms,
            "pan_t": pan_t, "ms_t": ms_t, "crs": crs}


def make_item(folder: Path, cogs: dict[str, Any], *, platform: str | None = "WV02",
              bands: list[dict[str, str]] | None = WV2_BANDS, pan_href: str = "./pan.tif",
              ms_href: str = "./ms.tif", properties: dict[str, Any] | None = None,
              name: str = "item.json") -> Path:
    """Write a Maxar-style STAC item (relative hrefs by default) into ``folder``."""
    with rasterio.open(folder / "pan.tif") as ds:
        bounds = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    w, s, e, n = bounds
    props: dict[str, Any] = {"gsd": 0.5, "proj:epsg": 32631}
    if platform is not None:
        props["platform"] = platform
    props.update(properties or {})
    item = pystac.Item(
        id="10300100TEST0000", bbox=list(bounds),
        geometry={"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
        datetime=pystac.utils.str_to_datetime("2020-06-01T10:00:00Z"), properties=props,
    )
    cog = "image/tiff; application=geotiff; profile=cloud-optimized"
    item.add_asset("pan_analytic", pystac.Asset(href=pan_href, media_type=cog, roles=["data"]))
    ms_extra = {"eo:bands": bands} if bands is not None else {}
    item.add_asset("ms_analytic", pystac.Asset(href=ms_href, media_type=cog, roles=["data"],
                                                extra_fields=ms_extra))
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    path = folder / name
    path.write_text(json.dumps(d, indent=1))
    return path


def _publish(srv: RangeHTTPServer, cogs: dict[str, Any], which: str = "small") -> Path:
    """Link the COGs into the served folder ``scene/``; return that folder."""
    folder = srv.root / "scene"
    folder.mkdir()
    for name in ("pan.tif", "ms.tif"):
        (folder / name).symlink_to(cogs["dir"] / which / name)
    return folder


@pytest.fixture
def ctx(tmp_path: Path) -> FetchContext:
    return FetchContext(downloads=tmp_path / "downloads", progress=False)


def _cfg(item: Location, window: tuple[int, int, int, int] | None = (37, 21, 50, 40),
         **kw: Any) -> StacScene:
    win = None if window is None else PixelWindow(
        col_off=window[0], row_off=window[1], width=window[2], height=window[3])
    return StacScene(source="stac", item=item, window=win, **kw)


def _read_local(path: Path, window: Window) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(window=window)


def test_window_equals_local_read(http_server, cogs, ctx):
    folder = _publish(http_server, cogs)
    make_item(folder, cogs)
    url = http_server.url("scene/item.json")
    scene = load_stac_scene(_cfg(Location(url=url)), ctx)

    c, r, w, h = 37, 21, 50, 40
    local_dir = cogs["dir"] / "small"
    np.testing.assert_array_equal(scene.ms, _read_local(local_dir / "ms.tif", Window(c, r, w, h)))
    pan_win = Window(4 * c, 4 * r, 4 * w, 4 * h)
    np.testing.assert_array_equal(scene.pan, _read_local(local_dir / "pan.tif", pan_win)[0])
    # ... and the data are those of the original real tile.
    np.testing.assert_array_equal(scene.ms, cogs["ms"][:, r:r + h, c:c + w])
    np.testing.assert_array_equal(scene.pan, cogs["pan"][4 * r:4 * (r + h), 4 * c:4 * (c + w)])
    assert scene.ms.dtype == np.uint16 and scene.pan.dtype == np.uint16

    # PAN window = 4 x MS window, transforms co-registered (same corner, pixel ratio 4).
    assert scene.pan.shape == (4 * h, 4 * w) and scene.ms.shape == (4, h, w)
    assert scene.ms_transform == cogs["ms_t"] @ Affine.translation(c, r)
    assert scene.pan_transform == cogs["pan_t"] @ Affine.translation(4 * c, 4 * r)
    # The real product's MS/PAN pixel sizes differ from 4:1 by 6e-5, so the window corners
    # agree to a few millimetres (< 0.05 PAN pixel), not exactly.
    pa = scene.pan_transform.a
    assert abs(scene.pan_transform.c - scene.ms_transform.c) < 0.05 * pa
    assert abs(scene.pan_transform.f - scene.ms_transform.f) < 0.05 * pa
    assert scene.ms_transform.a / pa == pytest.approx(4, rel=1e-3)
    reg = coregister(scene, "stac")
    assert reg.pan.shape == scene.pan.shape and reg.ms.shape == scene.ms.shape
    assert max(map(abs, reg.extra["residual_shift_pan_px"])) < 0.05

    assert scene.sensor.name == "worldview2"
    assert scene.bands == ("blue", "green", "red", "nir1")
    assert scene.crs == cogs["crs"] and scene.extra["ms_crs"] == cogs["crs"]
    assert scene.licence == DEFAULT_LICENCE and scene.attribution == "Maxar Open Data"
    assert scene.extra["ms_window"] == {"col_off": c, "row_off": r, "width": w, "height": h}
    item_rec, pan_rec, ms_rec = scene.sources
    assert item_rec["url"] == url and item_rec["note"] == UNVERIFIED_NOTE
    assert item_rec["sha256"] == sha256_file(folder / "item.json")
    assert pan_rec["url"] == http_server.url("scene/pan.tif")
    assert ms_rec["url"] == http_server.url("scene/ms.tif")
    assert ms_rec["content-length"] == (local_dir / "ms.tif").stat().st_size
    assert ms_rec["etag"].startswith('"')
    assert ms_rec["sha256"] == hashlib.sha256(scene.ms.tobytes()).hexdigest()


def test_small_window_reads_a_small_fraction(http_server, cogs, ctx):
    folder = _publish(http_server, cogs, "big")
    make_item(folder, cogs)
    cfg = _cfg(Location(url=http_server.url("scene/item.json")), (300, 200, 64, 64))
    http_server.reset_counters()
    scene = load_stac_scene(cfg, ctx)
    np.testing.assert_array_equal(scene.ms, cogs["big_ms"][:, 200:264, 300:364])
    np.testing.assert_array_equal(scene.pan, cogs["big_pan"][800:1056, 1200:1456])
    sizes = {n: (cogs["dir"] / "big" / n).stat().st_size for n in ("pan.tif", "ms.tif")}
    served = {n: http_server.served(f"scene/{n}") for n in ("pan.tif", "ms.tif")}
    print(f"\nwindowed read (MS 64x64, PAN 256x256): served {served} of file sizes {sizes}")
    for n in sizes:
        assert 0 < served[n] < 0.25 * sizes[n], (n, served[n], sizes[n])
        assert all(r.status in (200, 206) for r in http_server.requests_for(f"scene/{n}"))
        # range requests only: never the whole file
        assert all(r.range for r in http_server.requests_for(f"scene/{n}", "GET"))


def test_item_with_sha256_is_verified_and_cached(http_server, cogs, ctx):
    folder = _publish(http_server, cogs)
    item_path = make_item(folder, cogs)
    url = http_server.url("scene/item.json")
    digest = sha256_file(item_path)
    scene = load_stac_scene(_cfg(Location(url=url, sha256=digest)), ctx)
    rec = scene.sources[0]
    assert rec["sha256"] == digest and "note" not in rec
    assert Path(rec["path"]).parent == ctx.downloads.resolve()
    # Relative hrefs resolve against the item's URL, not against the cached copy.
    assert scene.sources[1]["url"] == http_server.url("scene/pan.tif")
    with pytest.raises(SceneError, match="sha256 mismatch"):
        load_stac_scene(_cfg(Location(url=url, sha256="a" * 64)), ctx)


def test_local_item_and_whole_asset(cogs, tmp_path, ctx):
    folder = tmp_path / "local"
    folder.mkdir()
    for name in ("pan.tif", "ms.tif"):
        (folder / name).symlink_to(cogs["dir"] / "small" / name)
    item = make_item(folder, cogs)
    scene = load_stac_scene(_cfg(Location(path=str(item)), window=None), ctx)
    np.testing.assert_array_equal(scene.ms, cogs["ms"])
    np.testing.assert_array_equal(scene.pan, cogs["pan"])
    assert scene.sources[0]["note"] == UNVERIFIED_NOTE
    assert scene.sources[2]["content-length"] == (folder / "ms.tif").stat().st_size


def test_absolute_hrefs(http_server, cogs, ctx, tmp_path):
    _publish(http_server, cogs)
    elsewhere = tmp_path / "items"
    elsewhere.mkdir()
    (elsewhere / "pan.tif").symlink_to(cogs["dir"] / "small" / "pan.tif")
    item = make_item(elsewhere, cogs, pan_href=http_server.url("scene/pan.tif"),
                     ms_href=http_server.url("scene/ms.tif"))
    scene = load_stac_scene(_cfg(Location(url=item.as_uri())), ctx)
    assert scene.sources[2]["url"] == http_server.url("scene/ms.tif")
    np.testing.assert_array_equal(scene.ms, cogs["ms"][:, 21:61, 37:87])


@pytest.mark.parametrize(
    ("bands", "expected"),
    [
        ([WV2_BANDS[1], WV2_BANDS[0], *WV2_BANDS[2:]], ("green", "blue", "red", "nir1")),
        ([{"name": "b1", "common_name": "nir"}, {"name": "b2", "common_name": "red"},
          {"name": "b3", "common_name": "green"}, {"name": "b4", "common_name": "blue"}],
         ("nir1", "red", "green", "blue")),
        ([{"name": "BAND_C"}, {"name": "BAND_Y"}, {"name": "BAND_RE"}, {"name": "BAND_N2"}],
         ("coastal", "yellow", "red_edge", "nir2")),
    ],
)
def test_band_order_follows_eo_bands(http_server, cogs, ctx, bands, expected):
    folder = _publish(http_server, cogs)
    make_item(folder, cogs, bands=bands)
    scene = load_stac_scene(_cfg(Location(url=http_server.url("scene/item.json"))), ctx)
    assert scene.bands == expected


def test_declared_bands_win_and_are_checked(http_server, cogs, ctx):
    folder = _publish(http_server, cogs)
    make_item(folder, cogs)
    loc = Location(url=http_server.url("scene/item.json"))
    scene = load_stac_scene(_cfg(loc, bands=["red", "green", "blue", "nir2"]), ctx)
    assert scene.bands == ("red", "green", "blue", "nir2")
    with pytest.raises(SceneError, match="MS has 4 band"):
        load_stac_scene(_cfg(loc, bands=["red", "green", "blue"]), ctx)
    with pytest.raises(SceneError, match=r"has no band\(s\) \['pink'\]"):
        load_stac_scene(_cfg(loc, bands=["red", "green", "blue", "pink"]), ctx)
    make_item(folder, cogs, bands=None)  # no eo:bands: all 8 WV-2 bands expected
    with pytest.raises(SceneError, match="declare `bands:`"):
        load_stac_scene(_cfg(loc), ctx)


def test_sensor_from_platform_and_declared(http_server, cogs, ctx):
    folder = _publish(http_server, cogs)
    make_item(folder, cogs)
    loc = Location(url=http_server.url("scene/item.json"))
    assert load_stac_scene(_cfg(loc, sensor="worldview2"), ctx).sensor.name == "worldview2"
    with pytest.raises(SceneError, match="disagrees with the item's platform 'WV02'"):
        load_stac_scene(_cfg(loc, sensor="geoeye1"), ctx)
    make_item(folder, cogs, platform=None)
    with pytest.raises(SceneError, match="no `platform`"):
        load_stac_scene(_cfg(loc), ctx)
    assert load_stac_scene(_cfg(loc, sensor="worldview3"), ctx).sensor.name == "worldview3"


@pytest.mark.parametrize("window", [(140, 0, 20, 20), (0, 150, 10, 10), (0, 0, 151, 1)])
def test_window_out_of_bounds(http_server, cogs, ctx, window):
    folder = _publish(http_server, cogs)
    make_item(folder, cogs)
    with pytest.raises(SceneError, match=r"outside the MS asset \(150 x 150 pixels\)"):
        load_stac_scene(_cfg(Location(url=http_server.url("scene/item.json")), window), ctx)


def test_truncated_cog_is_an_error_not_a_hang(http_server, cogs, ctx, monkeypatch):
    monkeypatch.setattr(stac, "HTTP_TIMEOUT", 5)
    folder = _publish(http_server, cogs)
    data = (cogs["dir"] / "small" / "ms.tif").read_bytes()
    (folder / "ms_cut.tif").write_bytes(data[: len(data) // 2])
    make_item(folder, cogs, ms_href="./ms_cut.tif")
    t0 = time.monotonic()
    cfg = _cfg(Location(url=http_server.url("scene/item.json")), (0, 100, 150, 50))
    with pytest.raises(SceneError, match=r"ms_cut\.tif: cannot read the COG \(.*failed"):
        load_stac_scene(cfg, ctx)
    assert time.monotonic() - t0 < 10


def test_missing_asset_and_unknown_item(http_server, cogs, ctx):
    folder = _publish(http_server, cogs)
    make_item(folder, cogs, ms_href="./absent.tif")
    loc = Location(url=http_server.url("scene/item.json"))
    with pytest.raises(SceneError, match=r"absent\.tif: cannot read the COG"):
        load_stac_scene(_cfg(loc), ctx)
    with pytest.raises(SceneError, match="no asset 'visual'"):
        load_stac_scene(_cfg(loc, ms_asset="visual"), ctx)
    with pytest.raises(SceneError, match="cannot read STAC item"):
        load_stac_scene(_cfg(Location(url=http_server.url("scene/none.json"))), ctx)
    (folder / "bad.json").write_text('{"type": "Catalog"}')
    with pytest.raises(SceneError, match="not a STAC item"):
        load_stac_scene(_cfg(Location(url=http_server.url("scene/bad.json"))), ctx)


def test_licence_and_nodata_from_item_and_cfg(http_server, cogs, ctx):
    folder = _publish(http_server, cogs)
    make_item(folder, cogs, properties={"license": "CC-BY-NC-4.0"})
    loc = Location(url=http_server.url("scene/item.json"))
    scene = load_stac_scene(_cfg(loc), ctx)
    assert scene.licence == "CC-BY-NC-4.0" and scene.nodata == 0.0
    scene = load_stac_scene(_cfg(loc, licence="mine", attribution="me", nodata=None), ctx)
    assert (scene.licence, scene.attribution, scene.nodata) == ("mine", "me", None)


def test_server_errors_are_retried_by_gdal(http_server, cogs, ctx):
    folder = _publish(http_server, cogs)
    make_item(folder, cogs)
    http_server.fail_next(1, status=503, path="scene/ms.tif")
    scene = load_stac_scene(_cfg(Location(url=http_server.url("scene/item.json"))), ctx)
    np.testing.assert_array_equal(scene.ms, cogs["ms"][:, 21:61, 37:87])
    assert [r.status for r in http_server.requests_for("scene/ms.tif")][0] == 503


@pytest.mark.parametrize("cut", [1000, 40_000])
def test_dropped_connection_is_an_error_not_a_hang(http_server, cogs, ctx, cut):
    """A connection dropped mid-response (in the header or in a tile) fails in one line, fast.

    GDAL retries 429/5xx answers but not dropped connections; the fetch fails and can be re-run.
    """
    folder = _publish(http_server, cogs)
    make_item(folder, cogs)
    for _ in range(5):
        http_server.truncate_next("scene/ms.tif", cut)
    t0 = time.monotonic()
    with pytest.raises(SceneError, match=r"ms\.tif: cannot read the COG \(.*failed"):
        load_stac_scene(_cfg(Location(url=http_server.url("scene/item.json"))), ctx)
    assert time.monotonic() - t0 < 10


def test_fetch_scene_writes_a_raw_scene(http_server, cogs, ctx, tmp_path):
    """Through the fetch stage: co-registered, written, scene.json records the sources."""
    from bnnpan.data.sources import fetch_scene

    folder = _publish(http_server, cogs)
    make_item(folder, cogs)
    out = fetch_scene("maxar", _cfg(Location(url=http_server.url("scene/item.json"))), ctx,
                      tmp_path / "raw" / "maxar")
    meta = json.loads((out / "scene.json").read_text())
    assert meta["sensor"] == "worldview2" and meta["bands"] == ["blue", "green", "red", "nir1"]
    assert meta["pan_shape"] == [160, 200] and meta["ms_shape"] == [4, 40, 50]
    assert [s["name"] for s in meta["sources"]] == ["item", "pan", "ms"]
    assert meta["licence"] == DEFAULT_LICENCE
    with rasterio.open(out / "ms.tif") as ds:
        np.testing.assert_array_equal(ds.read(), cogs["ms"][:, 21:61, 37:87])
