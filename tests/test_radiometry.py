"""Radiometry per scene / dataset: the DN scale declared in params (``scale``/``bits``) or read from a .mat's ``L``
reaches the HDF5 ``scale`` attribute, the loaders, the PSNR peak and the report's conventions line.

Real data: SpaceNet-6 WorldView-2 tile 1 (``../shared/data/worldview2-spacenet6/``, 11-bit DN) turned into an
8-bit GeoEye-1-like product (DN // 8: max 233 PAN, 255 MS; blue, green, red, nir1 = GeoEye-1's four bands) and
stored as a toolbox-style ``.mat`` (``I_PAN``, ``I_MS_LR``, ``sensor``, optionally ``L``): what a user who
downloads an 8-bit GeoEye-1 scene has. With the sensor's 2047 its PSNR would be ~18 dB too high.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
import scipy.io

from bnnpan.config import validate_params
from bnnpan.data.datasets import PanDataset
from bnnpan.data.download import FetchContext
from bnnpan.data.hdf5io import read_attrs
from bnnpan.data.prepare import prepare_dataset
from bnnpan.data.scene import SceneError
from bnnpan.data.sources import fetch_scene
from bnnpan.eval.evaluate import evaluate_method
from bnnpan.eval.metrics_rr import reduced_resolution

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("error::rasterio.errors.NotGeoreferencedWarning")]


@pytest.fixture(scope="module")
def wv2_tile(shared_data) -> tuple[np.ndarray, np.ndarray]:
    """PAN (600 x 600) and native MS (150 x 150 x 4, MATLAB order) of tile 1, 11-bit DN."""
    d = shared_data / "worldview2-spacenet6"
    with rasterio.open(d / "pan1.tif") as f:
        pan = f.read(1).astype(np.float64)
    with rasterio.open(d / "ms1.tif") as f:
        ms = f.read()[:, ::2, ::2].astype(np.float64)  # stored nearest-upsampled x2
    return pan, np.moveaxis(ms, 0, -1)


def write_mat(path: Path, pan: np.ndarray, ms: np.ndarray, **extra) -> Path:
    scipy.io.savemat(path, {"I_PAN": pan, "I_MS_LR": ms, "sensor": "GE1", **extra})
    return path


def scene_params(tmp: Path, mat: Path, **scene) -> object:
    return validate_params({
        "paths": {"raw": str(tmp / "raw"), "prepared": str(tmp / "prepared"), "downloads": str(tmp / "dl"),
                  "reports": str(tmp / "reports")},
        "scenes": {"ge": {"source": "mat", "file": str(mat), "nodata": None, **scene}},
        # 150 x 150 MS: 16-pixel patches, a 16-row validation strip, one 96 x 96 test tile (>= 73: cut 21 + 32)
        "datasets": {"ge": {"scenes": ["ge"], "patch": 16, "stride": 16, "valid_size": 16, "test_tile": 96,
                            "min_test_tile": 96, "fr_tile": 96}},
        "evaluate": {"methods": ["exp"], "save_fused": True},
    })


def fetch(p) -> dict:
    fetch_scene("ge", p.scenes["ge"], FetchContext(downloads=Path(p.paths.downloads), progress=False),
                Path(p.paths.raw) / "ge")
    return json.loads((Path(p.paths.raw) / "ge" / "scene.json").read_text())


@pytest.mark.parametrize("declared", ["file L", "params bits", "params scale"])
def test_8bit_scene_gets_scale_255_everywhere(tmp_path, wv2_tile, declared, caplog):
    from bnnpan.report.build import build_report

    pan, ms = wv2_tile
    extra = {"L": 8} if declared == "file L" else {}
    mat = write_mat(tmp_path / "ge1_8bit.mat", np.floor(pan / 8), np.floor(ms / 8), **extra)
    scene = {"params bits": {"bits": 8}, "params scale": {"scale": 255}}.get(declared, {})
    p = scene_params(tmp_path, mat, **scene)
    with caplog.at_level(logging.INFO, logger="bnnpan"):
        meta = fetch(p)
        prepare_dataset(p, "ge")
    assert meta["sensor"] == "geoeye1" and meta["scale"] == 255.0
    assert meta["scale_source"] == ("file (L = 8 bits)" if declared == "file L" else "params")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the scale fits: nothing to warn
    assert sum("no georeferencing" in r.getMessage() for r in caplog.records) == 1  # said once, at fetch
    prepared = tmp_path / "prepared" / "ge"
    for split in ("train", "valid", "test_rr", "test_fr"):
        assert read_attrs(prepared / f"{split}.h5")["scale"] == 255.0  # HDF5 attribute
    assert json.loads((prepared / "manifest.json").read_text())["scale"] == 255.0
    ds = PanDataset(prepared / "train.h5")
    assert ds.scale == 255.0 and 0.5 < max(float(ds[i]["gt"].max()) for i in range(len(ds))) <= 1.0  # normalised
    metrics = evaluate_method(p, "ge", "exp")
    assert metrics["setup"]["psnr_peak"] == 255.0 and metrics["setup"]["scale"] == 255.0  # PSNR peak
    with h5py.File(prepared / "test_rr.h5") as f:
        direct = [reduced_resolution(f["gt"][i], f["lms"][i], 4, peak=255.0)["psnr"] for i in range(len(f["gt"]))]
        wrong = [reduced_resolution(f["gt"][i], f["lms"][i], 4, peak=2047.0)["psnr"] for i in range(len(f["gt"]))]
    assert metrics["indices"]["rr"]["psnr"]["mean"] == pytest.approx(float(np.mean(direct)), rel=1e-12)
    assert np.mean(wrong) - np.mean(direct) == pytest.approx(20 * math.log10(2047 / 255), rel=1e-9)  # ~18.1 dB
    summary = build_report(p.evaluated(), reports_dir=tmp_path / "reports",
                           prepared_dir=tmp_path / "prepared")["summary"].read_text()
    assert "DN scale 255; PSNR peak 255;" in summary  # the report's conventions line


def test_undeclared_8bit_data_warn_once_naming_the_bit_depth(tmp_path, wv2_tile, caplog):
    pan, ms = wv2_tile
    p = scene_params(tmp_path, write_mat(tmp_path / "ge.mat", np.floor(pan / 8), np.floor(ms / 8)))
    with caplog.at_level(logging.WARNING, logger="bnnpan"):
        meta = fetch(p)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert "the largest DN is 255" in warned[0] and "look 8-bit" in warned[0] and "bits: 8" in warned[0]
    assert meta["scale"] == 2047.0 and meta["scale_source"] == "sensor geoeye1 (11 bits)"


def test_dn_above_the_scale_and_contradicting_declarations_are_errors(tmp_path, wv2_tile):
    pan, ms = wv2_tile
    p = scene_params(tmp_path, write_mat(tmp_path / "ge11.mat", pan, ms), bits=8)  # 11-bit data declared 8-bit
    with pytest.raises(SceneError, match=r"DN up to 2046 exceed the scale 255 \(from params\); the data look 11-bit") \
            as e:
        fetch(p)
    assert "\n" not in str(e.value) and "ge11.mat" in str(e.value) and not (tmp_path / "raw" / "ge").exists()
    p = scene_params(tmp_path, write_mat(tmp_path / "ge8.mat", np.floor(pan / 8), np.floor(ms / 8), L=8), bits=11)
    with pytest.raises(SceneError, match=r"params give the scene scale 2047 but the file says 8-bit data \(`L` = 8"):
        fetch(p)
    p = scene_params(tmp_path, write_mat(tmp_path / "gebad.mat", pan, ms, L=np.array([[8, 11]])))
    with pytest.raises(SceneError, match=r"`L` variable \(bit depth\) must be one number"):
        fetch(p)


def test_scenes_of_one_dataset_must_share_a_scale(tmp_path, wv2_tile):
    pan, ms = wv2_tile
    a = write_mat(tmp_path / "a.mat", np.floor(pan / 8), np.floor(ms / 8), L=8)
    b = write_mat(tmp_path / "b.mat", pan, ms)
    p = validate_params({
        "paths": {"raw": str(tmp_path / "raw"), "prepared": str(tmp_path / "prepared")},
        "scenes": {n: {"source": "mat", "file": str(f), "nodata": None} for n, f in (("a", a), ("b", b))},
        "datasets": {"ab": {"scenes": ["a", "b"], "roles": {"a": "train", "b": "test"}, "patch": 16,
                            "test_tile": 96, "min_test_tile": 96, "fr_tile": 96}},
    })
    ctx = FetchContext(downloads=tmp_path / "dl", progress=False)
    for n in ("a", "b"):
        fetch_scene(n, p.scenes[n], ctx, tmp_path / "raw" / n)
    with pytest.raises(SceneError, match=r"sensor/bands/scale geoeye1 .* 2047 differ from the dataset's first scene "
                                         r"\(geoeye1 .* 255\)"):
        prepare_dataset(p, "ab")
    assert not (tmp_path / "prepared" / "ab").exists()


# ------------------------------------------------------------------------------- PanCollection datasets
@pytest.fixture(scope="module")
def wv3_8bit(shared_data) -> dict[str, np.ndarray]:
    """The WV3 PanCollection patches as 8-bit DN (// 8), MATLAB order, 20 samples."""
    path = shared_data / "pancollection-wv3" / "fusionnet_train_wv3.mat"
    d = scipy.io.loadmat(path)
    return {k: np.floor(d[k][:20] / 8.0) for k in ("gt", "lms", "ms", "pan")}


def _pc_params(tmp: Path, train: Path, **ds) -> object:
    return validate_params({"paths": {"prepared": str(tmp / "prepared"), "downloads": str(tmp / "dl")},
                            "datasets": {"pc": {"source": "pancollection", "train": str(train), **ds}}})


def test_pancollection_scale_from_mat_L_and_sensor(tmp_path, wv3_8bit):
    mat = tmp_path / "train8.mat"
    scipy.io.savemat(mat, {**wv3_8bit, "L": 8, "sensor": "WV3"})
    m = prepare_dataset(_pc_params(tmp_path, mat), "pc")  # no `sensor:`: the file's
    assert m["sensor"] == "worldview3" and m["scale"] == 255.0 and m["scale_source"] == "file (L = 8 bits)"
    assert read_attrs(tmp_path / "prepared" / "pc" / "train.h5")["scale"] == 255.0
    with pytest.raises(SceneError, match=r"train8.mat: dataset pc \(train\): params give dataset scale 2047 .*8-bit"):
        prepare_dataset(_pc_params(tmp_path, mat, bits=11), "pc")
    with pytest.raises(SceneError, match=r"params say sensor 'quickbird' but the file's `sensor` is 'WV3'"):
        prepare_dataset(_pc_params(tmp_path, mat, sensor="quickbird"), "pc")


def test_pancollection_declared_bits_and_the_low_maximum_warning(tmp_path, wv3_8bit, caplog):
    mat = tmp_path / "train8.mat"
    scipy.io.savemat(mat, wv3_8bit)  # no L, no sensor
    with pytest.raises(SceneError, match=r"dataset pc: `sensor:` is required"):
        prepare_dataset(_pc_params(tmp_path, mat), "pc")
    with caplog.at_level(logging.WARNING, logger="bnnpan"):
        m = prepare_dataset(_pc_params(tmp_path, mat, sensor="worldview3"), "pc")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert m["scale"] == 2047.0 and len(warned) == 1 and "look 8-bit" in warned[0] and "dataset pc" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bnnpan"):
        m = prepare_dataset(_pc_params(tmp_path, mat, sensor="worldview3", bits=8), "pc")
    assert m["scale"] == 255.0 and m["scale_source"] == "params" and not caplog.records
