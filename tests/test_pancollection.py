"""`source: pancollection`: the field's ready-made files imported as a prepared dataset (bnnpan.data.pancollection).

Real data: the 100 WorldView-3 PanCollection-style patches in ``../shared/data/pancollection-wv3/`` (a v5
``.mat``, N x H x W x C, uint16 DN). The tests also write them in the exact PanCollection HDF5 layout
(float64, N x C x H x W, no attributes) and, because the 64 x 64 patches are too small for the toolbox's
21-pixel border cut plus one 32 x 32 block, tile them 4 x 4 into 256 x 256 reduced-resolution test tiles
(6 mosaics of 16 patches; ``ms`` 64 x 64) so that the default conventions (cut 21, block 32) are used
unchanged. The mosaics have seams: they test the import and the indices, not the imagery.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import yaml
from rasterio.errors import NotGeoreferencedWarning
from typer.testing import CliRunner

from bnnpan.cli import app
from bnnpan.config import ConfigError, validate_params
from bnnpan.data import pancollection
from bnnpan.data.hdf5io import validate_h5
from bnnpan.data.prepare import prepare_dataset
from bnnpan.data.scene import SceneError, sha256_file
from bnnpan.eval.evaluate import evaluate_method
from bnnpan.eval.metrics_rr import reduced_resolution
from bnnpan.pipeline import build_stages, render_dvc_yaml

pytestmark = pytest.mark.usefixtures("one_thread")
KEYS = ("gt", "lms", "ms", "pan")


# ----------------------------------------------------------------------------------------- test data
@pytest.fixture(scope="module")
def wv3_mat(shared_data) -> Path:
    path = shared_data / "pancollection-wv3" / "fusionnet_train_wv3.mat"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def wv3(wv3_mat) -> dict[str, np.ndarray]:
    """The patches as PanCollection's HDF5 holds them: N x C x H x W float64 DN (``pan`` N x 1 x H x W)."""
    d = scipy.io.loadmat(wv3_mat)
    return {k: np.moveaxis(d[k], -1, 1).astype(np.float64) if d[k].ndim == 4 else d[k][:, None].astype(np.float64)
            for k in KEYS}


def write_pc_h5(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """The exact PanCollection layout: float64 datasets, N x C x H x W, no attributes at all."""
    with h5py.File(path, "w") as f:
        for k, a in arrays.items():
            f.create_dataset(k, data=np.asarray(a, dtype=np.float64))
    return path


def mosaics(a: dict[str, np.ndarray], k: int = 4) -> dict[str, np.ndarray]:
    """Tile patches k x k into larger tiles (16 patches of 64 -> one 256 x 256 tile, ``ms`` 64 x 64)."""
    out = {}
    n = len(a["pan"]) // (k * k)
    for key, v in a.items():
        v = v[: n * k * k]
        c, h, w = v.shape[1:]
        v = v.reshape(n, k, k, c, h, w).transpose(0, 3, 1, 4, 2, 5).reshape(n, c, k * h, k * w)
        out[key] = np.ascontiguousarray(v)
    return out


def make_params(tmp: Path, datasets: dict, **extra) -> object:
    raw = {"paths": {"raw": str(tmp / "raw"), "prepared": str(tmp / "prepared"), "downloads": str(tmp / "dl"),
                     "models": str(tmp / "models"), "reports": str(tmp / "reports")},
           "datasets": datasets, **extra}
    return validate_params(raw, tmp / "params.yaml")


def wv3_dataset(**files) -> dict:
    return {"source": "pancollection", "sensor": "worldview3", **{k: str(v) for k, v in files.items()}}


def read_prepared(d: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for f in sorted(d.glob("*.h5")):
        with h5py.File(f) as h:
            out[f.stem] = {k: h[k][()] for k in h}
    return out


# ------------------------------------------------------------------------------- import: .mat and .h5
def test_mat_and_pancollection_h5_import_to_identical_prepared_files(tmp_path, wv3_mat, wv3):
    h5 = write_pc_h5(tmp_path / "train_wv3.h5", wv3)
    with h5py.File(h5) as f:
        assert len(f.attrs) == 0 and all(f[k].dtype == np.float64 for k in KEYS)  # the field's layout
    p = make_params(tmp_path, {"from_mat": wv3_dataset(train=wv3_mat), "from_h5": wv3_dataset(train=h5)})
    m_mat = prepare_dataset(p, "from_mat")
    m_h5 = prepare_dataset(p, "from_h5")
    a, b = read_prepared(tmp_path / "prepared" / "from_mat"), read_prepared(tmp_path / "prepared" / "from_h5")
    assert set(a) == set(b) == {"train", "valid"}
    for split in a:
        for k in (*KEYS, "source_index", "window", "geotransform", "scene_index"):
            np.testing.assert_array_equal(a[split][k], b[split][k], err_msg=f"{split}/{k}")
    # the values are the source's DN (exact in float32), N x C x H x W; valid = the last 10 % of train
    n = len(wv3["pan"])
    for k in KEYS:
        np.testing.assert_array_equal(a["train"][k], wv3[k][: n - 10].astype(np.float32))
        np.testing.assert_array_equal(a["valid"][k], wv3[k][n - 10:].astype(np.float32))
    assert a["valid"]["source_index"].tolist() == list(range(90, 100))
    # the same files, attributes and checks as a locally prepared dataset
    d = tmp_path / "prepared" / "from_h5"
    for split in ("train", "valid"):
        info = validate_h5(d / f"{split}.h5")  # manifest sha256 + shapes + attributes + every value finite
        attrs = info["attrs"]
        assert attrs["sensor"] == "worldview3" and attrs["ratio"] == 4 and attrs["scale"] == 2047.0
        assert len(attrs["bands"]) == 8 and attrs["split"] == split and attrs["provenance"] == "PanCollection import"
        with h5py.File(d / f"{split}.h5") as f:
            for k in KEYS:
                assert f[k].chunks == (1, *f[k].shape[1:]) and f[k].fletcher32 and f[k].dtype == np.float32
    assert m_h5["files"]["train.h5"]["n"] == 90 and m_h5["files"]["valid.h5"]["n"] == 10
    assert m_h5["provenance"] == "PanCollection import"
    assert m_h5["scenes"][0]["source_file"]["sha256"] == sha256_file(h5)
    assert m_mat["scenes"][0]["source_file"]["sha256"] == sha256_file(wv3_mat)
    assert m_mat["scenes"][0]["source_file"]["format"] == "MATLAB v5"
    assert json.loads((d / "manifest.json").read_text())["files"]["train.h5"]["sha256"] == sha256_file(d / "train.h5")


def test_mat_v73_imports_like_the_h5(tmp_path, wv3):
    """A v7.3 .mat (HDF5, column-major: h5py sees C x W x H x N) gives the same arrays."""
    sub = {k: v[:12] for k, v in wv3.items()}
    path = tmp_path / "train_v73.mat"
    with h5py.File(path, "w", userblock_size=512) as f:  # MATLAB's 512-byte user block, then HDF5
        for k, v in sub.items():
            matlab = np.moveaxis(v, 1, -1) if k != "pan" else v[:, 0]  # N x H x W x C (pan N x H x W)
            f.create_dataset(k, data=np.ascontiguousarray(matlab.T))  # as MATLAB writes it: reversed axes
    with open(path, "r+b") as f:  # the header text MATLAB writes into the user block
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")
    h5 = write_pc_h5(tmp_path / "train.h5", sub)
    p = make_params(tmp_path, {"a": wv3_dataset(train=path, valid=h5), "b": wv3_dataset(train=h5, valid=h5)})
    ma = prepare_dataset(p, "a")
    prepare_dataset(p, "b")
    assert ma["scenes"][0]["source_file"]["format"] == "MATLAB v7.3"
    a, b = read_prepared(tmp_path / "prepared" / "a"), read_prepared(tmp_path / "prepared" / "b")
    for k in KEYS:
        np.testing.assert_array_equal(a["train"][k], b["train"][k])


def test_copy_reads_bounded_chunks_of_whole_samples(tmp_path, wv3, monkeypatch):
    """However large the source, no read holds more than CHUNK_BYTES (a 6 GB train_wv3.h5 is never read whole)."""
    h5 = write_pc_h5(tmp_path / "train.h5", wv3)
    p = make_params(tmp_path, {"small": wv3_dataset(train=h5), "big": wv3_dataset(train=h5)})
    prepare_dataset(p, "big")
    budget = 3 * 8 * 8 * 64 * 64  # three gt samples in float64
    monkeypatch.setattr(pancollection, "CHUNK_BYTES", budget)
    sizes = []
    orig = pancollection._Reader.read

    def spy(self, key, i0, i1):
        a = orig(self, key, i0, i1)
        sizes.append((key, a.nbytes))
        return a

    monkeypatch.setattr(pancollection._Reader, "read", spy)
    prepare_dataset(p, "small")
    assert max(n for _, n in sizes) <= budget
    assert sum(k == "gt" for k, _ in sizes) == 30 + 4  # 90 train + 10 valid samples, 3 at a time
    a, b = read_prepared(tmp_path / "prepared" / "small"), read_prepared(tmp_path / "prepared" / "big")
    for split in a:
        for k in KEYS:
            np.testing.assert_array_equal(a[split][k], b[split][k])


# ------------------------------------------------------------------- train, evaluate, report unchanged
@pytest.fixture(scope="module")
def imported(tmp_path_factory, wv3_mat, wv3):
    """train from the .mat, reduced- and full-resolution test tiles from 256 x 256 mosaics (HDF5 layout)."""
    tmp = tmp_path_factory.mktemp("pc")
    mos = mosaics(wv3)
    rr = write_pc_h5(tmp / "test_wv3_multiExm1.h5", mos)
    fr = write_pc_h5(tmp / "test_wv3_OrigScale_multiExm1.h5", {k: mos[k] for k in ("lms", "ms", "pan")})
    p = make_params(tmp, {"wv3": {**wv3_dataset(train=wv3_mat, test_rr=rr, test_fr=fr),
                                  "licence": "GPL-3.0 (FusionNet)", "attribution": "Maxar/DigitalGlobe"}},
                    model={"width": 8, "depth": 1},
                    train={"defaults": {"iterations": 4, "batch_size": 8, "val_every": 2, "ckpt_every": 2},
                           "methods": {"fp": {}, "bnnpan": {}}},
                    prior={"latent_dim": 8, "width": 8, "stage1_iterations": 2, "stage2_iterations": 2},
                    evaluate={"methods": ["exp"], "save_fused": True})
    prepare_dataset(p, "wv3")
    return p, tmp, mos


def test_train_evaluate_and_report_run_on_the_import(imported, caplog):
    from bnnpan.report.build import build_report
    from bnnpan.train.prior import pretrain_prior
    from bnnpan.train.run import train_method

    p, tmp, _ = imported
    prior = pretrain_prior(p, "wv3", track=False, progress=False)
    assert math.isfinite(prior["stage2"]["val_psnr"])
    for m in ("fp", "bnnpan"):
        r = train_method(p, "wv3", m, track=False, progress=False)
        assert r["step"] == 4 and math.isfinite(r["val_psnr"])
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="bnnpan"):
        warnings.simplefilter("always")
        results = {m: evaluate_method(p, "wv3", m) for m in ("exp", "fp", "bnnpan")}
    # no rasterio warning per fused tile; one line says the output has no georeferencing
    assert not [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)]
    assert sum("no georeferencing" in r.getMessage() for r in caplog.records) == 3  # once per evaluation
    for m, metrics in results.items():
        assert metrics["setup"]["n_tiles"] == {"rr": 6, "fr": 6}
        assert metrics["setup"]["psnr_peak"] == 2047.0
        assert all(math.isfinite(v["mean"]) for v in metrics["indices"]["rr"].values()), m
        assert all(math.isfinite(v["mean"]) for v in metrics["indices"]["fr"].values()), m
        assert (tmp / "reports" / "wv3" / m / "metrics.json").is_file()
        assert len(list((tmp / "reports" / "wv3" / m / "fused").glob("*.tif"))) == 12
    paths = build_report(p.evaluated(), reports_dir=tmp / "reports", prepared_dir=tmp / "prepared")
    summary = paths["summary"].read_text()
    assert "DN scale 2047" in summary and "fusionnet_train_wv3.mat" in summary and "Maxar/DigitalGlobe" in summary


def test_exp_indices_on_an_imported_test_file_equal_the_files_own(imported):
    """EXP (= lms) scored by evaluate on test_rr.h5 == the indices computed straight from the source file's
    arrays with the toolbox's conventions (reference first, DN, border cut 21, 32 x 32 blocks, peak 2047)."""
    p, tmp, _ = imported
    metrics = evaluate_method(p, "wv3", "exp")
    with h5py.File(tmp / "test_wv3_multiExm1.h5") as f:
        direct = [reduced_resolution(f["gt"][i], f["lms"][i], 4, peak=2047.0, cut=21, block=32)
                  for i in range(len(f["gt"]))]
    tiles = pd.read_csv(tmp / "reports" / "wv3" / "exp" / "tiles.csv")
    rr = tiles[tiles.resolution == "reduced"].reset_index(drop=True)
    assert len(rr) == len(direct) == 6
    for k in ("psnr", "sam", "ergas", "q2n", "scc", "q"):
        np.testing.assert_allclose(rr[k].to_numpy(), [d[k] for d in direct], rtol=1e-9, err_msg=k)
        assert metrics["indices"]["rr"][k]["mean"] == pytest.approx(np.mean([d[k] for d in direct]), rel=1e-12)
    assert 20 < metrics["indices"]["rr"]["psnr"]["mean"] < 60 and metrics["indices"]["rr"]["q2n"]["mean"] < 1


# --------------------------------------------------------------------------------- malformed inputs
def _malformed(case: str, tmp: Path, wv3: dict[str, np.ndarray]) -> tuple[str, Path, str]:
    """(split, file, expected message part) for one kind of broken file."""
    a = {k: v[:8].copy() for k, v in wv3.items()}
    path = tmp / f"{case}.h5"
    if case == "missing_key":
        del a["gt"]
        return "train", write_pc_h5(path, a), r"no variable\(s\) \['gt'\]"
    if case == "band_count":
        a = {k: (v[:, :4] if k != "pan" else v) for k, v in a.items()}
        return "train", write_pc_h5(path, a), r"'gt' has 4 band\(s\).*expected 8 bands"
    if case == "ratio":
        a["ms"] = np.repeat(np.repeat(a["ms"], 2, axis=2), 2, axis=3)  # 32 x 32: ratio 2, not 4
        return "train", write_pc_h5(path, a), r"'ms' is 32 x 32, which times the ratio 4 is not the 64 x 64"
    if case == "dn_above_scale":
        a["gt"][3, 2, 10, 10] = 4095.0
        return "train", write_pc_h5(path, a), (r"'gt' has DN 4095 \(sample 3\) outside \[0, scale\] with scale 2047"
                                               r".*12-bit")
    if case == "nan":
        a["lms"][5, 0, 0, 0] = np.nan
        return "train", write_pc_h5(path, a), r"'lms' contains NaN or inf \(sample 5\)"
    if case == "truncated":
        full = write_pc_h5(tmp / "full.h5", {k: v[:40] for k, v in wv3.items()})
        path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        return "train", path, r"truncated|damaged"
    if case == "truncated_mat":
        full = tmp / "full.mat"
        scipy.io.savemat(full, {k: np.moveaxis(v, 1, -1) if k != "pan" else v[:, 0] for k, v in a.items()},
                         do_compression=True)
        path = tmp / "truncated.mat"
        path.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
        return "train", path, r"\.mat file is truncated"
    if case == "mat_other_names":
        path = tmp / "scene.mat"
        scipy.io.savemat(path, {"I_PAN": a["pan"][0, 0], "I_MS_LR": np.moveaxis(a["ms"][0], 0, -1)})
        return "train", path, r"no variable\(s\) \['gt', 'lms', 'ms', 'pan'\].*`source: mat`"
    if case == "test_tile_too_small":  # 64 x 64 test tiles: 23 x 23 left after the 21-pixel cut
        return "test_rr", write_pc_h5(path, a), r"64 x 64 are too small.*border_cut=21.*at least 73 x 73"
    if case == "fr_not_blocks":
        m = {k: v[:, :, :48, :48] if k != "ms" else v[:, :, :12, :12] for k, v in a.items() if k != "gt"}
        return "test_fr", write_pc_h5(path, m), r"48 x 48 are not a whole number of 32 x 32 blocks"
    raise AssertionError(case)


MALFORMED = ["missing_key", "band_count", "ratio", "dn_above_scale", "nan", "truncated", "truncated_mat",
             "mat_other_names",
             "test_tile_too_small", "fr_not_blocks"]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_file_is_one_line_naming_file_and_dataset_and_leaves_nothing(tmp_path, wv3, case):
    split, path, msg = _malformed(case, tmp_path, wv3)
    good = write_pc_h5(tmp_path / "good.h5", {k: v[:8] for k, v in wv3.items()})
    files = {split: path} if split == "train" else {"train": good, split: path}
    p = make_params(tmp_path, {"wv3": wv3_dataset(**files)})
    with pytest.raises(SceneError, match=msg) as e:
        prepare_dataset(p, "wv3")
    text = str(e.value)
    assert "\n" not in text and str(path) in text and "dataset wv3" in text, text
    prepared = tmp_path / "prepared"
    assert not (prepared / "wv3").exists()
    assert not prepared.exists() or not any(prepared.iterdir())  # no temporary directory left either


def test_refused_import_keeps_the_previous_output(tmp_path, wv3):
    good = write_pc_h5(tmp_path / "good.h5", {k: v[:8] for k, v in wv3.items()})
    p = make_params(tmp_path, {"wv3": wv3_dataset(train=good)})
    prepare_dataset(p, "wv3")
    before = {f.name: f.read_bytes() for f in (tmp_path / "prepared" / "wv3").iterdir()}
    _, bad, _ = _malformed("nan", tmp_path, wv3)
    p = make_params(tmp_path, {"wv3": wv3_dataset(train=bad)})
    with pytest.raises(SceneError):
        prepare_dataset(p, "wv3")
    after = {f.name: f.read_bytes() for f in (tmp_path / "prepared" / "wv3").iterdir()}
    assert after == before and sorted(x.name for x in (tmp_path / "prepared").iterdir()) == ["wv3"]


def test_cli_prints_the_one_line_error(tmp_path, wv3, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, bad, _ = _malformed("band_count", tmp_path, wv3)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"datasets": {"wv3": wv3_dataset(train=bad)}}))
    r = CliRunner().invoke(app, ["prepare", "--params", "p.yaml", "--no-track"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    err = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "band_count.h5: dataset wv3 (train)" in err[0] and "4 band(s)" in r.output


def test_degraded_arrays_may_ring_slightly_but_not_by_a_wrong_scale(tmp_path, wv3):
    """Reduced-resolution pan/ms/lms come out of filters with negative lobes: a few % outside [0, scale] is
    ringing, accepted; 16-bit data in an 11-bit dataset is not."""
    a = {k: v[:8].copy() for k, v in wv3.items()}
    a["lms"][0, 0, 0, 0] = 2047 * 1.05
    a["pan"][1, 0, 0, 0] = -20.0
    ok = write_pc_h5(tmp_path / "ring.h5", a)
    p = make_params(tmp_path, {"ok": wv3_dataset(train=ok)})
    prepare_dataset(p, "ok")
    a["pan"][1, 0, 0, 0] = 16 * 2047.0
    bad = write_pc_h5(tmp_path / "wrong_scale.h5", a)
    p = make_params(tmp_path, {"bad": wv3_dataset(train=bad)})
    with pytest.raises(SceneError, match=r"'pan' has DN 32752 .*outside \[-0.25, 1.25\] x scale"):
        prepare_dataset(p, "bad")


def test_valid_split_needs_two_samples_and_params_need_train_or_test(tmp_path, wv3):
    one = write_pc_h5(tmp_path / "one.h5", {k: v[:1] for k, v in wv3.items()})
    p = make_params(tmp_path, {"wv3": wv3_dataset(train=one)})
    with pytest.raises(SceneError, match=r"1 sample\(s\) cannot be split.*give `valid`"):
        prepare_dataset(p, "wv3")
    with pytest.raises(ConfigError, match="needs `train` or `test_rr` / `test_fr`"):
        make_params(tmp_path, {"wv3": wv3_dataset(valid=one)})
    with pytest.raises(ConfigError, match=r"datasets\.wv3\.source: Input should be 'pancollection'"):
        make_params(tmp_path, {"wv3": {**wv3_dataset(train=one), "source": "pancolection"}})


# ------------------------------------------------------------------------------------ the stage list
def test_stage_list_for_imported_datasets(tmp_path, monkeypatch):
    """Only pancollection datasets and no scenes: no fetch stage; prepare depends on the files (or, for a
    URL, on its params); train only where there is training data, evaluate only where there is test_rr."""
    url = {"url": "https://example.org/test_wv3_multiExm1.h5", "sha256": "0" * 64}
    p = make_params(tmp_path, {
        "full": wv3_dataset(train="/data/pc/train_wv3.h5", valid="/data/pc/valid_wv3.h5",
                            test_rr="/data/pc/test_wv3_multiExm1.h5", test_fr="/data/pc/test_wv3_OrigScale.h5"),
        "train_only": wv3_dataset(train="/data/pc/train_wv3.h5"),
        "test_only": {**wv3_dataset(), "test_rr": url},
        "fr_only": wv3_dataset(test_fr="/data/pc/test_wv3_OrigScale.h5"),
    }, train={"methods": {"fp": {}}})
    assert not p.scenes
    stages = {s.name: s for s in build_stages(p)}
    assert not [n for n in stages if n.startswith("fetch_")]
    assert {n for n in stages if n.startswith("prepare_")} == {f"prepare_{d}" for d in p.datasets}
    prep = stages["prepare_full"]
    assert {"/data/pc/train_wv3.h5", "/data/pc/test_wv3_OrigScale.h5", "bnnpan/data/pancollection.py"} <= set(
        prep.deps) and prep.params == ("datasets.full",)
    assert not any("example.org" in d for d in stages["prepare_test_only"].deps)
    assert {n for n in stages if n.startswith("train_")} == {"train_full_fp", "train_train_only_fp"}
    ev = {n for n in stages if n.startswith("evaluate_")}
    assert {"evaluate_full_exp", "evaluate_full_fp", "evaluate_test_only_exp"} <= ev
    assert not any(n.startswith(("evaluate_train_only", "evaluate_fr_only", "evaluate_test_only_fp")) for n in ev)
    prepared = tmp_path / "prepared"
    assert str(prepared / "full") in stages["report"].deps and str(prepared / "fr_only") not in stages["report"].deps
    assert "prepare_full" in render_dvc_yaml(list(stages.values()))
    # a dataset without test_rr: evaluate says so in one line
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"datasets": {"t": wv3_dataset(train="x.h5")}}))
    r = CliRunner().invoke(app, ["evaluate", "--params", "p.yaml", "--dataset", "t", "--method", "exp", "--no-track"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "dataset t has no reduced-resolution test file" in r.output and not (tmp_path / "reports").exists()
    with pytest.raises(ConfigError, match="train.datasets names dataset 'fr_only', which has no train file"):
        make_params(tmp_path, {"fr_only": wv3_dataset(test_fr="x.h5")}, train={"datasets": ["fr_only"]})


def test_without_test_fr_evaluate_scores_reduced_resolution_only(tmp_path, wv3):
    mos = mosaics(wv3)
    rr = write_pc_h5(tmp_path / "rr.h5", mos)
    p = make_params(tmp_path, {"wv3": wv3_dataset(test_rr=rr)}, evaluate={"methods": ["exp"], "save_fused": False})
    m = prepare_dataset(p, "wv3")
    assert set(m["files"]) == {"test_rr.h5"}
    metrics = evaluate_method(p, "wv3", "exp")
    assert metrics["setup"]["n_tiles"] == {"rr": 6, "fr": 0}
    assert all(v["mean"] is None for v in metrics["indices"]["fr"].values())
    assert math.isfinite(metrics["indices"]["rr"]["q2n"]["mean"])


# ------------------------------------------------------------------------- guards found on real files
def test_a_test_tile_too_small_for_the_indices_is_refused_at_prepare(tmp_path, wv3):
    """A 32 x 32 WorldView-3 test tile used to pass prepare and then crash evaluate (a 52-line traceback and an
    empty report folder): now prepare refuses it in one line, before writing anything."""
    from bnnpan.data.download import FetchContext
    from bnnpan.data.sources import fetch_scene

    mos = mosaics(wv3, k=2)  # 128 x 128 PAN, 32 x 32 MS
    mat = tmp_path / "wv3_scene.mat"
    scipy.io.savemat(mat, {"I_PAN": mos["pan"][0, 0], "I_MS_LR": np.moveaxis(mos["ms"][0], 0, -1), "sensor": "WV3"})
    p = validate_params({
        "paths": {"raw": str(tmp_path / "raw"), "prepared": str(tmp_path / "prepared")},
        "scenes": {"s": {"source": "mat", "file": str(mat)}},
        "datasets": {"d": {"scenes": ["s"], "roles": {"s": "test"}, "test_tile": 32, "min_test_tile": 32,
                           "fr_tile": 32}},
    })
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotGeoreferencedWarning)  # the .mat scene: no rasterio warning per file
        fetch_scene("s", p.scenes["s"], FetchContext(downloads=tmp_path / "dl", progress=False), tmp_path / "raw" / "s")
    with pytest.raises(SceneError, match=r"dataset d: scene s .*test tiles of 32 x 32 are too small for the indices: "
                                         r"evaluate.border_cut=21 and one 32 x 32 block .* at least 73 x 73") as e:
        prepare_dataset(p, "d")
    assert "\n" not in str(e.value) and not (tmp_path / "prepared" / "d").exists()


def test_evaluate_refuses_tiles_too_small_for_changed_settings_without_leaving_a_folder(imported, monkeypatch):
    p, tmp, _ = imported
    monkeypatch.chdir(tmp)
    raw = p.model_dump(mode="json")
    raw["evaluate"]["border_cut"] = 120  # after prepare: 256 - 239 = 17 < 32
    (tmp / "big_cut.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(app, ["evaluate", "--params", "big_cut.yaml", "-d", "wv3", "-m", "mtf_glp_hpm",
                                 "--no-track"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "test_rr.h5: dataset wv3: reduced-resolution test tiles of 256 x 256 are too small" in r.output
    assert "border_cut=120" in r.output and not (tmp / "reports" / "wv3" / "mtf_glp_hpm").exists()


def test_url_and_relative_path_sources(tmp_path, wv3, monkeypatch):
    """{url, sha256} goes through the verified download cache; a relative path is relative to the working
    directory (the repository root, as for every source)."""
    monkeypatch.chdir(tmp_path)
    h5 = write_pc_h5(tmp_path / "train_wv3.h5", {k: v[:8] for k, v in wv3.items()})
    digest = sha256_file(h5)
    p = validate_params({"datasets": {
        "remote": {**wv3_dataset(), "train": {"url": h5.as_uri(), "sha256": digest}},
        "local": wv3_dataset(train="train_wv3.h5"),
        "bad": {**wv3_dataset(), "train": {"url": h5.as_uri(), "sha256": "1" * 64}}}})
    m = prepare_dataset(p, "remote")
    src = m["scenes"][0]["source_file"]
    assert src["url"] == h5.as_uri() and src["sha256"] == digest
    assert Path(src["path"]).parent == tmp_path / "data" / "downloads"  # the verified download cache
    prepare_dataset(p, "local")
    a, b = read_prepared(Path("data/prepared/remote")), read_prepared(Path("data/prepared/local"))
    np.testing.assert_array_equal(a["train"]["gt"], b["train"]["gt"])
    with pytest.raises(SceneError, match="sha256 mismatch"):
        prepare_dataset(p, "bad")
    assert not Path("data/prepared/bad").exists()


def test_import_writes_what_a_local_prepare_writes(imported, prepared_landsat):
    """Every attribute, dataset, chunking/checksum choice and manifest key of a locally prepared dataset is in
    the imported one too (so no stage can tell them apart), plus the import's own provenance."""
    _, tmp, _ = imported
    local, imp = prepared_landsat, tmp / "prepared" / "wv3"
    for split in ("train", "valid", "test_rr", "test_fr"):
        with h5py.File(local / f"{split}.h5") as a, h5py.File(imp / f"{split}.h5") as b:
            assert set(a.attrs) <= set(b.attrs) and b.attrs["provenance"] == "PanCollection import", split
            assert set(a) <= set(b) and set(b) - set(a) == {"source_index"}, split
            for k in a:
                assert (b[k].dtype, b[k].fletcher32, b[k].ndim) == (a[k].dtype, a[k].fletcher32, a[k].ndim), k
                assert b[k].chunks[0] == 1 if b[k].ndim == 4 else b[k].chunks == b[k].shape
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (local, imp))
    assert set(ma) <= set(mb) and set(ma["files"]) == set(mb["files"])
    for f in ma["files"]:
        assert set(ma["files"][f]) <= set(mb["files"][f])
