"""Benchmark: is it faster to train one network at a time on every core, or several at once on one core each?

The critical path of ``make run`` is the sequence of training jobs (evaluate jobs fill the gaps). Snakemake
can run them one at a time with ``T`` torch threads (``resources: train=1``), or ``J`` at once with
``T / J`` threads each. This script measures both on the real prepared default dataset with the project's
training loop, **interleaved in one process**: each round runs configuration A (``--methods`` one after the
other, ``--threads`` threads) and configuration B (the same methods at once, one thread each, started
together behind a barrier so imports and set-up are not timed), alternating which goes first. It prints the
training throughput (steps per second over all methods) of each configuration, per round, and the median
ratio B/A: above 1 means parallel jobs finish the same training sooner.

    python bench/parallel_train.py [--methods fp,bbcu] [--steps 30] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _worker(method: str, threads: int, steps: int, params: str, prepared: str, work: str, barrier, out) -> None:
    import torch

    from bnnpan.config import load_params
    from bnnpan.data.hdf5io import read_attrs
    from bnnpan.models.networks import NetConfig, build_network
    from bnnpan.train.loop import TrainConfig, train

    torch.set_num_threads(threads)
    p = load_params(params)
    attrs = read_attrs(Path(prepared) / "train.h5")
    recipe = {**p.train.resolved(method), "iterations": steps, "val_every": 0, "ckpt_every": 0}
    recipe["warmup"] = min(recipe["warmup"], steps - 1)
    torch.manual_seed(0)
    net = build_network(p.network_of(method), NetConfig(
        in_channels=len(attrs["bands"]), width=p.model.width, depth=p.model.depth, ratio=int(attrs["ratio"]),
        extra=p.network_extra(method)))
    cfg = TrainConfig(seed=0, **recipe)
    barrier.wait()
    t0 = time.perf_counter()
    train(net, Path(prepared) / "train.h5", None, cfg, Path(work) / f"{method}-{os.getpid()}.pt",
          progress=False, resume=False)
    out.put((method, t0, time.perf_counter()))


def run(methods: list[str], threads: int, parallel: bool, steps: int, params: str, prepared: str,
        work: str) -> float:
    """Steps per second over all ``methods``, trained one after the other or all at once."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    groups = [methods] if parallel else [[m] for m in methods]
    busy = 0.0
    for group in groups:
        barrier = ctx.Barrier(len(group))
        procs = [ctx.Process(target=_worker, args=(m, threads, steps, params, prepared, work, barrier, out))
                 for m in group]
        for pr in procs:
            pr.start()
        results = [out.get() for _ in group]
        for pr in procs:
            pr.join()
            if pr.exitcode:
                sys.exit(f"a training worker failed (exit {pr.exitcode})")
        busy += max(t1 for _, _, t1 in results) - min(t0 for _, t0, _ in results)
    return len(methods) * steps / busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--methods", default="fp,bbcu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of configuration A (B: one thread per job)")
    args = ap.parse_args()

    from common import prepared_params

    from bnnpan.config import load_params

    methods = args.methods.split(",")
    p = load_params(args.params)
    dataset = next(iter(p.datasets))
    work = Path(tempfile.mkdtemp(prefix="bnnpan-bench-par-"))
    p = prepared_params(p, dataset, work)
    prepared = str(Path(p.paths.prepared) / dataset)
    ratios = []
    print(f"methods {methods}, {args.steps} steps each; A: one at a time, {args.threads} threads; "
          f"B: {len(methods)} at once, 1 thread each")
    for r in range(args.rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        rate = {}
        for parallel in order:
            rate[parallel] = run(methods, 1 if parallel else args.threads, parallel, args.steps, args.params,
                                 prepared, str(work))
        ratios.append(rate[True] / rate[False])
        print(f"round {r + 1}: A {rate[False]:.2f} steps/s, B {rate[True]:.2f} steps/s, B/A {ratios[-1]:.2f}")
    print(f"median B/A throughput ratio: {statistics.median(ratios):.2f} ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
