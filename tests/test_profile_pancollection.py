"""The paper-scale profile (profiles/pancollection/params.yaml): the file itself (fast), and the same profile run
end to end on the CPU with tiny overrides against the real WorldView-3 patches (integration).

The end-to-end run keeps the profile's WorldView-3 dataset with its PanCollection file names under
``data/pancollection/`` and writes there, in the exact PanCollection HDF5 layout, a validation file and
reduced-/full-resolution test files made from the real patches of ``../shared/data/pancollection-wv3/``
(4 x 4 mosaics: 256 x 256 tiles; see tests/test_pancollection.py); ``train`` is that ``.mat`` itself.
QuickBird and GaoFen-2 are dropped (no data here), the networks shrunk, the device the CPU; everything
else (methods, classical anchors, prior, paths, stages) is the profile's.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import yaml

from bnnpan.config import PanCollectionDataset, load_params
from bnnpan.models.registry import known_methods
from bnnpan.pipeline import build_stages
from bnnpan.sensors import get_sensor

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "pancollection" / "params.yaml"
SENSORS = {"wv3": ("worldview3", 8, 2047.0), "qb": ("quickbird", 4, 2047.0), "gf2": ("gaofen2", 4, 1023.0)}
PC_COUNTS = {"wv3": (9714, 1080), "qb": (17139, 1905), "gf2": (19809, 2201)}  # PanCollection train / valid


def release_files(s: str) -> dict[str, str]:
    """The PanCollection release's file names of sensor ``s``, where the profile expects them."""
    return {"train": f"data/pancollection/train_{s}.h5", "valid": f"data/pancollection/valid_{s}.h5",
            "test_rr": f"data/pancollection/test_{s}_multiExm1.h5",
            "test_fr": f"data/pancollection/test_{s}_OrigScale_multiExm1.h5"}


# ------------------------------------------------------------------------------------------ the file
def test_profile_validates_and_states_the_paper_recipe():
    p = load_params(PROFILE)
    text = PROFILE.read_text()
    assert p.device == "cuda" and p.paths.reports == "reports/pancollection"
    # the three datasets, each the PanCollection release's four files under data/pancollection/ (ignored by git)
    assert list(p.datasets) == ["wv3", "qb", "gf2"]
    for name, ds in p.datasets.items():
        sensor, bands, scale = SENSORS[name]
        assert isinstance(ds, PanCollectionDataset) and ds.sensor == sensor
        assert {k: loc.path for k, loc in ds.files().items()} == release_files(name)
        assert ds.scale is None and ds.bits is None and ds.bands is None  # the sensor's: no override
        s = get_sensor(sensor)
        assert (len(s.bands), s.scale, s.ratio) == (bands, scale, 4)
        assert ds.pan_degradation == "bicubic"  # PanCollection's PAN: the toolbox's bicubic shrink
        assert f"{PC_COUNTS[name][0]} / {PC_COUNTS[name][1]}" in text
    assert "/data/\n" in (REPO / ".gitignore").read_text()
    # the recipe at paper scale, the same for every method
    assert (p.model.width, p.model.depth) == (64, 6)
    d = p.train.defaults
    assert (d.batch_size, d.iterations, d.lr, d.lr_schedule, d.loss) == (32, 120_000, 3e-4, "cosine", "l1")
    assert d.num_workers >= 1 and d.warmup < d.iterations and d.val_every <= d.iterations // 10
    assert f"{round(d.iterations * d.batch_size / PC_COUNTS['wv3'][0])} epochs of WV3" in text
    for other in ("qb", "gf2"):
        assert f"{other.upper()}: {round(d.iterations * d.batch_size / PC_COUNTS[other][0])}" in text
    default = load_params(REPO / "params.yaml")
    assert list(p.train.methods) == list(default.train.methods)  # BNNPan, every baseline and fp
    assert all(p.train.resolved(m) == d.model_dump() for m in p.train.methods)
    assert set(p.evaluate.methods) <= set(known_methods()) and {"exp", "mtf_glp_hpm"} <= set(p.evaluate.methods)
    assert (p.evaluate.border_cut, p.evaluate.block) == (21, 32)
    assert (p.prior.latent_dim, p.prior.width) == (256, 64)  # DiffIR's latent at D = 64
    # the header states the GPU time as an estimate and says how it was made
    header = text.split("\ndevice:")[0]
    assert "ESTIMATE" in header and "bench/gpu_estimate.py" in header and "A100" in header
    assert "bnnpan run --params profiles/pancollection/params.yaml" in header
    # the DAG: an import, a prior and ten trainings per dataset, 5 classical + 10 networks evaluated on each
    names = [s.name for s in build_stages(p)]
    for ds in p.datasets:
        assert f"prepare_{ds}" in names and f"pretrain_prior_{ds}" in names and f"fetch_{ds}" not in names
        assert {f"train_{ds}_{m}" for m in p.train.methods} <= set(names)
        assert {f"evaluate_{ds}_{m}" for m in [*p.evaluate.methods, *p.train.methods]} <= set(names)
    assert len(names) == 1 + 3 + 3 + 30 + 45 + 1 and names[-1] == "report"


def test_readme_documents_the_profile_and_the_estimate_its_header_states():
    readme = (REPO / "README.md").read_text()
    assert "bnnpan run --params profiles/pancollection/params.yaml" in readme
    for s in SENSORS:
        for f in release_files(s).values():
            assert Path(f).name in readme, f
    assert "bench/gpu_estimate.py" in readme
    # the estimate's stated model is the script's (a changed constant must change the stated table)
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_estimate
    finally:
        sys.path.remove(str(REPO / "bench"))
    header = PROFILE.read_text().split("\ndevice:")[0]
    central = next(s for s in gpu_estimate.SCENARIOS if s.name == "central")
    for text in (header, readme):
        assert f"{central.flops / 1e12:.0f} TFLOP/s" in text and f"{central.bandwidth / 1e9:.0f} GB/s" in text
    assert {k: v[:2] for k, v in gpu_estimate.PANCOLLECTION.items()} == PC_COUNTS


# --------------------------------------------------------------------------------- end to end (CPU)
CI_NETWORKS = ("fp", "bbcu", "bnnpan")  # the float bound, a binary baseline, and BNNPan with its prior
CI_CLASSICAL = ("exp", "mtf_glp_hpm")


def ci_params(profile: dict, train_mat: Path) -> dict:
    """The profile on the CPU: wv3 only (train: the real .mat), tiny networks, 3 steps, and three of its networks and
    two of its classical methods (every method runs end to end in tests/test_integration.py; here the PanCollection
    path is what is tested). ~1.5 minutes on 2 cores, nearly all of it the start-up of the 12 stage processes
    (Python + torch + MLflow's SQLite store)."""
    p = copy.deepcopy(profile)
    p["device"] = "cpu"
    p["threads"] = 1  # each stage holds one core, so `bnnpan run --params` runs two at once on 2 cores
    p["datasets"] = {"wv3": {**p["datasets"]["wv3"], "train": str(train_mat)}}
    assert set(CI_NETWORKS) <= set(p["train"]["methods"]) and set(CI_CLASSICAL) <= set(p["evaluate"]["methods"])
    p["train"]["methods"] = {m: v for m, v in p["train"]["methods"].items() if m in CI_NETWORKS}
    p["evaluate"]["methods"] = [m for m in p["evaluate"]["methods"] if m in CI_CLASSICAL]
    p["model"].update(width=8, depth=1)
    p["train"]["defaults"].update(iterations=3, batch_size=8, val_every=2, ckpt_every=2, warmup=1, num_workers=1)
    p["prior"].update(latent_dim=8, width=8, stage1_iterations=2, stage2_iterations=2)
    return p


@pytest.mark.integration
def test_profile_runs_end_to_end_on_cpu(tmp_path, shared_data):
    from test_integration import _sh, copy_worktree
    from test_pancollection import KEYS, mosaics, write_pc_h5

    mat = shared_data / "pancollection-wv3" / "fusionnet_train_wv3.mat"
    if not mat.is_file():
        pytest.skip(f"{mat} not found")
    root = tmp_path / "proj"
    env = copy_worktree(root)
    # the stage commands (`bnnpan ...` console scripts) import the copy under test, whatever is installed
    # (PYTHONPATH comes before site-packages, where an editable install may point at another checkout)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    # tiny convolutions: one thread per stage is as fast and far less hurt by a busy machine (conftest)
    env.update(OMP_NUM_THREADS="1")
    as_script = f"import sys; sys.path[0] = {str(Path(sys.executable).parent)!r}; import bnnpan; print(bnnpan.__file__)"
    assert _sh([sys.executable, "-c", as_script], tmp_path, env).strip() == str(root / "bnnpan" / "__init__.py")

    d = scipy.io.loadmat(mat)
    wv3 = {k: np.moveaxis(d[k], -1, 1) if d[k].ndim == 4 else d[k][:, None] for k in KEYS}  # N x C x H x W
    mos = mosaics({k: v[:32] for k, v in wv3.items()})  # two 256 x 256 tiles (ms 64 x 64)
    files = release_files("wv3")
    (root / "data" / "pancollection").mkdir(parents=True)
    write_pc_h5(root / files["valid"], {k: v[90:] for k, v in wv3.items()})
    write_pc_h5(root / files["test_rr"], mos)
    write_pc_h5(root / files["test_fr"], {k: mos[k] for k in ("lms", "ms", "pan")})
    profile = yaml.safe_load(PROFILE.read_text())
    params = ci_params(profile, mat)
    (tmp_path / "pancollection_ci.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tracked_report = (root / "reports" / "summary.md").read_bytes()

    out = _sh([sys.executable, "-m", "bnnpan.cli", "run", "--params", str(tmp_path / "pancollection_ci.yaml")],
              root, env)
    assert "pipeline finished" in out
    running = most = 0  # the stages ran side by side (threads: 1 on 2 cores), not one after the other
    for line in out.splitlines():
        running += line.startswith("start ") - line.startswith("done ")
        most = max(most, running)
    assert most == 2, out

    p = load_params(tmp_path / "pancollection_ci.yaml")
    methods = list(params["train"]["methods"])
    classical = params["evaluate"]["methods"]
    assert methods == list(p.train.methods) == list(CI_NETWORKS)
    assert classical == p.evaluate.methods == list(CI_CLASSICAL)
    prepared = root / "data" / "prepared" / "wv3"
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["provenance"] == "PanCollection import"
    assert {f: v["n"] for f, v in manifest["files"].items()} == {"train.h5": 100, "valid.h5": 10, "test_rr.h5": 2,
                                                                  "test_fr.h5": 2}
    models = root / "models" / "wv3"
    assert (models / "prior_stage1.pt").is_file() and (models / "prior.pt").is_file()
    assert all((models / f"{m}.pt").is_file() for m in methods)
    reports = root / "reports" / "pancollection"
    for m in [*classical, *methods]:
        metrics = json.loads((reports / "wv3" / m / "metrics.json").read_text())
        assert metrics["setup"]["psnr_peak"] == 2047.0 and metrics["setup"]["n_tiles"] == {"rr": 2, "fr": 2}, m
        assert all(math.isfinite(v["mean"]) for g in ("rr", "fr") for v in metrics["indices"][g].values()), m
    summary = (reports / "summary.md").read_text()
    assert all(f"| {m} |" in summary for m in [*classical, *methods]) and "DN scale 2047" in summary
    assert (reports / "figures" / "wv3_visual.png").is_file() and (reports / "figures" / "wv3_subbands.png").is_file()
    assert (root / "reports" / "summary.md").read_bytes() == tracked_report  # the default report is untouched

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(p.tracking.experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("bnnpan.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    stages = {s.name for s in build_stages(p)}
    assert children == stages - {"check_params"}  # every stage ran (and logged), the params check only gates
    assert {"prepare_wv3", "pretrain_prior_wv3", "report"} | {f"train_wv3_{m}" for m in methods} <= stages
    assert not any(n.startswith(("fetch_", "prepare_qb", "prepare_gf2")) for n in stages)
