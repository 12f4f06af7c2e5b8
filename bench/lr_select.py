"""Benchmark: validation-based learning-rate selection, one grid for every method.

A fair comparison gives every method the same chance: each trained method is trained once per lr of
one grid (default 5e-4, 1e-3, 2e-3), everything else at its params.yaml recipe, and the lr with the
best final validation PSNR (``valid.h5``; the test tiles are never looked at) is the method's. The
script prints the table, each method's selected lr and the lr params.yaml gives it now, so the
per-method ``train.methods.<m>.lr`` entries of params.yaml can be checked against a measurement.

BNNPan-family methods share one latent prior, pretrained once from the ``prior`` section (the prior
does not depend on a method's lr). Runs are resumable: pass ``--work DIR`` and re-run after an
interruption. ``--jobs N`` trains N runs at once (``--threads`` torch threads each; the thread count changes
results only by float rounding).

    python bench/lr_select.py [--params params.yaml] [--dataset landsat8] [--lrs 5e-4,1e-3,2e-3]
        [--methods fp,bnn,...] [--work DIR] [--jobs 1] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def with_lr(p, method: str, lr: float, models: Path):
    """``p`` with ``method`` trained at ``lr`` and its models under ``models``."""
    from bnnpan.config import MethodTrain

    methods = dict(p.train.methods)
    over = methods.get(method) or MethodTrain()
    methods[method] = over.model_copy(update={"lr": lr})
    return p.model_copy(update={
        "train": p.train.model_copy(update={"methods": methods}),
        "paths": p.paths.model_copy(update={"models": str(models)}),
    })


def run_one(p, dataset: str, method: str, lr: float, models: str, threads: int) -> tuple[str, float, float, float]:
    """Train ``method`` at ``lr``; returns (method, lr, final validation PSNR, seconds)."""
    os.environ["BNNPAN_THREADS"] = str(threads)
    from bnnpan.train.run import train_method

    t = time.perf_counter()
    r = train_method(with_lr(p, method, lr, Path(models)), dataset, method, track=False, resume=True,
                     progress=False)
    return method, lr, float(r["val_psnr"]), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--dataset", default=None, help="default: the first dataset of params")
    ap.add_argument("--lrs", default="5e-4,1e-3,2e-3")
    ap.add_argument("--methods", default=None, help="comma-separated; default: every trained method")
    ap.add_argument("--work", default=None, help="keep runs here (resumable); default: a temporary folder")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    ap.add_argument("--device", default=None, help="override params' device")
    args = ap.parse_args()

    from common import prepared_params

    from bnnpan.config import load_params
    from bnnpan.train.prior import pretrain_prior
    from bnnpan.train.run import prior_file

    p = load_params(args.params)
    if args.device:
        p = p.model_copy(update={"device": args.device})
    dataset = args.dataset or next(iter(p.datasets))
    lrs = [float(x) for x in args.lrs.split(",")]
    methods = args.methods.split(",") if args.methods else list(p.train.methods)
    unknown = [m for m in methods if m not in p.train.methods]
    if unknown:
        sys.exit(f"not trained methods of {args.params}: {unknown}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bnnpan-lr-select-"))
    work.mkdir(parents=True, exist_ok=True)
    p = prepared_params(p, dataset, work)

    with_prior = set(p.prior_methods()) & set(methods)  # the BNNPan family: one shared pretrained prior
    if with_prior:
        os.environ["BNNPAN_THREADS"] = str(os.cpu_count() or 1)
        pp = p.model_copy(update={"paths": p.paths.model_copy(update={"models": str(work / "prior")})})
        if not prior_file(pp, dataset).is_file():
            print("pretraining the latent prior once ...", flush=True)
            pretrain_prior(pp, dataset, track=False, progress=False)
    runs = []
    for lr in lrs:
        models = work / f"lr_{lr:g}"
        if with_prior:
            dst = models / dataset / "prior.pt"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / "prior" / dataset / "prior.pt", dst)
        runs += [(m, lr, str(models)) for m in methods]

    runs.sort(key=lambda r: r[0] not in with_prior)  # the slowest (BNNPan family) first
    val: dict[tuple[str, float], float] = {}
    print(f"{len(runs)} runs on {dataset} ({args.jobs} at a time, {threads} threads each) in {work}", flush=True)
    # spawn: autograd's threads do not survive fork (the prior was trained in this process)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futs = [pool.submit(run_one, p, dataset, m, lr, models, threads) for m, lr, models in runs]
        for f in as_completed(futs):
            m, lr, psnr, sec = f.result()
            val[(m, lr)] = psnr
            print(f"  {m:<20} lr {lr:<8g} val PSNR {psnr:7.3f} dB  ({sec:5.0f} s)", flush=True)

    print(f"\nfinal validation PSNR (dB) on {dataset}, seed {p.seed}, "
          f"{p.train.defaults.iterations} iterations; * = selected")
    print(f"{'method':<20}" + "".join(f"{lr:>10g}" for lr in lrs) + f"{'selected':>10}{'params':>10}{'gain':>8}")
    for m in methods:
        best = max(lrs, key=lambda lr: val[(m, lr)] if math.isfinite(val[(m, lr)]) else -math.inf)
        cur = p.train.resolved(m)["lr"]
        cells = "".join(f"{val[(m, lr)]:>9.3f}{'*' if lr == best else ' '}" for lr in lrs)
        gain = val[(m, best)] - val[(m, cur)] if (m, cur) in val else math.nan
        flag = "" if best == cur else "  <- params differ"
        print(f"{m:<20}{cells}{best:>10g}{cur:>10g}{gain:>8.3f}{flag}")


if __name__ == "__main__":
    main()
