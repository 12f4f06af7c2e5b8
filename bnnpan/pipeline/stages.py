"""The typed stage list built from a validated ``params.yaml``.

This list is the **only** description of the DAG. ``dvc.yaml`` is rendered from it
(:func:`render_dvc_yaml`, committed; a test fails when the committed file is stale) and
the Snakemake rules are built from it (``workflow/rules/stages.smk``). Both tools run
the very same ``bnnpan <stage> ...`` command per stage, so they cannot drift apart.

Later stages (pretrain_prior, train, evaluate, report) are added here, not to two files.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bnnpan.codedeps import code_deps
from bnnpan.config import PanCollectionDataset, Params, run_name
from bnnpan.report import FP_METHOD, SUBBAND_METHODS, comparisons_due, is_binary

# Each stage's code deps (the package modules its command can run) are derived from the import graph
# (bnnpan/codedeps.py) and put first in its deps by build_stages: no hand-written module lists to forget.


@dataclass(frozen=True)
class Stage:
    """One DAG node: what runs, what it reads, which params it depends on, what it writes."""

    name: str
    cmd: tuple[str, ...]
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()  # which outs/plots are directories (Snakemake's directory())
    uncached: tuple[str, ...] = ()  # small outs kept in git, not the DVC cache (reports)
    persist: tuple[str, ...] = ()  # outs DVC must not delete before running the stage
    order_only: tuple[str, ...] = ()  # deps whose mtime Snakemake ignores (ancient()); DVC tracks them as usual
    param_digest: str = ""  # sha256 of the values of `params` (Snakemake's params rerun trigger)
    # What a job of this stage asks a cluster for (Snakemake resources: mem_mb, runtime, cpus_per_task, gpu; the
    # SLURM executor turns them into sbatch options). Set from the stage's kind by :func:`cluster_resources`.
    resources: dict[str, Any] = field(default_factory=dict)
    # Cores the stage keeps busy: params' ``threads`` for the torch stages (None: every core, what ``threads:
    # null`` means), 1 for the rest. Snakemake's ``threads:`` and the local executor's core budget, so
    # ``threads: 1`` runs as many trainings at once as there are cores and ``null`` one at a time.
    threads: int | None = 1
    # Among stages ready to run, higher first (Snakemake's ``priority:``, and the local executor's order). The
    # prior and the trainings that read it form the DAG's longest chain (2): started first, they end beside the
    # other trainings instead of after them. Then the other trainings (1), so the short evaluate jobs fill the
    # cores at the end instead of holding back a training that would end last.
    priority: int = 0
    # Runs on the submitting host, not as a cluster job (Snakemake's ``localrule``): the params check takes a second,
    # a cluster job for it a queue wait and a job start on the DAG's critical path.
    local: bool = False
    desc: str = ""

    @property
    def shell(self) -> str:
        return shlex.join(self.cmd)


def build_stages(params: Params) -> list[Stage]:
    """All stages for these params, in a valid execution order.

    Each stage carries a digest of the values of the params keys it depends on: Snakemake
    gets it as a rule param, so a changed value re-runs the rule (as DVC does), and
    `bnnpan run` never records outputs made with other params.
    """
    stages = _build(params)
    return [replace(s, param_digest=_digest(params, s.params), resources=cluster_resources(params, s))
            for s in stages]


#: Per stage kind (the ``bnnpan`` subcommand): memory in MB and wall time in minutes a cluster job asks for. Sized
#: for the CPU profile with room to spare (a train job of params.yaml peaks well under 2 GB); a site or the paper
#: profile raises them in its Snakemake profile (``set-resources``), never per dataset or method here.
KIND_RESOURCES: dict[str, tuple[int, int]] = {
    "check": (1000, 10), "fetch": (2000, 60), "prepare": (4000, 60), "pretrain-prior": (4000, 240),
    "train": (4000, 240), "evaluate": (4000, 60), "export": (2000, 30), "fuse": (4000, 60), "report": (2000, 30),
}
#: CPUs of a torch stage whose ``threads`` is null ("every core"): a cluster job needs a number.
DEFAULT_CLUSTER_CPUS = 4


def cluster_resources(params: Params, stage: Stage) -> dict[str, Any]:
    """The cluster resources of ``stage``, from its kind, so a new dataset, method or seed needs no profile edit.

    ``cpus_per_task`` is the stage's ``threads`` (what it keeps busy). A GPU goes to every stage that runs torch on
    ``device`` (those whose params include ``device``: pretrain, train, and the evaluate/fuse of a network) when that
    device is CUDA: such a job started without one would fail at its first tensor. A DDP training
    (``train.methods.<m>.ranks``) gets its CPUs, memory and GPUs once per rank.
    """
    kind = stage.cmd[1]
    mem_mb, runtime = KIND_RESOURCES[kind]
    ranks = params.train.ranks(stage.cmd[stage.cmd.index("--method") + 1]) if kind == "train" else 1
    res: dict[str, Any] = {"mem_mb": mem_mb * ranks, "runtime": runtime,
                           "cpus_per_task": stage.threads or DEFAULT_CLUSTER_CPUS * ranks}
    if "device" in stage.params and params.device.startswith("cuda"):
        res["gpu"] = ranks
    return res


def _digest(params: Params, keys: tuple[str, ...]) -> str:
    from bnnpan.config import section

    blob = {k: section(params, k) for k in keys}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def params_stamp(params: Params) -> str:
    """The output of the ``check_params`` stage, which every other stage depends on."""
    parent = Path(params.paths.prepared).parent
    return str(parent / PARAMS_STAMP) if str(parent) != "." else PARAMS_STAMP


PARAMS_STAMP = "params.checked"
# The stamp's content never changes: the stage gates the DAG (a failed check stops `dvc repro` before any
# other stage's outputs are removed) without making every stage look changed after a valid params edit.
PARAMS_STAMP_TEXT = "params.yaml validated by `bnnpan check` (the first stage of the DAG)\n"


def _build(params: Params) -> list[Stage]:
    p = params.paths
    stamp = params_stamp(params)
    stages: list[Stage] = [Stage(
        name="check_params",
        cmd=("bnnpan", "check"),
        deps=("params.yaml",),
        params=(),
        outs=(stamp,),
        persist=(stamp,),
        order_only=("params.yaml",),  # and its code (build_stages)
        local=True,
        desc="validate params.yaml (and that dvc.yaml matches it) before any stage removes its outputs",
    )]
    for name, scene in params.scenes.items():
        local = []
        for attr in ("pan", "ms", "archive", "file", "item"):
            loc = getattr(scene, attr, None)
            if loc is not None and loc.path is not None:
                local.append(loc.path)
        stages.append(Stage(
            name=f"fetch_{name}",
            cmd=("bnnpan", "fetch", "--scene", name),
            deps=tuple(local),
            params=(f"scenes.{name}",),
            outs=(f"{p.raw}/{name}",),
            dirs=(f"{p.raw}/{name}",),
            desc=f"acquire scene {name} ({scene.source}) as co-registered pan.tif/ms.tif/scene.json",
        ))
    for name, ds in params.datasets.items():
        if isinstance(ds, PanCollectionDataset):
            # No fetch stage: the files are the input. Local files are deps (DVC takes absolute paths too);
            # a URL's {url, sha256} is in the params section, so a new file re-runs the import.
            files = [loc.path for loc in ds.files().values() if loc.path is not None]
            stages.append(Stage(
                name=f"prepare_{name}",
                cmd=("bnnpan", "prepare", "--dataset", name),
                deps=tuple(files),
                params=(f"datasets.{name}",),
                outs=(f"{p.prepared}/{name}",),
                dirs=(f"{p.prepared}/{name}",),
                desc=f"import the PanCollection files of dataset {name} (validated, copied as prepared HDF5)",
            ))
            continue
        stages.append(Stage(
            name=f"prepare_{name}",
            cmd=("bnnpan", "prepare", "--dataset", name),
            deps=tuple(f"{p.raw}/{s}" for s in ds.scenes),
            params=(f"datasets.{name}",),
            outs=(f"{p.prepared}/{name}",),
            dirs=(f"{p.prepared}/{name}",),
            desc=f"Wald-protocol train/valid/test HDF5 files for dataset {name}",
        ))
    trained = params.trained()
    _check_networks(sorted({params.network_of(m) for _, m in trained}))
    prior_methods = set(params.prior_methods())
    seeds = list(params.train.seeds)
    # One stage per (dataset, seed) for the prior and per (dataset, method, seed) for train and evaluate. The seed
    # is in the command (`--seed s`), not a params dep: adding a seed to train.seeds adds stages and re-runs nothing
    # that exists; seed 0 keeps the plain names (run_name).
    for ds in dict.fromkeys(d for d, m in trained if m in prior_methods):
        for seed in seeds:
            s1, s2 = run_name("prior_stage1", seed), run_name("prior", seed)
            stages.append(Stage(
                name=f"pretrain_prior_{ds}{run_name('', seed)}",
                cmd=("bnnpan", "pretrain-prior", "--dataset", ds, "--seed", str(seed)),
                deps=(f"{p.prepared}/{ds}",),
                params=("device", "threads", "model", "train.defaults", "prior"),
                outs=(f"{p.models}/{ds}/{s1}.pt", f"{p.models}/{ds}/{s2}.pt"),
                plots=(f"{p.models}/{ds}/{s1}_curve.csv", f"{p.models}/{ds}/{s2}_curve.csv"),
                threads=params.threads,
                priority=2,
                desc=f"pretrain BNNPan's latent diffusion prior on {ds}, seed {seed} (E1 + oracle net, then E2 + "
                     "denoiser)",
            ))
    for ds, method in trained:
        for seed in seeds:
            run = run_name(method, seed)
            ckpt = f"{p.models}/{ds}/{run}.pt"
            stages.append(Stage(
                name=f"train_{ds}_{run}",
                cmd=("bnnpan", "train", "--dataset", ds, "--method", method, "--seed", str(seed)),
                deps=(f"{p.prepared}/{ds}",
                      *([f"{p.models}/{ds}/{run_name('prior', seed)}.pt"] if method in prior_methods else [])),
                params=("device", "threads", "model", "train.defaults", f"train.methods.{method}",
                        *(("prior",) if method in prior_methods else ())),
                outs=(ckpt,),
                plots=(f"{p.models}/{ds}/{run}_curve.csv",),
                # a DDP training (train.methods.<m>.ranks) runs `threads` in each of its processes
                threads=params.threads * params.train.ranks(method) if params.threads else None,
                priority=2 if method in prior_methods else 1,
                desc=f"train {method} on {ds}, seed {seed} (the one training loop; resumes from {ckpt[:-3]}.ckpt)",
            ))
    evaluated = params.evaluated()
    _check_methods([m for _, m in evaluated if m not in params.train.methods])
    report_deps: list[str] = []
    for ds, method, seed in ((d, m, s) for d, m in evaluated for s in (seeds if m in params.train.methods else [0])):
        run = run_name(method, seed)
        out = f"{p.reports}/{ds}/{run}"
        network = method in params.train.methods
        extra_deps = [f"{p.models}/{params.models_dataset(ds)}/{run}.pt"] if network else []
        stages.append(Stage(
            name=f"evaluate_{ds}_{run}",
            cmd=("bnnpan", "evaluate", "--dataset", ds, "--method", method,
                 *(("--seed", str(seed)) if network else ())),
            deps=(*extra_deps, f"{p.prepared}/{ds}"),
            # threads (and a network's device) are recorded in metrics.json's environment block
            params=(*(("device",) if network else ()), "threads", "evaluate.border_cut", "evaluate.block",
                    "evaluate.save_fused"),
            outs=(f"{out}/fused", f"{out}/tiles.csv"),
            metrics=(f"{out}/metrics.json",),
            dirs=(f"{out}/fused",),
            uncached=(f"{out}/tiles.csv",),
            threads=params.threads,
            desc=f"reduced/full-resolution metrics of {method} on {ds}" + (f", seed {seed}" if network else ""),
        ))
        report_deps += [f"{out}/metrics.json", f"{out}/tiles.csv", f"{out}/fused"]
    deploy_deps = _deploy_stages(params, stages)
    report_deps += deploy_deps
    if evaluated:
        datasets = sorted({d for d, _ in evaluated})
        # The LaTeX tables: results always; comparisons when the report compares binary networks; seeds when a
        # network evaluated on the dataset was trained with several seeds (the report's own rules).
        multi = len(params.train.seeds) > 1
        tables = tuple(f"{p.reports}/tables/{d}_{t}.tex" for d in datasets for t in (
            "results", *(("comparisons",) if _comparisons_due(params, d, evaluated) else ()),
            *(("seeds",) if multi and any(d == e and m in params.train.methods for e, m in evaluated) else ())))
        tables_out = (f"{p.reports}/summary.md", f"{p.reports}/metrics.csv", f"{p.reports}/metrics_tiles.csv",
                      *tables)
        stages.append(Stage(
            name="report",
            cmd=("bnnpan", "report"),
            deps=tuple(report_deps + [f"{p.prepared}/{d}" for d in datasets]
                       + list(dict.fromkeys(f"{p.raw}/{d.scene}" for d in params.deploy))),
            params=("report", "train.seeds"),
            outs=tables_out,
            plots=tuple(f"{p.reports}/figures/{d}_{kind}.png" for d in datasets for kind in ("metrics", "visual"))
            + tuple(f"{p.reports}/figures/{d}_subbands.png" for d in datasets
                    if any((d, m) in evaluated for m in SUBBAND_METHODS))
            + tuple(f"{p.reports}/figures/{d}_stats.png" for d in datasets if _comparisons_due(params, d, evaluated))
            + tuple(f"{p.reports}/figures/deploy_{params.deploy_name(d)}.png" for d in params.deploy),
            uncached=tables_out,
            desc="summary.md, metrics.csv, metrics_tiles.csv, LaTeX tables and figures for every evaluated method",
        ))
    stages = [replace(s, deps=tuple(dict.fromkeys((*code_deps(s.cmd), *s.deps)))) for s in stages]
    # the params check's code is order-only too (see workflow/rules/stages.smk), like params.yaml
    check = replace(stages[0], order_only=stages[0].deps)
    return [check, *(replace(s, deps=(*s.deps, stamp), order_only=(stamp,)) for s in stages[1:])]


def _deploy_stages(params: Params, stages: list[Stage]) -> list[str]:
    """The ``deploy:`` entries: ``export_<dataset>_<run>`` for a network (the packed file, registered in MLflow;
    once per network), then ``fuse_<scene>_<run>`` writing ``<paths.deploy>/<scene>_<run>.tif``. Appends the
    stages; returns the fused files (the report's quicklooks)."""
    p = params.paths
    fused: list[str] = []
    exported: set[str] = set()
    for dep in params.deploy:
        name = params.deploy_name(dep)
        out = f"{p.deploy}/{name}.tif"
        cmd = ["bnnpan", "fuse", "--scene", dep.scene, "--method", dep.method, "--tile", str(dep.tile), "--out", out]
        deps = [f"{p.raw}/{dep.scene}"]
        network = dep.method in params.train.methods
        if network:
            assert dep.dataset is not None  # Params._check_deploy
            run = run_name(dep.method, dep.seed)
            model = f"{p.models}/{dep.dataset}/{run}.safetensors"
            if model not in exported:
                exported.add(model)
                stages.append(Stage(
                    name=f"export_{dep.dataset}_{run}",
                    cmd=("bnnpan", "export", "--dataset", dep.dataset, "--method", dep.method, "--seed",
                         str(dep.seed), "--out", model),
                    deps=(f"{p.models}/{dep.dataset}/{run}.pt", f"{p.prepared}/{dep.dataset}",
                          f"{p.reports}/{dep.dataset}/{run}/metrics.json"),
                    params=(),
                    outs=(model,),
                    desc=f"{dep.method} (seed {dep.seed}) trained on {dep.dataset} as a packed 1-bit safetensors file, "
                         f"registered in MLflow as bnnpan-{dep.dataset}-{dep.method}",
                ))
            cmd += ["--model", model, "--dataset", dep.dataset]
            deps.append(model)
        stages.append(Stage(
            name=f"fuse_{name}",
            cmd=tuple(cmd),
            deps=tuple(dict.fromkeys(deps)),
            params=(*(("device",) if network else ()), "threads"),
            outs=(out,),
            threads=params.threads if network else 1,
            desc=f"the whole scene {dep.scene} sharpened by {dep.method} (Cloud-Optimized GeoTIFF on the PAN grid)",
        ))
        fused.append(out)
    return fused


def _comparisons_due(params: Params, dataset: str, evaluated: list[tuple[str, str]]) -> bool:
    """Whether the report draws ``<dataset>_stats.png``: the rule of bnnpan.report.comparisons_due, with a binary
    network told by the stage list (a trained method) as the report tells it by metrics.json (kind "network")."""
    methods = [m for d, m in evaluated if d == dataset]
    binary = [m for m in methods if is_binary(m, m in params.train.methods)]
    return comparisons_due(binary, FP_METHOD in methods)


def _check_networks(methods: list[str]) -> None:
    from bnnpan.config import ConfigError
    from bnnpan.models.networks import NETWORKS

    unknown = [m for m in methods if m not in NETWORKS]
    if unknown:
        raise ConfigError(f"params: train.methods has unknown network(s) {unknown}; known: {sorted(NETWORKS)}")


def _check_methods(methods: list[str]) -> None:
    from bnnpan.config import ConfigError
    from bnnpan.models.registry import known_methods

    known = known_methods()
    unknown = sorted({m for m in methods if m not in known})
    if unknown:
        raise ConfigError(f"params: evaluate.methods has unknown method(s) {unknown}; known: {known}")


def dvc_yaml(stages: list[Stage]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in stages:
        st: dict[str, Any] = {"desc": s.desc, "cmd": s.shell, "deps": list(s.deps)}
        if s.params:
            st["params"] = list(s.params)
        st["outs"] = [{o: {**({"cache": False} if o in s.uncached else {}), **({"persist": True} if o in s.persist
                                                                                 else {})}}
                      if o in s.uncached or o in s.persist else o for o in s.outs]
        if s.metrics:
            st["metrics"] = [{m: {"cache": False}} for m in s.metrics]
        curves = [pl for pl in s.plots if pl.endswith(CURVE_SUFFIX)]
        if curves:  # DVC-cached outs (`dvc checkout` restores them), drawn by the top-level plots below
            st["outs"] = [*st["outs"], *({c: {"persist": True}} if c in s.persist else c for c in curves)]
        images = [pl for pl in s.plots if pl not in curves]
        if images:  # the report's figures: small, kept in git
            st["plots"] = [{pl: {"cache": False}} for pl in images]
        out[s.name] = st
    plots = top_level_plots(stages)
    return {"stages": out, **({"plots": plots} if plots else {})}


# ----------------------------------------------------------------------------- dvc plots show
# Cross-method views (dvc.yaml's top-level `plots`), drawn with the Vega-Lite templates in
# .dvc/plots/ (bnnpan_*.json); `.dvc/config` points `dvc plots show` at .dvc/plots/offline.html,
# a page with the Vega libraries inlined, so the HTML needs no network.
CURVE_SUFFIX = "_curve.csv"  # step,loss,lr,val_l1,val_psnr (bnnpan.train.loop.CURVE_COLUMNS)
INDEX_FIELDS = tuple(f"{k}_mean" for k in ("psnr", "sam", "ergas", "q2n", "scc", "q", "d_lambda", "d_s", "hqnr",
                                           "qnr"))  # reports/metrics.csv columns, in the report's order


def _dataset_of(s: Stage) -> str | None:
    cmd = list(s.cmd)
    return cmd[cmd.index("--dataset") + 1] if "--dataset" in cmd[:-1] else None


def top_level_plots(stages: list[Stage]) -> list[dict[str, Any]]:
    """Per dataset: validation PSNR and training loss of every trained method on one plot each, the
    latent prior's two pretraining stages on a third; then the indices per method (reports/metrics.csv)."""
    curves: dict[str, dict[str, list[str]]] = {}  # dataset -> "train" | "pretrain-prior" -> curve files
    for s in stages:
        ds = _dataset_of(s)
        if ds is not None and len(s.cmd) > 1 and s.cmd[1] in ("train", "pretrain-prior"):
            curves.setdefault(ds, {}).setdefault(s.cmd[1], []).extend(
                pl for pl in s.plots if pl.endswith(CURVE_SUFFIX))
    plots: list[dict[str, Any]] = []

    def curve_plot(pid: str, files: list[str], y: str, template: str, title: str, y_label: str) -> None:
        if files:
            plots.append({pid: {"template": template, "x": "step", "y": {f: y for f in files}, "title": title,
                                "x_label": "training step", "y_label": y_label}})

    for ds, by_kind in curves.items():
        trained = by_kind.get("train", [])
        curve_plot(f"{ds}_val_psnr", trained, "val_psnr", "bnnpan_curves",
                   f"{ds}: validation PSNR of every trained method", "validation PSNR (dB)")
        curve_plot(f"{ds}_train_loss", trained, "loss", "bnnpan_loss",
                   f"{ds}: training loss of every trained method (mean over 25 steps)", "training loss")
        curve_plot(f"{ds}_prior_val_psnr", by_kind.get("pretrain-prior", []), "val_psnr", "bnnpan_curves",
                   f"{ds}: latent prior pretraining, validation PSNR (stage 1: E1's oracle z; stage 2: sampled z)",
                   "validation PSNR (dB)")
    table = next((o for s in stages if s.cmd[:2] == ("bnnpan", "report") for o in s.outs
                  if Path(o).name == "metrics.csv"), None)
    if table is not None:
        plots.append({"indices_per_method": {
            "template": "bnnpan_indices", "x": "method", "y": {table: list(INDEX_FIELDS)},
            "title": "mean quality index per method over the test tiles (RR = reduced, FR = full resolution)"}})
    return plots


HEADER = (
    "# GENERATED by `bnnpan dag write` from the stage list in bnnpan/pipeline/stages.py\n"
    "# and params.yaml. Do not edit by hand: change the stage list, then regenerate.\n"
)


def render_dvc_yaml(stages: list[Stage]) -> str:
    return HEADER + yaml.safe_dump(dvc_yaml(stages), sort_keys=False, width=1000)
