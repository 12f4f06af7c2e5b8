"""Benchmark: training on a PanCollection-size file, streamed from disk (issue 11).

Builds (once; cached) a PanCollection-layout training file from the 100 real WorldView-3 patches of
``../shared/data/pancollection-wv3/fusionnet_train_wv3.mat`` (N x H x W x C uint16): ``--patches``
samples (10 000: ~5.7 GB) written as N x C x H x W **float64** (``gt``, ``lms`` 8 x 64 x 64, ``ms``
8 x 16 x 16, ``pan`` 1 x 64 x 64) the way PanCollection's ``train_wv3.h5`` stores them, contiguous
(``--layout chunked``: one sample per chunk with Fletcher-32, and ``--dtype float32``, as
``bnnpan prepare`` writes), plus
the attributes bnnpan reads (``scale`` 2047, ``ratio`` 4, ...). Sample ``j`` is real patch ``j % 100``
under dihedral transform ``(j // 100) % 8`` and a circular offset of ``(3 s % 16, 5 s % 16)`` MS pixels
(``4x`` that on the PAN grid; ``s = j // 800``), the same for its four arrays, so they stay
registered. The file is written 100 samples at a time (never whole in memory) into ``--cache``
(default: a folder under the system temp dir), temp file then rename, and reused by later runs.

Prints two tables:

(a) the real training loop (``bnnpan.train.loop.train``; ``--method`` at the width, depth, batch
    size and recipe of ``--params``, ``--steps`` steps, no validation) on the whole file, streamed,
    in a child process: patches/s and the child's peak RSS. Target: peak RSS < 2 GB.
(b) streamed vs in-memory on the first ``--subset`` samples (a file small enough to load), in this
    process, interleaved (the order alternates each round), median of ``--rounds`` rounds, as a ratio:
    the DataLoader path of the loop alone (``--batches`` batches of the training sampler, augment on)
    and ``--train-steps`` steps of the training loop. Target: streamed within 20 % of in-memory.

    python bench/loader.py [--patches 10000] [--cache DIR] [--steps 200] [--subset 1000] [--rounds 5]
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

from common import REPO, child_env, measure_run

sys.path.insert(0, str(REPO))  # this checkout's bnnpan

MAT = REPO.parent / "shared" / "data" / "pancollection-wv3" / "fusionnet_train_wv3.mat"
KEYS = ("gt", "lms", "ms", "pan")


def build_file(path: Path, n: int, layout: str, mat: Path, dtype: str = "float64", block: int = 100) -> Path:
    """Write the ``n``-sample training file (see the module doc) unless it is already there."""
    if path.is_file():
        return path
    import h5py
    import numpy as np
    import scipy.io
    import torch

    from bnnpan.atomic import atomic_path
    from bnnpan.data.datasets import dihedral

    src = scipy.io.loadmat(str(mat))
    base = {k: np.asarray(src[k]) for k in KEYS}
    base["pan"] = base["pan"][..., None]
    base = {k: v.transpose(0, 3, 1, 2).astype(np.float64) for k, v in base.items()}  # N x C x H x W
    m = len(base["pan"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        for k in KEYS:
            shape = (n, *base[k].shape[1:])
            opts = {"chunks": (1, *shape[1:]), "fletcher32": True} if layout == "chunked" else {}
            f.create_dataset(k, shape=shape, dtype=dtype, **opts)
        for j0 in range(0, n, block):
            idx = np.arange(j0, min(n, j0 + block))
            out = {k: np.empty((len(idx), *base[k].shape[1:])) for k in KEYS}
            for r, j in enumerate(idx):
                s = j // (8 * m)
                dy, dx = (3 * s) % 16, (5 * s) % 16
                t = int((j // m) % 8)
                for k in KEYS:
                    sh = (dy, dx) if k == "ms" else (4 * dy, 4 * dx)
                    x = np.roll(base[k][j % m], sh, axis=(-2, -1))
                    out[k][r] = dihedral(torch.from_numpy(x), t).numpy()
            for k in KEYS:
                f[k][idx[0] : idx[-1] + 1] = out[k]
        f.attrs.update({"sensor": "worldview3", "ratio": 4, "scale": 2047.0, "split": "train",
                        "scenes": json.dumps([mat.name]), "resolution": "reduced",
                        "bands": json.dumps(["coastal", "blue", "green", "yellow", "red", "red_edge", "nir1",
                                             "nir2"])})
    return path


def net_and_recipe(params: str, method: str, steps: int):
    import torch

    from bnnpan.config import load_params
    from bnnpan.models.networks import NetConfig, build_network
    from bnnpan.train.loop import TrainConfig

    p = load_params(params)
    recipe = {**p.train.resolved(method), "iterations": steps, "val_every": 0, "ckpt_every": 0}
    recipe["warmup"] = min(recipe["warmup"], steps - 1)
    cfg = TrainConfig(seed=p.seed, **recipe)
    torch.manual_seed(p.seed)
    net = build_network(p.network_of(method), NetConfig(in_channels=8, width=p.model.width, depth=p.model.depth,
                                                         ratio=4, extra=p.network_extra(method)))
    return net, cfg


def child_train(args: argparse.Namespace) -> None:
    """(a), in the measured child: the training loop on the whole file; prints one JSON line."""
    import torch

    from bnnpan.data.datasets import PanDataset
    from bnnpan.train.loop import train

    torch.set_num_threads(args.threads)
    net, cfg = net_and_recipe(args.params, args.method, args.steps)
    streamed = not PanDataset(args.file).in_memory
    with tempfile.TemporaryDirectory() as d:
        r = train(net, args.file, None, cfg, Path(d) / "m.pt", progress=False, resume=False)
    print(json.dumps({"patches_per_s": r["patches_per_s"], "streamed": streamed, "batch": cfg.batch_size}))


def compare(args: argparse.Namespace, subset: Path) -> dict[str, list[float]]:
    """(b): patches/s of each (what, mode) pair per round, interleaved, in this process (and the batch size)."""
    import torch
    from torch.utils.data import DataLoader

    from bnnpan.data import datasets
    from bnnpan.data.datasets import PanDataset
    from bnnpan.train.loop import InfiniteBatchSampler, train

    torch.set_num_threads(args.threads)
    modes = {"in-memory": True, "streamed": False}
    res: dict[str, list[float]] = {f"{w} {m}": [] for w in ("loader", "training") for m in modes}
    _, cfg0 = net_and_recipe(args.params, args.method, 2)
    bs = cfg0.batch_size
    res["batch"] = [bs]
    dss = {m: PanDataset(subset, in_memory=v) for m, v in modes.items()}
    assert dss["in-memory"].in_memory and not dss["streamed"].in_memory
    limit = datasets.IN_MEMORY_BYTES
    for r in range(args.rounds):
        order = list(modes) if r % 2 == 0 else list(modes)[::-1]
        for m in order:  # the DataLoader path of the loop: its sampler (augment), batch fetch, collate
            loader = DataLoader(dss[m], batch_sampler=InfiniteBatchSampler(len(dss[m]), bs, r, augment=True),
                                num_workers=args.workers)
            it = iter(loader)
            next(it)  # workers started, file open
            t = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            res[f"loader {m}"].append(args.batches * bs / (time.perf_counter() - t))
            del it
        for m in order:  # the training loop itself (it opens the file as in-memory or streamed by size)
            datasets.IN_MEMORY_BYTES = 2**62 if modes[m] else 0
            try:
                net, cfg = net_and_recipe(args.params, args.method, args.train_steps)
                with tempfile.TemporaryDirectory() as d:
                    out = train(net, subset, None, cfg, Path(d) / "m.pt", progress=False, resume=False)
            finally:
                datasets.IN_MEMORY_BYTES = limit
            res[f"training {m}"].append(out["patches_per_s"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--method", default="fp", help="train.methods entry whose network and recipe are used")
    ap.add_argument("--patches", type=int, default=10_000)
    ap.add_argument("--layout", choices=("contiguous", "chunked"), default="contiguous")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                    help="storage of the built files (PanCollection: float64; bnnpan prepare: float32)")
    ap.add_argument("--part", choices=("a", "b", "both"), default="both", help="which table(s) to print")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "bnnpan-bench-loader"))
    ap.add_argument("--mat", default=str(MAT))
    ap.add_argument("--steps", type=int, default=200, help="(a) training steps on the whole file")
    ap.add_argument("--subset", type=int, default=1000, help="(b) samples of the in-memory/streamed comparison")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=50, help="(b) DataLoader batches per round")
    ap.add_argument("--train-steps", type=int, default=20, help="(b) training steps per round")
    ap.add_argument("--workers", type=int, default=0, help="(b) DataLoader workers of the loader comparison")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child-train", dest="file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.file:
        child_train(args)
        return
    cache = Path(args.cache)
    if args.part in ("a", "both"):
        part_a(args, build_file(cache / f"wv3_{args.patches}_{args.layout}_{args.dtype}.h5", args.patches,
                                args.layout, Path(args.mat), args.dtype))
    if args.part in ("b", "both"):
        part_b(args, build_file(cache / f"wv3_{args.subset}_{args.layout}_{args.dtype}.h5", args.subset,
                                args.layout, Path(args.mat), args.dtype))


def part_a(args: argparse.Namespace, full: Path) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-train", str(full), "--params", args.params,
           "--method", args.method, "--steps", str(args.steps), "--threads", str(args.threads)]
    wall, rss, out = measure_run(cmd, REPO, child_env())
    a = json.loads(out.strip().splitlines()[-1])
    size = full.stat().st_size
    print(f"(a) training loop on {args.patches} {args.dtype} patches ({size / 2**30:.2f} GiB, {args.layout}), "
          f"{'streamed' if a['streamed'] else 'IN MEMORY'}, method {args.method}, batch {a['batch']}, "
          f"{args.steps} steps, {args.threads} threads")
    print(f"{'patches/s':>10}{'wall s':>9}{'peak RSS MiB':>14}")
    print(f"{a['patches_per_s']:>10.1f}{wall:>9.1f}{rss:>14.0f}")
    print(f"peak RSS target (< 2048 MiB): {'met' if rss < 2048 else 'NOT met'}\n")


def part_b(args: argparse.Namespace, subset: Path) -> None:
    res = compare(args, subset)
    print(f"(b) streamed vs in-memory on {args.subset} {args.dtype} patches ({args.layout}), "
          f"{args.rounds} interleaved rounds (median); "
          f"loader: {args.batches} batches, {args.workers} workers; training: {args.train_steps} steps")
    print(f"{'what':<10}{'in-memory p/s':>15}{'streamed p/s':>14}{'streamed / in-memory':>22}")
    ratio = {}
    for what in ("loader", "training"):
        mem = statistics.median(res[f"{what} in-memory"])
        st = statistics.median(res[f"{what} streamed"])
        ratio[what] = statistics.median(s / m for s, m in zip(res[f"{what} streamed"], res[f"{what} in-memory"],
                                                              strict=True))
        print(f"{what:<10}{mem:>15.1f}{st:>14.1f}{ratio[what]:>22.2f}")
    bs = res["batch"][0]
    extra = bs / statistics.median(res["loader streamed"]) - bs / statistics.median(res["loader in-memory"])
    step = bs / statistics.median(res["training streamed"])
    print(f"streamed loading costs {1e3 * extra:.1f} ms more per batch of {bs}: {extra / step:.1%} of a "
          f"training step ({step:.2f} s)")
    print(f"training throughput target (streamed >= 0.80 x in-memory): "
          f"{'met' if ratio['training'] >= 0.8 else 'NOT met'}; the loader alone reads and casts per batch what "
          f"the in-memory path read and cast once")

if __name__ == "__main__":
    main()
