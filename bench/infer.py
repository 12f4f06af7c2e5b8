"""Benchmark: inference speed of the packed 1-bit runtime (``bnnpan.models.packed_runtime``, issue 14).

1. Per layer: a 3x3 conv at widths 32 / 64 / 128 on 128^2 and 512^2 inputs, batch 1: ``F.conv2d`` in FP32
   (``fp32``), the binary layer as the float simulation runs it (``float-sim``: binarizer + ``F.conv2d`` on +-1),
   and the packed kernel (``packed``: sign packing + XNOR-popcount + alpha, the whole layer).
2. Whole networks (width 64 by default, depth 4, 4 bands): ``fp`` and every binary method in the float runtime and
   in the packed runtime, at 512^2 and 2048^2 (2048^2: one round), 1 and 2 threads.
3. Memory: peak RSS of one forward in a fresh child process (fp, BBCU, BNNPan; every method without ``--quick``),
   and the bytes of weights the model holds (the packed runtime adds the packed words; the float +-1 weights stay
   resident for the float fallback).

Timings are interleaved round-robin (every variant once per round, thread count set per call) and the median of
the rounds is reported, so a machine shared with other work slows all variants alike; read ratios, not absolute
times. Targets: packed 3x3 width 64 at 512^2 >= 4x faster than FP32 ``F.conv2d``; whole BBCU network >= 1.5x faster
than ``fp`` at the same width and depth (both at 1 thread, 512^2).

    python bench/infer.py [--quick] [--json] [--threads 1,2] [--width 64] [--depth 4] [--rounds 5]

``--quick`` (about 3 minutes on an idle 2-core machine; 7 on one loaded 2.5x): 512^2 only, every network at the
first thread count, fp and BBCU at the others; per-layer width 64 at 512^2 plus 32 / 64 / 128 at 128^2; RSS for
fp / BBCU / BNNPan.
With ``--json`` the last line is ONE JSON object (``conv_speedup``, ``bbcu_net_speedup``, and every row).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
BANDS = 4


def round_robin(fns: dict[str, tuple[int, Callable[[], object]]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each ``name -> (threads, fn)``, the variants interleaved within every round."""
    import torch

    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, (threads, fn) in fns.items():
            torch.set_num_threads(threads)
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build(method: str, width: int, depth: int):
    import torch

    from bnnpan.models.networks import NetConfig, build_network

    torch.manual_seed(0)
    return build_network(method, NetConfig(in_channels=BANDS, width=width, depth=depth, zero_init_tail=False)).eval()


def inputs(size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.rand(1, BANDS, size, size, generator=g), torch.rand(1, 1, size, size, generator=g)


def layer_rows(widths: list[int], sizes: list[int], threads: list[int], rounds: int, pairs=None) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from bnnpan.models import packed_runtime as P
    from bnnpan.models.layers import BinaryConv2d

    rows = []
    for size in sizes:
        for width in widths:
            if pairs is not None and (width, size) not in pairs:
                continue
            torch.manual_seed(0)
            conv = BinaryConv2d(width, width, act="learnable_bias_sign", weight="mean_abs").eval()
            P.to_packed_runtime(conv)
            x = torch.randn(1, width, size, size)
            w, b = torch.randn(width, width, 3, 3), torch.randn(width)

            def fp32(x=x, w=w, b=b):
                return F.conv2d(x, w, b, padding=1)

            def float_sim(conv=conv, x=x):
                with P.float_only():
                    return conv(x)

            def packed(conv=conv, x=x):
                return conv(x)

            fns = {}
            for n in threads:
                fns.update({f"fp32/{n}": (n, fp32), f"float-sim/{n}": (n, float_sim), f"packed/{n}": (n, packed)})
            with torch.no_grad():
                m = round_robin(fns, rounds)
            for n in threads:
                rows.append({"width": width, "size": size, "threads": n, "fp32_ms": 1e3 * m[f"fp32/{n}"],
                             "float_sim_ms": 1e3 * m[f"float-sim/{n}"], "packed_ms": 1e3 * m[f"packed/{n}"],
                             "speedup_vs_fp32": m[f"fp32/{n}"] / m[f"packed/{n}"],
                             "speedup_vs_float_sim": m[f"float-sim/{n}"] / m[f"packed/{n}"]})
    return rows


def net_rows(methods: list[str], width: int, depth: int, size: int, threads: list[int], rounds: int) -> list[dict]:
    import torch

    from bnnpan.models import packed_runtime as P

    lms, pan = inputs(size)
    models = {m: build(m, width, depth) for m in methods}
    fns: dict[str, tuple[int, Callable[[], object]]] = {}
    for m, model in models.items():
        P.to_packed_runtime(model)
        for n in threads:
            if m == "fp":
                fns[f"fp/float/{n}"] = (n, lambda model=model: model(lms, pan))
                continue

            def flt(model=model):
                with P.float_only():
                    return model(lms, pan)

            fns[f"{m}/float/{n}"] = (n, flt)
            fns[f"{m}/packed/{n}"] = (n, lambda model=model: model(lms, pan))
    with torch.no_grad():
        med = round_robin(fns, rounds)
    rows = []
    for key, sec in med.items():
        m, rt, n = key.split("/")
        fp = med[f"fp/float/{n}"]
        rows.append({"method": m, "runtime": rt, "size": size, "threads": int(n), "ms": 1e3 * sec,
                     "speedup_vs_fp": fp / sec})
    return rows


def weight_bytes(method: str, width: int, depth: int) -> dict:
    from bnnpan.models import packed_runtime as P
    from bnnpan.models.layers import BinaryConv2d

    model = build(method, width, depth)
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    binary = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, BinaryConv2d))
    P.to_packed_runtime(model)
    words = P.packed_weight_bytes(model)
    return {"method": method, "float_bytes": total, "binary_fp32_bytes": binary, "packed_words_bytes": words,
            "packed_only_bytes": total - binary + words}


def vm_hwm_mib() -> float:
    """This process's peak RSS (MiB): /proc's VmHWM, which starts afresh at exec (``ru_maxrss`` keeps the forking
    parent's peak on Linux), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_rss(method: str, runtime: str, width: int, depth: int, size: int, threads: int) -> dict:
    """Peak RSS (MiB) of one forward in a fresh process, and its RSS before the forward."""
    from common import child_env

    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "import json, resource, torch, infer\n"
            "from bnnpan.models import packed_runtime as P\n"
            f"torch.set_num_threads({threads})\n"
            f"model = infer.build({method!r}, {width}, {depth})\n"
            f"lms, pan = infer.inputs({size})\n"
            f"P.to_packed_runtime(model) if {runtime!r} == 'packed' else None\n"
            "base = infer.vm_hwm_mib()\n"
            "with torch.no_grad():\n"
            "    model(lms, pan)\n"
            "peak = infer.vm_hwm_mib()\n"
            "print(json.dumps({'base_mib': base, 'peak_mib': peak}))\n")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        sys.exit(f"RSS child for {method}/{runtime} failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"method": method, "runtime": runtime, "size": size, **r}


def profile(method: str, width: int, depth: int, size: int, packed: bool, top: int = 12) -> str:
    """torch.profiler's self-CPU-time table of one forward (the packed kernel shows as its Python caller)."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as tprofile

    from bnnpan.models import packed_runtime as P

    model = build(method, width, depth)
    lms, pan = inputs(size)
    if packed:
        P.to_packed_runtime(model)
        orig = P._ext.binconv

        def binconv(*a):
            with record_function("bnnpan::binconv (packed kernel)"):
                return orig(*a)

        P._ext.binconv = binconv
    try:
        with torch.no_grad():
            model(lms, pan)
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                model(lms, pan)
    finally:
        if packed:
            P._ext.binconv = orig
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="512^2 only, fewer layer shapes (under ~3 minutes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (first one: the targets)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler tables (fp, BBCU packed)")
    args = ap.parse_args()

    import torch

    from bnnpan.models import packed_runtime as P
    from bnnpan.models.networks import NETWORKS

    threads = [int(t) for t in args.threads.split(",")]
    t_start = time.perf_counter()

    def step(what: str) -> None:  # progress on stderr: stdout is the report
        print(f"[{time.perf_counter() - t_start:6.0f} s] {what} done", file=sys.stderr, flush=True)
    t_build = time.perf_counter()
    ext = P.extension()
    t_build = time.perf_counter() - t_build
    if ext is None:
        sys.exit(f"the packed extension is unavailable ({P._failed}); nothing to compare")
    print(f"packed extension: {ext.simd()} (load/build {t_build:.1f} s); torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, threads {threads}; median of {args.rounds} interleaved rounds")

    methods = ["fp", *[m for m in NETWORKS if m != "fp" and (not m.startswith("bnnpan_"))]]
    if args.quick:
        layers = layer_rows([32, 64, 128], [128, 512], threads, args.rounds,
                            pairs={(32, 128), (64, 128), (128, 128), (64, 512)})
        step("per-layer")
        nets = net_rows(methods, args.width, args.depth, 512, threads[:1], 3)
        step("networks")
        if len(threads) > 1:  # the other thread counts: the two networks of the target only
            nets += [r for r in net_rows(["fp", "bbcu"], args.width, args.depth, 512, threads[1:], 3)]
            step("networks, more threads")
        rss_methods = ["fp", "bbcu", "bnnpan"]
    else:
        layers = layer_rows([32, 64, 128], [128, 512], threads, args.rounds)
        step("per-layer")
        nets = net_rows(methods, args.width, args.depth, 512, threads, args.rounds)
        step("networks 512")
        nets += net_rows(methods, args.width, args.depth, 2048, threads, 1)
        step("networks 2048")
        rss_methods = methods

    print("\nper layer: 3x3 conv, batch 1 (ms; speedup = fp32 / packed)")
    print(f"{'width':>6}{'size':>6}{'thr':>4}{'fp32':>10}{'float-sim':>11}{'packed':>9}{'x fp32':>8}{'x sim':>7}")
    for r in layers:
        print(f"{r['width']:>6}{r['size']:>6}{r['threads']:>4}{r['fp32_ms']:>10.1f}{r['float_sim_ms']:>11.1f}"
              f"{r['packed_ms']:>9.1f}{r['speedup_vs_fp32']:>8.2f}{r['speedup_vs_float_sim']:>7.2f}")
    print(f"\nwhole networks: width {args.width}, depth {args.depth}, {BANDS} bands (ms; x fp = fp ms / ms)")
    print(f"{'method':<10}{'runtime':<8}{'size':>6}{'thr':>4}{'ms':>10}{'x fp':>7}", flush=True)
    for r in sorted(nets, key=lambda r: (r["size"], r["threads"], methods.index(r["method"]), r["runtime"])):
        print(f"{r['method']:<10}{r['runtime']:<8}{r['size']:>6}{r['threads']:>4}{r['ms']:>10.1f}"
              f"{r['speedup_vs_fp']:>7.2f}")
    rss = []
    step("tables")
    for m in rss_methods:
        for rt in (("float",) if m == "fp" else ("float", "packed")):
            rss.append(child_rss(m, rt, args.width, args.depth, 512, threads[0]))
    step("RSS")
    weights = [weight_bytes(m, args.width, args.depth) for m in rss_methods]
    print("\nmemory at 512^2 (one forward in a fresh process; MiB)")
    print(f"{'method':<10}{'runtime':<8}{'before':>8}{'peak':>8}")
    for r in rss:
        print(f"{r['method']:<10}{r['runtime']:<8}{r['base_mib']:>8.0f}{r['peak_mib']:>8.0f}")
    print("\nweights in memory (bytes): all FP32 tensors | of which binary FP32 weights | packed words | "
          "packed words + non-binary FP32")
    for w in weights:
        print(f"{w['method']:<10}{w['float_bytes']:>10}{w['binary_fp32_bytes']:>10}{w['packed_words_bytes']:>10}"
              f"{w['packed_only_bytes']:>10}")

    t0 = threads[0]
    conv = next(r for r in layers if r["width"] == 64 and r["size"] == 512 and r["threads"] == t0)
    by = {(r["method"], r["runtime"], r["size"], r["threads"]): r for r in nets}
    bbcu = by[("bbcu", "packed", 512, t0)]["speedup_vs_fp"]
    print(f"\ntargets ({t0} thread(s), 512^2): packed 3x3 width 64 vs FP32 conv2d {conv['speedup_vs_fp32']:.2f}x "
          f"(target >= 4: {'met' if conv['speedup_vs_fp32'] >= 4 else 'NOT met'}); whole BBCU packed vs fp "
          f"{bbcu:.2f}x (target >= 1.5: {'met' if bbcu >= 1.5 else 'NOT met'})")
    if args.profile:
        for m, packed in (("fp", False), ("bbcu", True), ("bnnpan", True)):
            print(f"\nprofile: {m} {'packed' if packed else 'float'} at 512^2, {t0} thread(s)")
            torch.set_num_threads(t0)
            print(profile(m, args.width, args.depth, 512, packed))
    if args.json:
        print(json.dumps({
            "conv_speedup": round(conv["speedup_vs_fp32"], 3), "bbcu_net_speedup": round(bbcu, 3),
            "threads": t0, "width": args.width, "depth": args.depth, "simd": ext.simd(),
            "conv_speedup_by_threads": {str(r["threads"]): round(r["speedup_vs_fp32"], 3) for r in layers
                                        if r["width"] == 64 and r["size"] == 512},
            "bbcu_net_speedup_by_threads": {str(n): round(by[("bbcu", "packed", 512, n)]["speedup_vs_fp"], 3)
                                            for n in threads},
            "layers": layers, "networks": nets, "rss": rss, "weights": weights,
            "peak_rss_mib_this_process": vm_hwm_mib(),
        }))


if __name__ == "__main__":
    main()
