"""The cluster path on a real one-node SLURM (.ci/slurm.sh: slurmctld + slurmd + munge on this machine).

* The CI profile's whole DAG (tests/test_integration.py's ``tiny``: every stage kind, the prior, BNNPan, export and
  the tiled fuse included) runs through ``snakemake --profile profiles/slurm``
  (``bnnpan run --profile profiles/slurm``: every job goes through
  ``sbatch``), then ``dvc commit``; ``dvc status`` and ``snakemake -n`` have nothing to do, and every metric equals
  that of a local run of the same profile (run beside it, on the cores the cluster jobs leave idle while they wait).
* A training job cancelled with ``scancel`` between checkpoints and submitted again resumes to the same weights as an
  uninterrupted job; a training with ``ranks: 2`` in one SLURM job (``bnnpan train`` starts ``torchrun``, 2 CPU ranks,
  gloo) equals the DAG's single-process training.

Where SLURM cannot be brought up (not root, no apt, not Linux, no executor plugin) the tests skip with the reason;
``BNNPAN_REQUIRE_SLURM=1`` (set by .ci/run) turns that skip into a failure, so CI always runs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from bnnpan.pipeline import build_stages
from tests.test_integration import _sh, make_project, tiny

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "slurm.sh"
WORKER = REPO / "tests" / "ddp_worker.py"
REQUIRE_ENV = "BNNPAN_REQUIRE_SLURM"
pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.timeout(1500)]

#: The SLURM DAG is the CI profile's whole DAG (:func:`tests.test_integration.tiny`: fetch, prepare, the prior, four
#: networks and two BNNPan ablations, two classical methods, their evaluations, export + the tiled fuse of the
#: deployed BNNPan, the report), run beside a local run of the same profile on the cores the cluster jobs leave idle
#: while they wait (each job costs ~30 s here: a Snakemake and a bnnpan start).
PROFILE = tiny


def _unavailable() -> str | None:
    """Why SLURM cannot be brought up here, or None."""
    if not sys.platform.startswith("linux"):
        return f"SLURM test cluster needs Linux (this is {sys.platform})"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[dev]')"
    if os.geteuid() != 0:
        return "the SLURM test cluster's daemons run as root (and apt installs them): not root"
    if not all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")) and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it (Debian/Ubuntu: slurmctld slurmd ...)"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the SLURM tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node cluster; stopped at the end of the module whatever happened (pending jobs cancelled)."""
    reason = _unavailable()
    if reason:
        _skip_or_fail(reason)
    scratch = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "BNNPAN_SLURM_DIR": str(scratch)}
    env.pop("SLURM_CONF", None)  # configless: clients read slurmd's copy (see .ci/slurm.sh)
    t0 = time.monotonic()
    r = subprocess.run([str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=600)
    try:
        if r.returncode == 3:  # the script's "cannot install here"
            _skip_or_fail(r.stderr.strip())
        assert r.returncode == 0, f"slurm.sh up failed:\n{r.stdout}\n{r.stderr}"
        print(f"SLURM up in {time.monotonic() - t0:.1f} s: {r.stdout.strip()}")
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=60)
        down = subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr


def _run_group(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` in its own process group: Snakemake ignores SIGTERM, so a timeout must kill the group."""
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_group(proc: subprocess.Popen, what: str, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{what} failed:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def dags(cluster, tmp_path_factory):
    """The CI profile run twice: through SLURM and, beside it, locally. ``(slurm root, env, output, local root,
    seconds the SLURM run took)``."""
    roots = {k: tmp_path_factory.mktemp(f"proj_{k}") for k in ("slurm", "local")}
    envs = {k: make_project(root, PROFILE) for k, root in roots.items()}
    env = {**envs["slurm"], **{k: v for k, v in cluster.items() if k.startswith(("BNNPAN_SLURM", "SLURM"))}}
    env.pop("SLURM_CONF", None)
    # The jobs run snakemake and `bnnpan` again on the node: sbatch exports this environment (--export=ALL), so
    # PATH (this venv's scripts first) and PYTHONPATH must point at the copy, not at an installed checkout.
    env["PYTHONPATH"] = str(roots["slurm"])
    local_env = {**envs["local"], "PYTHONPATH": str(roots["local"])}
    run = [sys.executable, "-m", "bnnpan.cli", "run"]
    local = _run_group([*run, "--cores", "1"], roots["local"], local_env)
    t0 = time.monotonic()
    slurm = _run_group([*run, "--profile", "profiles/slurm", "--cores", "2"], roots["slurm"], env)
    out = _wait_group(slurm, "the DAG through SLURM", 1200)
    seconds = time.monotonic() - t0
    _wait_group(local, "the same DAG run locally", 1200)
    print(f"SLURM DAG: {seconds:.0f} s")
    return roots["slurm"], env, out, roots["local"], seconds


def _jobs(env: dict[str, str]) -> dict[str, str]:
    """``{job id: state}`` of every job slurmctld still knows (MinJobAge: 10 minutes after it ended)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def test_the_dag_runs_through_sbatch(dags):
    root, env, out, _, seconds = dags
    stages = set(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    assert {"train_landsat8_bnn", "evaluate_landsat8_exp", "report"} <= stages
    submitted = dict(re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/\d+\.log\)", out))
    # every stage was one sbatch job, except the params check (a localrule: it runs on the submit host)
    assert set(submitted.values()) == stages - {"check_params"}, out[-3000:]
    assert re.search(r"^localrule check_params:", out, flags=re.M), out[-3000:]
    states = _jobs(env)
    assert all(states.get(j) == "COMPLETED" for j in submitted), (submitted, states)
    for jid, rule in submitted.items():  # the job's own log (slurm-keep-successful-logs) names its rule
        log = root / ".snakemake" / "slurm_logs" / f"rule_{rule}" / f"{jid}.log"
        assert f"rule {rule}:" in log.read_text(), log
    assert "pipeline finished" in out and (root / "dvc.lock").is_file()
    print(f"{len(submitted)} SLURM jobs, ids {sorted(map(int, submitted))}; {seconds:.0f} s")


def test_after_the_slurm_run_dvc_and_snakemake_have_nothing_to_do(dags):
    root, env, *_ = dags
    assert "up to date" in _sh([sys.executable, "-m", "dvc", "status"], root, env)
    assert "Nothing to be done" in _sh([sys.executable, "-m", "snakemake", "-n", "--cores", "1"], root, env)


def test_slurm_metrics_equal_the_local_run(dags):
    root, _, _, local, _ = dags
    files = [Path(next(iter(m))) for st in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values()
             for m in st.get("metrics", [])]
    params = yaml.safe_load((root / "params.yaml").read_text())
    networks, classical = list(params["train"]["methods"]), list(params["evaluate"]["methods"])
    assert {f.parts[-2] for f in files} == {*networks, *classical} and "bnnpan" in networks
    for f in files:
        a, b = (json.loads((r / f).read_text())["indices"] for r in (root, local))
        assert a == b, f
    import torch

    from bnnpan.models.checkpoint import load_checkpoint

    for m in networks:  # and the very same weights
        wa, wb = (load_checkpoint(r / f"models/landsat8/{m}.pt")["model"] for r in (root, local))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), m
    for dep in params["deploy"]:  # the deployed scene, fused in tiles (streamed statistics) in a SLURM job
        import rasterio

        name = f"{dep['scene']}_{dep['method']}.tif"
        with rasterio.open(root / "data/deploy" / name) as a, rasterio.open(local / "data/deploy" / name) as b:
            assert np.array_equal(a.read(), b.read()) and a.transform == b.transform, name


def _sbatch(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    r = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _wait_state(env: dict[str, str], jid: str, states: set[str], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while (state := _jobs(env).get(jid)) not in states:
        assert time.monotonic() < deadline, f"job {jid} still {state}"
        time.sleep(0.5)
    return state


def _worker(data: Path, out: Path, extra: str = "") -> str:
    cfg = {"iterations": 12, "batch_size": 4, "lr": 1e-3, "lr_schedule": "cosine", "val_every": 4, "ckpt_every": 4,
           "log_every": 1, "augment": True, "seed": 3}
    return (f"{sys.executable} {WORKER} --train {data / 'train.h5'} --valid {data / 'valid.h5'} --out {out} "
            f"--model fp --config '{json.dumps(cfg)}' --digest abc {extra}")


def test_a_cancelled_training_job_resumes_to_the_same_weights(dags, tmp_path):
    """scancel between checkpoints (SIGTERM, then SIGKILL), sbatch again: the weights equal an uninterrupted job's."""
    import torch

    root, env, *_ = dags
    data = root / "data/prepared/landsat8"
    env = {**env, "OMP_NUM_THREADS": "1"}
    ref, out, marker = tmp_path / "ref.pt", tmp_path / "cut.pt", tmp_path / "marker"
    ref_job = _sbatch(["--cpus-per-task=1", "--mem=2000", f"--output={tmp_path}/ref.log", "--wrap",
                       _worker(data, ref)], tmp_path, env)
    cut_job = _sbatch(["--cpus-per-task=1", "--mem=2000", f"--output={tmp_path}/cut.log", "--wrap",
                       _worker(data, out, f"--pause-at 7 --marker {marker}")], tmp_path, env)
    deadline = time.monotonic() + 300
    while not marker.exists():  # the job is at step 7: its checkpoint of step 4 is written, the final weights not
        assert _jobs(env).get(cut_job) in ("PENDING", "RUNNING", "CONFIGURING"), (tmp_path / "cut.log").read_text()
        assert time.monotonic() < deadline, "the job did not reach step 7"
        time.sleep(0.2)
    subprocess.run(["scancel", cut_job], env=env, check=True, timeout=60)
    assert _wait_state(env, cut_job, {"CANCELLED", "COMPLETED", "FAILED"}) == "CANCELLED"
    from bnnpan.models.checkpoint import load_checkpoint

    assert load_checkpoint(out.with_suffix(".ckpt"))["step"] == 4 and not out.exists()
    # Submitted again, the job must start at step 5: were it to start over, it would reach step 2, write marker2
    # and sleep (an uninterrupted run ends on the same weights, so equal weights alone would not show a resume).
    marker2 = tmp_path / "marker2"
    again = _sbatch(["--cpus-per-task=1", "--mem=2000", f"--output={tmp_path}/again.log", "--wrap",
                     _worker(data, out, f"--pause-at 2 --marker {marker2}")], tmp_path, env)
    for jid in (ref_job, again):
        assert _wait_state(env, jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED", jid
    assert not marker2.exists() and load_checkpoint(out.with_suffix(".ckpt"))["step"] == 12
    a, b = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (ref, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_two_rank_training_in_a_slurm_job_equals_the_single_process_one(dags, tmp_path):
    """`train.methods.fp.ranks: 2`: `bnnpan train` in one SLURM job (the CPUs and memory its stage asks for) starts
    torchrun with 2 CPU ranks (gloo); its weights equal the DAG's single-process fp up to float summation order
    (tests/test_train_loop.py::test_ddp_two_ranks_equals_single_process explains the 1e-5)."""
    from bnnpan.config import load_params

    root, env, *_ = dags
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["paths"]["models"] = "models_ddp"
    params["train"]["methods"]["fp"] = {**(params["train"]["methods"]["fp"] or {}), "ranks": 2}  # same recipe
    (root / "ddp.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage = next(s for s in build_stages(load_params(root / "ddp.yaml")) if s.name == "train_landsat8_fp")
    res = stage.resources
    assert res["cpus_per_task"] == 2 * params["threads"]
    cmd = " ".join([*stage.cmd, "--params", "ddp.yaml", "--no-track"])
    jid = _sbatch([f"--cpus-per-task={res['cpus_per_task']}", f"--mem={res['mem_mb']}", f"--time={res['runtime']}",
                   f"--output={tmp_path}/ddp.log", "--wrap", cmd], root, {**env, "OMP_NUM_THREADS": "1"})
    state = _wait_state(env, jid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    log = (tmp_path / "ddp.log").read_text()
    assert state == "COMPLETED", log[-3000:]
    # the command bnnpan started (the console wraps long lines)
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m bnnpan.cli train" in " ".join(log.split())
    from bnnpan.models.checkpoint import load_checkpoint

    a, b = (load_checkpoint(root / d / "landsat8/fp.pt")["model"] for d in ("models", "models_ddp"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"2-rank DDP in SLURM job {jid} vs the DAG's single process: max |dw| = {diff:.3g}")
    assert a.keys() == b.keys() and diff < 1e-5
