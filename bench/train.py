"""Benchmark: training throughput (patches/s) of every method at the CPU-profile settings.

Runs the project's one training loop (``bnnpan.train.loop.train``) for a few steps per method
on the real prepared default dataset (prepared into a temporary directory if
``data/prepared/<dataset>`` is missing), with the width, depth and batch size of
``params.yaml``. Prints patches/s, seconds per step and the step-cost ratio to ``fp``.
Target (issue 4): a binary method's step costs at most 2.5x the fp step.

    python bench/train.py [--params params.yaml] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import torch
    from common import prepared_params

    from bnnpan.config import load_params
    from bnnpan.data.hdf5io import read_attrs
    from bnnpan.models.networks import NetConfig, build_network
    from bnnpan.train.loop import TrainConfig, train

    torch.set_num_threads(args.threads)
    p = load_params(args.params)
    dataset = next(iter(p.datasets))
    work = Path(tempfile.mkdtemp(prefix="bnnpan-bench-train-"))
    p = prepared_params(p, dataset, work)
    prepared = Path(p.paths.prepared) / dataset
    attrs = read_attrs(prepared / "train.h5")
    rows = []
    for method in p.train.methods:
        recipe = {**p.train.resolved(method), "iterations": args.steps, "val_every": 0, "ckpt_every": 0}
        recipe["warmup"] = min(recipe["warmup"], args.steps - 1)  # a short benchmark still gets a valid schedule
        cfg = TrainConfig(seed=p.seed, **recipe)
        torch.manual_seed(p.seed)
        net = build_network(p.network_of(method), NetConfig(
            in_channels=len(attrs["bands"]), width=p.model.width, depth=p.model.depth, ratio=int(attrs["ratio"]),
            extra=p.network_extra(method)))  # BNNPan: its prior is randomly initialised here (speed only)
        r = train(net, prepared / "train.h5", None, cfg, work / f"{method}.pt", progress=False, resume=False)
        rows.append((method, r["patches_per_s"], cfg.batch_size / r["patches_per_s"]))
    fp_step = dict((m, s) for m, _, s in rows).get("fp")
    print(f"training throughput, {p.model.width=} {p.model.depth=}, batch {cfg.batch_size} of "
          f"{attrs['bands'] and len(attrs['bands'])}x64x64 patches, {args.steps} steps, {args.threads} threads")
    print(f"{'method':<10}{'patches/s':>11}{'s/step':>9}{'x fp':>7}")
    worst = 0.0
    for m, pps, step in rows:
        ratio = step / fp_step if fp_step else float("nan")
        if m != "fp":
            worst = max(worst, ratio)
        print(f"{m:<10}{pps:>11.1f}{step:>9.3f}{ratio:>7.2f}")
    if fp_step:
        print(f"slowest binary step / fp step = {worst:.2f} (target <= 2.5): {'met' if worst <= 2.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
