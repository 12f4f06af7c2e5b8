"""The ``evaluate`` stage: run one method on a dataset's test files and score it.

Reduced resolution (``test_rr.h5``): the method fuses the degraded pair and is scored
against ``gt`` with :func:`bnnpan.eval.metrics_rr.reduced_resolution` (DN scale, reference
first, ``border_cut`` pixels cut, PSNR peak = the sensor scale). Full resolution
(``test_fr.h5``): the method fuses the original pair and is scored without reference with
:func:`bnnpan.eval.metrics_fr.full_resolution` (``lms`` is the expanded MS).

Writes into ``reports/<dataset>/<method>/``:

* ``metrics.json`` (a DVC metrics file, kept in git): figures that are the same on every re-run of the
  same inputs, but one group (``network_cost.measured``, below), nested so that the quality indices come
  first and the cost second (``dvc metrics show`` sorts the flattened keys alphabetically, ``dvc exp show``
  keeps the file's order, and both agree on indices, cost, run environment, setup)::

      {"indices": {"rr": {"psnr": {"mean", "std"}, "sam", "ergas", "q2n", "scc", "q"},
                   "fr": {"d_lambda": {"mean", "std"}, "d_s", "hqnr", "qnr",
                          "d_s_mtf", "hqnr_mtf"}},                        # _mtf: pan_degradation mtf only
       "network_cost": {"64": {...}, "256": {...}, "file": {...},      # networks only
                        "measured": {"tile", "threads", "rounds", "packed_ms", "float_ms"}},
       "setup": {"n_tiles": {"rr", "fr"}, "dataset", "method", "seed", "kind", "sensor", ...},
       "run_environment": {"cpu", "cpu_count", "threads", "threads_source", "device", "gpu", "torch",
                           "cuda", "numpy", "python", "platform", "machine"}}

  ``d_s``, ``hqnr`` and ``qnr`` are the toolbox's on every dataset (D_s's low-pass PAN from the bicubic
  shrink, protocol.md). A dataset prepared with ``pan_degradation: mtf`` also gets our variant,
  ``d_s_mtf`` and ``hqnr_mtf`` (:func:`bnnpan.eval.metrics_fr.full_resolution`), in ``indices.fr`` after
  the four and as ``tiles.csv`` columns after the others; a ``bicubic`` dataset has neither.
  ``run_environment`` (:mod:`bnnpan.environment`) states what the float results depend on: the thread
  count (params' ``threads``, applied here), CPU, library versions, device. Named so that it sorts after
  the indices and the cost in ``dvc metrics show``; it holds no time or host name, so it is the same on
  every run on one machine. ``network_cost.measured`` is the exception, asked for beside the theoretical
  OPs (issue 14): the network's milliseconds per test tile with the packed 1-bit runtime and with the float
  simulation (:func:`measured_latency`). It is a measurement, so a re-run changes it (and the report's
  "ms/tile" column); it is in the DVC-tracked file so that the report stays a function of its DVC inputs.

* ``timing.json`` (not tracked by git or DVC): the wall-clock fusion time of every tile and their
  median per resolution. It depends on the machine and its load, so it changes on every run; it
  goes to MLflow (``bnnpan evaluate`` logs it) instead of into the tracked metrics.
* ``tiles.csv`` (one row per tile: its resolution, index, training ``seed`` (0 for a classical method) and
  indices, no timing), and ``fused/`` with every fused tile as
  a float32 GeoTIFF carrying the geotransform and CRS of its source tile.

Each file is written to a temporary path and renamed. Before anything is written the test files
are checked (one line naming the file): a dataset without a reduced-resolution test file (an imported
dataset without ``test_rr``) or with tiles too small for ``border_cut`` plus one ``block`` is refused, so
no empty report folder is left behind. An imported dataset without ``test_fr`` is scored at reduced
resolution only (its full-resolution indices are null, ``n_tiles.fr`` 0). Test tiles without
georeferencing (``.mat`` scenes, PanCollection imports) give fused GeoTIFFs in pixel coordinates, said
once rather than by one rasterio warning per tile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

from bnnpan.atomic import atomic_dir, write_text
from bnnpan.config import ConfigError, Params, run_name
from bnnpan.data.hdf5io import HDF5Error, read_attrs, validate_h5
from bnnpan.environment import apply_threads, run_environment
from bnnpan.eval.metrics_fr import full_resolution
from bnnpan.eval.metrics_rr import reduced_resolution, smallest_tile
from bnnpan.models.registry import KIND, MethodContext, build_method
from bnnpan.sensors import get_sensor

RR_KEYS = ("psnr", "sam", "ergas", "q2n", "scc", "q")
FR_KEYS = ("d_lambda", "d_s", "hqnr", "qnr")  # the toolbox's, on every dataset
FR_MTF_KEYS = ("d_s_mtf", "hqnr_mtf")  # our MTF variant, only on datasets with pan_degradation: mtf
METRIC_KEYS = RR_KEYS + FR_KEYS
# metrics.json groups, in file order: indices, network_cost, setup is also the alphabetical order
# `dvc metrics show` sorts them into; environment comes last in the file (first alphabetically).
INDICES, COST, SETUP, ENVIRONMENT = "indices", "network_cost", "setup", "run_environment"
GROUP_KEYS = {"rr": RR_KEYS, "fr": FR_KEYS}
OPTIONAL_KEYS = {"rr": (), "fr": FR_MTF_KEYS}  # after GROUP_KEYS[g] where present
RESOLUTION_GROUP = {"reduced": "rr", "full": "fr"}  # tiles.csv's `resolution` -> indices group
TIMING_FILE = "timing.json"  # volatile: gitignored, not a DVC output
log = logging.getLogger(__name__)


def method_context(attrs: dict[str, Any]) -> MethodContext:
    """Sensor facts for a method, from a dataset file's attributes."""
    sensor = get_sensor(attrs["sensor"])
    bands, gains = sensor.select(list(attrs["bands"]))
    return MethodContext(sensor=sensor.name, ratio=int(attrs["ratio"]), ms_gains=gains,
                         pan_gain=sensor.pan_gain, scale=float(attrs["scale"]), bands=bands)


def _summary(values: list[float]) -> dict[str, float | None]:
    """Mean and (population) std over tiles; None when nothing was measured."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(arr.mean()), "std": float(arr.std())}


def _write_tif(path: Path, arr: np.ndarray, transform: list[float], crs: str | None, bands: tuple[str, ...]) -> None:
    profile = dict(driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype="float32",
                   transform=Affine.from_gdal(*transform), crs=crs,
                   compress="deflate", predictor=3)
    with warnings.catch_warnings():
        if crs is None:  # pixel coordinates: said once per evaluation (evaluate_method), not per tile
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(arr.astype(np.float32))
            for i, name in enumerate(bands, start=1):
                dst.set_band_description(i, name)


def check_test_files(params: Params, dataset: str, rr_path: Path, fr_path: Path | None) -> None:
    """One-line errors before any output exists: test tiles the indices cannot score with ``evaluate``'s
    ``border_cut`` and ``block`` (prepare refuses them too, but these settings may have changed since)."""
    cfg = params.evaluate
    need = smallest_tile(cfg.border_cut, cfg.block)
    h, w = validate_h5(rr_path)["shapes"]["lms"][2:]
    if min(h, w) < need:
        raise HDF5Error(f"{rr_path}: dataset {dataset}: reduced-resolution test tiles of {h} x {w} are too small for "
                        f"the indices: evaluate.border_cut={cfg.border_cut} and one {cfg.block} x {cfg.block} block "
                        f"(evaluate.block) need at least {need} x {need}")
    if fr_path is not None:
        h, w = validate_h5(fr_path)["shapes"]["lms"][2:]
        if h % cfg.block or w % cfg.block or min(h, w) < cfg.block:
            raise HDF5Error(f"{fr_path}: dataset {dataset}: full-resolution test tiles of {h} x {w} are not a whole "
                            f"number of {cfg.block} x {cfg.block} blocks (evaluate.block)")


def _json_float(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    return x


def evaluate_method(params: Params, dataset: str, method: str, out_dir: str | Path | None = None,
                    progress: Callable[[str, int, int], None] | None = None, seed: int = 0,
                    runtime: str = "packed") -> dict[str, Any]:
    """Evaluate ``method`` on ``dataset``; return the metrics dictionary written to metrics.json.

    ``runtime`` (networks): ``packed`` (the default) runs binary convs on the packed 1-bit kernels where they
    build (:mod:`bnnpan.models.packed_runtime`; else the float simulation, said once), ``float`` on the float
    simulation (``F.conv2d`` on +-1 tensors). The two agree to float rounding, except that the packed
    runtime's exact integer sums differ from the float conv's rounded ones by an ulp, which now and then flips a
    sign whose pre-activation is within rounding of its threshold (as another thread count does). It shows in
    timing.json, not in metrics.json.

    A trained network is the run of training seed ``seed`` (``models/<dataset>/<run_name>.pt``, scored into
    ``reports/<dataset>/<run_name>/``; :func:`bnnpan.config.run_name`); a classical method has seed 0 only.
    """
    cfg = params.evaluate
    if dataset in params.datasets and not params.has_split(dataset, "test_rr"):
        only_fr = params.has_split(dataset, "test_fr")
        raise ConfigError(f"dataset {dataset} has no reduced-resolution test file (datasets.{dataset}.test_rr is not "
                          f"given{'; full-resolution-only evaluation is not supported' if only_fr else ''}): "
                          "nothing to evaluate")
    prepared = Path(params.paths.prepared) / dataset
    rr_path = prepared / "test_rr.h5"
    # An imported dataset may come without full-resolution tiles: then reduced resolution only.
    has_fr = dataset not in params.datasets or params.has_split(dataset, "test_fr")
    fr_path = prepared / "test_fr.h5" if has_fr else None
    check_test_files(params, dataset, rr_path, fr_path)
    attrs = read_attrs(rr_path)
    ctx = method_context(attrs)
    network = method in params.train.methods
    if seed and not network:
        raise ConfigError(f"method {method} is not trained: it has no seed {seed} (seeds are training seeds)")
    run = run_name(method, seed)
    _, threads_source = apply_threads(params.threads)
    if network:
        from bnnpan.models.checkpoint import NetworkFuser

        # a test-only dataset scores the networks of its models_from dataset (cross-scene)
        fuser = NetworkFuser(Path(params.paths.models) / params.models_dataset(dataset) / f"{run}.pt",
                             device=params.device, runtime=runtime)
    else:
        fuser = build_method(method, ctx)
    needs_ref = bool(getattr(fuser, "needs_reference", False))  # oracle prior: reduced resolution only
    scenes = list(attrs["scenes"])
    # d_s is the toolbox's (bicubic PAN_L) on every dataset; a dataset prepared with the MTF PAN degradation
    # also gets d_s_mtf / hqnr_mtf (PAN_L made the way its PAN_lr was; see metrics_fr.d_s).
    pan_degradation = (attrs.get("settings") or {}).get("pan_degradation", "bicubic")
    keys = METRIC_KEYS + (FR_MTF_KEYS if pan_degradation == "mtf" else ())
    group_keys = {g: k + (OPTIONAL_KEYS[g] if pan_degradation == "mtf" else ()) for g, k in GROUP_KEYS.items()}
    crs_by_scene = attrs.get("crs") or {}
    out_dir = Path(out_dir or Path(params.paths.reports) / dataset / run)
    rows: list[dict[str, Any]] = []
    latency: dict[str, list[float]] = {"rr": [], "fr": []}
    probe: tuple | None = None  # the first test tile's inputs: the network's measured ms/tile
    if cfg.save_fused and any(crs_by_scene.get(s) is None for s in scenes):
        log.info("dataset %s: the test tiles have no georeferencing: the fused GeoTIFFs in %s are in pixel "
                 "coordinates", dataset, out_dir / "fused")

    created = not out_dir.exists()
    with contextlib.ExitStack() as stack:
        if created:  # a failure leaves no empty report folder behind
            stack.callback(lambda: out_dir.is_dir() and not any(out_dir.iterdir()) and out_dir.rmdir())
        frr = stack.enter_context(h5py.File(rr_path, "r"))
        ffr = stack.enter_context(h5py.File(fr_path, "r")) if fr_path is not None else None
        n_rr, n_fr = len(frr["pan"]), (len(ffr["pan"]) if ffr is not None else 0)
        total, done = n_rr + (0 if needs_ref else n_fr), 0
        fused_dir = out_dir / "fused"
        fused_dir.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(fused_dir) as tmp_fused:
            for res, f, n in (("reduced", frr, n_rr), ("full", ffr, n_fr)):
                if res == "full" and (needs_ref or f is None):
                    continue  # the oracle prior sees the reference: there is none at full resolution
                for i in range(n):
                    lms = f["lms"][i].astype(np.float64)
                    pan = f["pan"][i, 0].astype(np.float64)
                    ms = f["ms"][i].astype(np.float64)
                    ref = {"gt": f["gt"][i].astype(np.float64)} if needs_ref else {}
                    if probe is None:
                        probe = (lms, pan, ms, ref)
                    t0 = time.perf_counter()
                    fused = np.asarray(fuser.fuse(lms, pan, ms, **ref), dtype=np.float64)
                    latency[RESOLUTION_GROUP[res]].append((time.perf_counter() - t0) * 1000)
                    if fused.shape != lms.shape:
                        raise ValueError(f"method {method} returned {fused.shape}, expected {lms.shape}")
                    if res == "reduced":
                        m = reduced_resolution(f["gt"][i].astype(np.float64), fused, ctx.ratio, peak=ctx.scale,
                                               cut=cfg.border_cut, block=cfg.block)
                    else:
                        m = full_resolution(fused, pan, lms, ctx.ms_gains, ctx.ratio, block=cfg.block,
                                            pan_degradation=pan_degradation, pan_gain=ctx.pan_gain)
                    scene = scenes[int(f["scene_index"][i])]
                    r, c, h, w = (int(v) for v in f["window"][i])
                    rows.append({"resolution": res, "tile": i, "seed": seed, "scene": scene, "window_row": r,
                                 "window_col": c,
                                 **{k: m.get(k) for k in keys}})
                    if cfg.save_fused:
                        _write_tif(tmp_fused / f"{'rr' if res == 'reduced' else 'fr'}_{i:03d}.tif", fused,
                                   [float(v) for v in f["geotransform"][i]], crs_by_scene.get(scene), ctx.bands)
                    done += 1
                    if progress:
                        progress(f"{dataset}/{method} {res} tile {i}", done, total)

    table = pd.DataFrame(rows, columns=["resolution", "tile", "seed", "scene", "window_row", "window_col", *keys])
    indices: dict[str, dict[str, Any]] = {}
    for res, group in RESOLUTION_GROUP.items():
        sel = table.loc[table.resolution == res]
        indices[group] = {k: {kk: _json_float(v) for kk, v in _summary(sel[k].tolist()).items()}
                          for k in group_keys[group]}
    metrics: dict[str, Any] = {INDICES: indices}
    if network:
        metrics[COST] = network_cost(fuser.model, len(ctx.bands))
        if probe is not None:
            metrics[COST]["measured"] = measured_latency(fuser, *probe)
    metrics[SETUP] = {
        "n_tiles": {"rr": n_rr, "fr": 0 if needs_ref else n_fr},
        "dataset": dataset, "method": method, "seed": seed,
        "trained_on": params.models_dataset(dataset) if network else None,  # another dataset: cross-scene
        # which checkpoint was scored: `bnnpan export` attaches these metrics to a model only if it is that one
        **({"model_sha256": fuser.sha256} if network else {}),
        "kind": "network" if network else KIND.get(method, "classical"),
        "sensor": ctx.sensor,
        "ratio": ctx.ratio, "scale": ctx.scale, "bands": list(ctx.bands),
        "rgb": [int(x) for x in attrs.get("rgb", [])],
        "border_cut": cfg.border_cut, "block": cfg.block, "psnr_peak": ctx.scale,
        "pan_degradation": pan_degradation,  # the dataset's PAN_lr; "mtf": indices.fr has d_s_mtf, hqnr_mtf
        "d_s_pan_degradation": "bicubic",  # d_s / hqnr / qnr: the toolbox's PAN_L, on every dataset
        "std": "population std over test tiles",
    }
    metrics[ENVIRONMENT] = run_environment(fuser.device if network else "cpu", threads_source)
    timing = {
        "note": "wall-clock fusion time per tile on this machine (volatile: not in git or DVC; logged to MLflow)",
        "device": params.device,
        **({"runtime": fuser.runtime} if network else {}),
        "latency_ms": {g: float(np.median(v)) if v else None for g, v in latency.items()},
        "tiles_ms": latency,
    }
    _atomic_write(out_dir / "tiles.csv", table.to_csv(index=False, float_format="%.10g"))
    _atomic_write(out_dir / TIMING_FILE, json.dumps(timing, indent=2) + "\n")
    _atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def index_stats(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{index: {"mean", "std"}}`` for every index of a metrics.json dictionary, RR then FR (flat view).

    Every index of :data:`GROUP_KEYS` (``{"mean": None, "std": None}`` when absent), then the optional ones
    (:data:`OPTIONAL_KEYS`: ``d_s_mtf``, ``hqnr_mtf``) that the file has.
    """
    groups = metrics.get(INDICES) or {}
    out = {}
    for g, keys in GROUP_KEYS.items():
        group = groups.get(g) or {}
        for k in keys + tuple(k for k in OPTIONAL_KEYS[g] if k in group):
            out[k] = dict(group.get(k) or {"mean": None, "std": None})
    return out


#: rounds of the ms/tile measurement (each: one float and one packed fusion of the same tile, interleaved)
LATENCY_ROUNDS = 5


def measured_latency(fuser: Any, lms: np.ndarray, pan: np.ndarray, ms: np.ndarray, ref: dict[str, Any],
                     rounds: int = LATENCY_ROUNDS) -> dict[str, Any]:
    """Milliseconds per test tile of a network on this machine: the packed 1-bit runtime (when its binary convs
    run packed) and the float simulation, timed interleaved on the same tile (round-robin after a warm-up of
    each, median of ``rounds``), at the stage's torch thread count. The report shows it beside the theoretical
    OPs (issue 14). A measurement, not a property of the inputs: it changes from run to run and machine to
    machine; ``python bench/infer.py`` compares the runtimes more carefully."""
    import torch

    from bnnpan.models.packed_runtime import float_only

    packed = any(getattr(m, "packed_runtime", None) is not None for m in fuser.model.modules())
    runs = {"float": float_only, **({"packed": contextlib.nullcontext} if packed else {})}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds + 1):
        for k, ctx in runs.items():
            with ctx():
                t0 = time.perf_counter()
                fuser.fuse(lms, pan, ms, **ref)
                if r:  # round 0 warms up (allocator, oneDNN primitives, packed weights)
                    times[k].append((time.perf_counter() - t0) * 1000)
    med = {k: round(float(np.median(v)), 3) for k, v in times.items()}
    return {"tile": f"{lms.shape[-2]}x{lms.shape[-1]}", "threads": torch.get_num_threads(), "rounds": rounds,
            "packed_ms": med.get("packed"), "float_ms": med["float"]}


def network_cost(model: Any, in_channels: int, sizes: tuple[int, ...] = (64, 256)) -> dict[str, Any]:
    """Params / OPs of a network (bnnpan.eval.cost, per-layer hooks) at square input sizes.

    Numbers only: the size label (the key says it) and the temporary paths of the packed-size
    export (a new directory each run) are left out, so the result is the same on every run.
    """
    from bnnpan.eval.cost import count_cost
    from bnnpan.models.packing import packed_size_report

    out: dict[str, Any] = {}
    for n in sizes:
        out[str(n)] = {k: v for k, v in count_cost(model, in_channels, n, n).totals().items() if k != "size"}
    with tempfile.TemporaryDirectory() as tmp:
        report = packed_size_report(model, Path(tmp))  # sign bits 8 per byte vs FP32 state_dict
    out["file"] = {k: v for k, v in report.items() if not k.endswith("_path")}
    return out


def _atomic_write(path: Path, text: str) -> None:
    write_text(path, text)
