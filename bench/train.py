"""Benchmark: the training step of every method against ``fp``, timed interleaved (round-robin).

Each method gets its network (width, depth and recipe of ``params.yaml``), its Adam optimizer and the same
batches of the real prepared default dataset (prepared into a temporary directory if
``data/prepared/<dataset>`` is missing). Every round runs ``--steps`` training steps of each method in turn
(:func:`bnnpan.train.loop.optimizer_step`, the loop's own step), the order rotated from round to round, so a
slow spell of this shared machine hits every method alike. Printed per method: the median step time and the
median over rounds of its step time divided by ``fp``'s in the same round. Target (issue 14): every binary
method's step within 2.5x of ``fp``.

    python bench/train.py [--params params.yaml] [--rounds 7] [--steps 3] [--threads 2] [--methods fp,bbcu] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET = 2.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps of each method per round")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--methods", default="", help="comma-separated (default: params' train.methods; fp is added)")
    ap.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    args = ap.parse_args()

    import torch
    from common import prepared_params

    from bnnpan.config import load_params
    from bnnpan.data.datasets import PanDataset
    from bnnpan.models.networks import NetConfig, build_network
    from bnnpan.train.loop import TrainConfig, _set_progress, optimizer_step

    torch.set_num_threads(args.threads)
    p = load_params(args.params)
    dataset = next(iter(p.datasets))
    work = Path(tempfile.mkdtemp(prefix="bnnpan-bench-train-"))
    p = prepared_params(p, dataset, work)
    ds = PanDataset(Path(p.paths.prepared) / dataset / "train.h5")
    channels = int(ds[0]["lms"].shape[0])
    methods = [m for m in args.methods.split(",") if m] or list(p.train.methods)
    methods = ["fp"] + [m for m in methods if m != "fp"]

    runs = {}
    for method in methods:
        recipe = {**p.train.resolved(method), "iterations": 10, "val_every": 0, "ckpt_every": 0}
        recipe["warmup"] = min(recipe["warmup"], 9)
        cfg = TrainConfig(seed=p.train.seeds[0], **recipe)
        torch.manual_seed(p.train.seeds[0])
        net = build_network(p.network_of(method), NetConfig(
            in_channels=channels, width=p.model.width, depth=p.model.depth, ratio=ds.ratio or 4,
            extra=p.network_extra(method)))  # BNNPan: its prior is randomly initialised here (speed only)
        net.train()
        _set_progress(net, 0.5)  # mid-training state of the schedules that depend on it (IR-Net's EDE)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        bs = cfg.batch_size
        batches = []
        for k in range(args.steps):
            items = [ds[(k * bs + i) % len(ds)] for i in range(bs)]
            batches.append({key: torch.stack([torch.as_tensor(it[key]) for it in items])
                            for key in ("lms", "pan", "gt")})
        runs[method] = (net, opt, cfg, bool(getattr(net, "wants_gt", False)), batches)

    def run(method: str) -> float:
        net, opt, cfg, wants_gt, batches = runs[method]
        t0 = time.perf_counter()
        for b in batches:
            optimizer_step(net, net, opt, wants_gt, b["lms"], b["pan"], b["gt"], cfg)
        return (time.perf_counter() - t0) / len(batches)

    for m in methods:  # warm-up: allocator, oneDNN primitive caches
        run(m)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            times[m].append(run(m))
    ratios = {m: statistics.median(t / f for t, f in zip(times[m], times["fp"], strict=True)) for m in methods}
    bs = runs["fp"][2].batch_size
    print(f"training step, width {p.model.width}, depth {p.model.depth}, batch {bs} of {channels}-band "
          f"{ds[0]['gt'].shape[-1]}^2 patches, {args.rounds} rounds x {args.steps} steps interleaved, "
          f"{args.threads} threads")
    print(f"{'method':<22}{'s/step':>9}{'x fp':>7}")
    for m in methods:
        print(f"{m:<22}{statistics.median(times[m]):>9.3f}{ratios[m]:>7.2f}")
    worst = max((ratios[m], m) for m in methods if m != "fp") if len(methods) > 1 else (float("nan"), "")
    print(f"slowest binary step / fp step = {worst[0]:.2f} ({worst[1]}; target <= {TARGET}): "
          f"{'met' if worst[0] <= TARGET else 'NOT met'}")
    if args.json:
        print(json.dumps({"threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                          "s_per_step": {m: statistics.median(times[m]) for m in methods},
                          "x_fp": ratios, "worst": worst[0], "worst_method": worst[1], "target": TARGET}))


if __name__ == "__main__":
    main()
