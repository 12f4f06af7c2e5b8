"""Estimate: the GPU time of a profile's training (made for profiles/pancollection/params.yaml), without a GPU.

An ESTIMATE, not a measurement: no GPU was used. What is measured here, on the CPU, is what one training step
of each method *does*; a stated model of a reference GPU turns that into time.

Measured (exact, from the code that trains): for every method of ``train.methods`` and for the latent prior's
two pretraining stages, ONE training step exactly as the training loop runs it (forward at the profile's
width, depth and batch of 64 x 64 patches, L1 loss, backward, Adam step), once for 8-band (WorldView-3) and
once for 4-band (QuickBird, GaoFen-2) data, on the CPU under a ``TorchDispatchMode`` that sees every ATen
op, the backward's included. Per op: its FLOPs (``torch.utils.flop_counter``'s formulas: convolutions and
matrix products, forward and backward; binary convolutions are float convolutions of +-1 values while
training, so they count in full), the bytes it reads and writes (its tensor inputs and outputs; in-place
ops read and write), and whether it runs a kernel (views, ``empty`` and ``detach`` do not). The same for
one validation forward pass. Counted at batches of 2 and 4 and extrapolated op by op to the profile's batch
(FLOPs and bytes of an op are affine in the batch; ``--exact`` counts at the full batch: the same numbers,
5x slower -- checked for fp, bnnpan and the prior). Optionally (``--data``), the time to read one batch from a prepared
``train.h5`` the way a large file is read (lazily, sample by sample, no in-memory copy), measured.

Model (stated assumptions, per-kernel roofline, eager PyTorch)::

    t_kernel = max(flops / F, bytes / B, t_min)
    t_gpu    = sum of t_kernel over the step + h2d_bytes / PCIe
    t_step   = max(t_gpu, n_kernels * t_host)          # the host issues ops one by one (eager)

with F the sustained convolution throughput (PyTorch lets cuDNN use TF32 by default), B the sustained
memory bandwidth, t_min the shortest kernel, t_host the host-side cost of issuing one op. Three scenarios
bound the guess (``SCENARIOS``: reference GPU NVIDIA A100-SXM4 40 GB, TF32 peak 156 TFLOPS, FP32 19.5,
HBM2 1555 GB/s); the central one is the estimate. A run = ``iterations`` steps + ``iterations / val_every``
validations over the valid set (PanCollection's sizes below) + checkpoints (ignored). Data loading happens
in DataLoader workers beside the step; the script says whether ``num_workers`` workers keep up.
Not in the table: ``prepare`` (the import: CPU and disk bound), ``evaluate`` (20 + 20 test tiles per
dataset: the networks' forward passes take seconds, the indices are CPU work), process start-up.

    python bench/gpu_estimate.py [--params profiles/pancollection/params.yaml] [--data DIR_WITH_train.h5]
        [--threads N] [--exact]

(~2 minutes on 2 cores; the table in the profile's header and the README came from it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# PanCollection's patch counts (train, valid). They reproduce the training-folder sizes the PanCollection README
# gives (5.76 / 5.37 / 6.21 GB, i.e. GiB) at 573 440 bytes per float64 WV3 patch (gt, lms 8 x 64 x 64; ms
# 8 x 16 x 16; pan 64 x 64) and 303 104 bytes per 4-band patch: (9714 + 1080) x 573 440 B = 5.77 GiB, etc.
PANCOLLECTION = {"wv3": (9714, 1080, 8), "qb": (17139, 1905, 4), "gf2": (19809, 2201, 4)}


@dataclass(frozen=True)
class Scenario:
    name: str
    flops: float  # sustained convolution / matmul throughput, FLOP/s
    bandwidth: float  # sustained memory bandwidth, B/s
    t_min: float  # shortest kernel, s
    t_host: float  # host time to issue one op (Python + dispatcher + autograd + launch), s
    pcie: float  # host-to-device copy of the batch (pinned), B/s


# Reference: NVIDIA A100-SXM4 40 GB (TF32 tensor cores 156 TFLOPS dense, FP32 19.5 TFLOPS, HBM2 1555 GB/s).
SCENARIOS = (
    Scenario("optimistic", 60e12, 1300e9, 3e-6, 5e-6, 20e9),  # ~40 % of TF32 peak, 84 % of HBM
    Scenario("central", 30e12, 1100e9, 4e-6, 8e-6, 12e9),  # ~20 % of TF32 peak, 71 % of HBM
    Scenario("pessimistic", 15e12, 800e9, 6e-6, 15e-6, 8e9),  # ~FP32 without tensor cores (deterministic cuDNN)
)

# ATen ops that launch no kernel: views, allocations, metadata.
_NO_KERNEL = frozenset("""
view _unsafe_view _reshape_alias expand expand_as permute transpose t squeeze unsqueeze select slice as_strided
detach alias split split_with_sizes unbind chunk narrow diagonal unfold view_as_real view_as_complex lift_fresh
empty empty_like empty_strided new_empty new_empty_strided set_ resize_ _local_scalar_dense is_same_size
""".split())


class OpCounter:
    """Counts kernels, FLOPs and bytes of every ATen op run inside it (a TorchDispatchMode)."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, float, float]] = []  # (name, flops, bytes) of each kernel

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.flop_counter import flop_registry

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                packet = func._overloadpacket
                name = packet.__name__.rstrip("_") if packet.__name__ not in ("set_", "resize_") else packet.__name__
                if name in _NO_KERNEL:
                    return out
                flops = 0.0
                if packet in flop_registry:
                    flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
                seen: set[int] = set()
                nbytes = 0
                for t in (*tree_flatten((args, kwargs))[0], *tree_flatten(out)[0]):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        key = id(t)
                        if key not in seen:
                            seen.add(key)
                            nbytes += t.numel() * t.element_size()
                counter.ops.append((name, flops, float(nbytes)))
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    def summary(self) -> dict[str, float]:
        return {"kernels": len(self.ops), "flops": sum(o[1] for o in self.ops), "bytes": sum(o[2] for o in self.ops)}

    def gpu_seconds(self, s: Scenario) -> float:
        return sum(max(f / s.flops, b / s.bandwidth, s.t_min) for _, f, b in self.ops)


@dataclass
class StepCost:
    train: OpCounter
    valid: OpCounter
    h2d_bytes: float

    def step_seconds(self, s: Scenario) -> float:
        gpu = self.train.gpu_seconds(s) + self.h2d_bytes / s.pcie
        return max(gpu, len(self.train.ops) * s.t_host)

    def valid_batch_seconds(self, s: Scenario) -> float:
        gpu = self.valid.gpu_seconds(s) + self.h2d_bytes / s.pcie
        return max(gpu, len(self.valid.ops) * s.t_host)


def _count(net, batch: int, channels: int, cfg, seed: int, opt) -> tuple[OpCounter, OpCounter, float]:
    import torch

    from bnnpan.train.loop import call_model, model_loss

    g = torch.Generator().manual_seed(seed)
    lms, gt = (torch.rand(batch, channels, 64, 64, generator=g) for _ in range(2))
    pan = torch.rand(batch, 1, 64, 64, generator=g)
    wants_gt = bool(getattr(net, "wants_gt", False))
    net.train()
    with OpCounter() as train:
        loss = model_loss(net, wants_gt, lms, pan, gt, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad(), OpCounter() as valid:
        call_model(net, wants_gt, lms, pan, gt)
    net.train()
    return train, valid, float(sum(t.numel() * t.element_size() for t in (lms, pan, gt)))


def _extrapolate(a: OpCounter, b: OpCounter, na: int, nb: int, n: int) -> OpCounter:
    """Per op, FLOPs and bytes are affine in the batch (activations scale, weights do not): from two small
    batches ``na`` < ``nb`` to ``n``, exactly, when both ran the same kernels (checked)."""
    if [o[0] for o in a.ops] != [o[0] for o in b.ops]:
        raise RuntimeError("the kernels differ between the two batch sizes: count at the full batch (--exact)")
    out = OpCounter()
    k = (n - na) / (nb - na)
    out.ops = [(name, fa + (fb - fa) * k, ba + (bb - ba) * k)
               for (name, fa, ba), (_, fb, bb) in zip(a.ops, b.ops, strict=True)]
    return out


def count_step(net, batch: int, channels: int, recipe: dict, seed: int, exact: bool = False) -> StepCost:
    """One training step (forward, loss, backward, Adam step, as bnnpan.train.loop runs it) and one validation
    forward, counted at ``batch``: directly (``exact``) or extrapolated from batches of 2 and 4 (5x cheaper)."""
    import torch

    from bnnpan.train.loop import TrainConfig, model_loss

    cfg = TrainConfig(seed=seed, **{**recipe, "iterations": max(2, recipe["warmup"] + 1)})
    # foreach Adam: what torch uses by default for CUDA parameters (a handful of multi-tensor kernels)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, foreach=True)
    g = torch.Generator().manual_seed(seed)
    x = [torch.rand(2, c, 64, 64, generator=g) for c in (channels, 1, channels)]
    loss = model_loss(net, bool(getattr(net, "wants_gt", False)), *x, cfg)  # a first step: Adam's state exists
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if exact:
        return StepCost(*_count(net, batch, channels, cfg, seed, opt))
    (ta, va, ha), (tb, vb, hb) = (_count(net, n, channels, cfg, seed, opt) for n in (2, 4))
    return StepCost(_extrapolate(ta, tb, 2, 4, batch), _extrapolate(va, vb, 2, 4, batch),
                    ha + (hb - ha) * (batch - 2) / 2)


def networks(p, channels: int):
    """(name, network, recipe) for every trained method and the prior's two pretraining stages."""
    import torch

    from bnnpan.models.bnnpan import BNNPanNet, BNNPanSwitches
    from bnnpan.models.networks import NetConfig, build_network
    from bnnpan.train.prior import prior_switches

    out = []
    if p.prior_methods():
        sw = prior_switches(p)
        base = p.train.defaults.model_dump()
        for stage, ldpc, iters, lr in ((1, "oracle", p.prior.stage1_iterations, base["lr"]),
                                       (2, "diffusion", p.prior.stage2_iterations, p.prior.stage2_lr)):
            torch.manual_seed(p.seed)
            net = BNNPanNet(channels, p.model.width, p.model.depth, BNNPanSwitches.from_dict({**sw, "ldpc": ldpc}),
                            p.model.zero_init_tail, role=f"stage{stage}")
            out.append((f"prior stage {stage}", net, {**base, "iterations": iters, "lr": lr}))
    for m in p.train.methods:
        torch.manual_seed(p.seed)
        net = build_network(p.network_of(m), NetConfig(in_channels=channels, width=p.model.width,
                                                       depth=p.model.depth, extra=p.network_extra(m),
                                                       zero_init_tail=p.model.zero_init_tail))
        out.append((m, net, p.train.resolved(m)))
    return out


def batch_read_seconds(train_h5: Path, batch: int, repeats: int = 20) -> float:
    """Median time to read one random batch the way the loop reads a file too big for memory (lazily)."""
    import torch
    from torch.utils.data import default_collate

    from bnnpan.data.datasets import PanDataset

    ds = PanDataset(train_h5, in_memory=False)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats):
        idx = torch.randint(len(ds), (batch,), generator=g).tolist()
        tf = torch.randint(8, (batch,), generator=g).tolist()
        t0 = time.perf_counter()
        default_collate([ds[(i, t)] for i, t in zip(idx, tf, strict=True)])
        times.append(time.perf_counter() - t0)
    ds.close()
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "profiles/pancollection/params.yaml"))
    ap.add_argument("--data", default=None, help="a prepared dataset folder (its train.h5 is read lazily)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--exact", action="store_true", help="count at the full batch (default: extrapolated from "
                    "batches of 2 and 4, exact for ops whose FLOPs and bytes are affine in the batch)")
    args = ap.parse_args()

    import torch

    from bnnpan.config import load_params

    torch.set_num_threads(args.threads)
    p = load_params(args.params)
    batch = p.train.defaults.batch_size
    datasets = {d: PANCOLLECTION[d] for d in p.datasets if d in PANCOLLECTION}
    if not datasets:
        raise SystemExit(f"{args.params}: none of the datasets {sorted(PANCOLLECTION)} (PanCollection sizes)")
    central = next(s for s in SCENARIOS if s.name == "central")
    costs: dict[tuple[str, int], tuple[StepCost, dict]] = {}
    t0 = time.perf_counter()
    for channels in sorted({c for _, _, c in datasets.values()}, reverse=True):
        for name, net, recipe in networks(p, channels):
            costs[(name, channels)] = (count_step(net, batch, channels, recipe, p.seed, args.exact), recipe)
    counted_s = time.perf_counter() - t0

    print(f"# GPU-time ESTIMATE for {args.params} (no GPU used; bench/gpu_estimate.py)")
    print(f"# width {p.model.width}, depth {p.model.depth}, batch {batch} of 64 x 64; one step counted per method "
          f"and band count ({counted_s:.0f} s on this CPU)")
    print("# scenarios: " + "; ".join(f"{s.name}: {s.flops / 1e12:.0f} TFLOP/s, {s.bandwidth / 1e9:.0f} GB/s, "
                                      f"t_min {s.t_min * 1e6:.0f} us, t_host {s.t_host * 1e6:.0f} us"
                                      for s in SCENARIOS))
    print()
    names = list(dict.fromkeys(n for n, _ in costs))
    chans = sorted({c for _, c in costs}, reverse=True)
    print("| method | " + " | ".join(f"GFLOP / GB / kernels per step ({c} bands)" for c in chans) + " | "
          + " | ".join(f"ms/step ({c} bands)" for c in chans) + " |")
    print("|---|" + "---|" * (2 * len(chans)))
    for n in names:
        cells = []
        for c in chans:
            s = costs[(n, c)][0].train.summary()
            cells.append(f"{s['flops'] / 1e9:.0f} / {s['bytes'] / 1e9:.1f} / {s['kernels']:.0f}")
        for c in chans:
            st = costs[(n, c)][0]
            lo, mid, hi = (st.step_seconds(s) * 1e3 for s in SCENARIOS)
            cells.append(f"{mid:.1f} ({lo:.1f}-{hi:.1f})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print()

    def run_hours(name: str, dataset: str, s: Scenario) -> float:
        _, n_valid, c = datasets[dataset]
        st, recipe = costs[(name, c)]
        iters = recipe["iterations"]
        n_val = iters // recipe["val_every"] + (iters % recipe["val_every"] != 0) if recipe["val_every"] else 1
        return (iters * st.step_seconds(s) + n_val * math.ceil(n_valid / batch) * st.valid_batch_seconds(s)) / 3600

    ds_names = list(datasets)
    print("| method | iterations | " + " | ".join(f"{d} (h)" for d in ds_names) + " | all datasets (h) |")
    print("|---|---|" + "---|" * (len(ds_names) + 1))
    totals = [0.0, 0.0, 0.0]
    for n in names:
        per = {d: [run_hours(n, d, s) for s in SCENARIOS] for d in ds_names}
        row = [sum(per[d][i] for d in ds_names) for i in range(3)]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        iters = costs[(n, chans[0])][1]["iterations"]
        print(f"| {n} | {iters} | " + " | ".join(f"{per[d][1]:.2f}" for d in ds_names)
              + f" | {row[1]:.1f} ({row[0]:.1f}-{row[2]:.1f}) |")
    print(f"| **total** | | | | | **{totals[1]:.0f} h** ({totals[0]:.0f}-{totals[2]:.0f}) |"
          if len(ds_names) == 3 else f"total: {totals[1]:.0f} h ({totals[0]:.0f}-{totals[2]:.0f})")
    epochs = ", ".join(f"{d} {p.train.defaults.iterations * batch / n_train:.0f}"
                       for d, (n_train, _, _) in datasets.items())
    print(f"\n# epochs at {p.train.defaults.iterations} iterations x batch {batch}: {epochs}")

    if args.data:
        train_h5 = Path(args.data) / "train.h5"
        t_read = batch_read_seconds(train_h5, batch)
        workers = p.train.defaults.num_workers
        per_step = t_read / max(workers, 1)
        bound = sorted({n for (n, c), (st, _) in costs.items() if st.step_seconds(central) < per_step})
        print(f"# data: one batch of {batch} read lazily (as a train.h5 over 512 MB is) from {train_h5} in "
              f"{t_read * 1e3:.1f} ms (median of 20, this CPU, file in the page cache); with num_workers {workers}: "
              f"{per_step * 1e3:.1f} ms per step; central steps shorter than that (data-bound on this CPU): "
              f"{', '.join(bound) or 'none'}")


if __name__ == "__main__":
    main()
