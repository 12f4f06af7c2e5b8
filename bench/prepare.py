"""Benchmark: wall time and peak memory of fetch + prepare on the default scene.

Runs each measured step in a fresh child process (so peak RSS is that step's own,
imports included) inside a temporary directory, and prints one table.
Target (issue 2): fetch + prepare under 20 s and under 2 GB on the 2-core reference machine.

    python bench/prepare.py [--params params.yaml] [--repeat 3] [--track]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        f"r = subprocess.run({cmd!r})\n"
        "dt = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(f'{dt} {rss}')\n"
        "sys.exit(r.returncode)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    dt, rss = out.stdout.split()[-2:]
    return float(dt), float(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--track", action="store_true", help="include MLflow logging (SQLite store) in the timing")
    args = ap.parse_args()
    bnnpan = [str(Path(sys.executable).parent / "bnnpan")]
    if not Path(bnnpan[0]).exists():
        bnnpan = [sys.executable, "-m", "bnnpan.cli"]
    track = [] if args.track else ["--no-track"]
    rows: dict[str, list[tuple[float, float]]] = {"fetch": [], "prepare": [], "fetch+prepare": []}
    for _ in range(args.repeat):
        work = Path(tempfile.mkdtemp(prefix="bnnpan-bench-"))
        try:
            shutil.copy(args.params, work / "params.yaml")
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
            f = measure([*bnnpan, "fetch", *track], work, env)
            p = measure([*bnnpan, "prepare", *track], work, env)
            rows["fetch"].append(f)
            rows["prepare"].append(p)
            rows["fetch+prepare"].append((f[0] + p[0], max(f[1], p[1])))
            size = sum(x.stat().st_size for x in (work / "data/prepared").rglob("*") if x.is_file())
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"bnnpan fetch + prepare on the default scene ({args.repeat} runs, "
          f"{'with' if args.track else 'without'} MLflow logging, {os.cpu_count()} cores)")
    print(f"{'step':<15}{'wall s (median)':>17}{'wall s (min)':>14}{'peak RSS MiB':>14}")
    for k, v in rows.items():
        ws = [x[0] for x in v]
        print(f"{k:<15}{statistics.median(ws):>17.2f}{min(ws):>14.2f}{max(x[1] for x in v):>14.0f}")
    print(f"prepared data on disk: {size / 2**20:.1f} MiB")
    tot = statistics.median(x[0] for x in rows["fetch+prepare"])
    peak = max(x[1] for x in rows["fetch+prepare"])
    ok = tot < 20 and peak < 2048
    print(f"target (< 20 s, < 2048 MiB): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
