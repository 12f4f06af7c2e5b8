"""Benchmark: wall time of the quality indices on one 256 x 256 x 8 tile.

Builds a realistic 8-band WorldView-2-like tile from the real 4-band tile of
``../shared/data/worldview2-spacenet6`` (bands duplicated with small per-band gains and noise;
random data if the folder is absent), degrades it by Wald's protocol (ratio 4), takes
``fused = lms + noise``, and times every index and the full suite
(``reduced_resolution`` + ``full_resolution``): median of ``--repeat`` runs (default 5).
Target: the suite under 1 s on the 2-core reference machine.

    python bench/metrics.py [--repeat 5] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bnnpan.data import wald  # noqa: E402
from bnnpan.eval import metrics_fr, metrics_rr  # noqa: E402
from bnnpan.sensors import get_sensor  # noqa: E402

TARGET_S = 1.0
SIZE = 256


def build_tile(data: Path, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], str]:
    """gt (8 x 256 x 256), lms, fused and pan in DN; and where the data came from."""
    src = data / "worldview2-spacenet6"
    if (src / "ms1.tif").is_file() and (src / "pan1.tif").is_file():
        import rasterio

        with rasterio.open(src / "ms1.tif") as ds:
            ms4 = ds.read().astype(np.float64)[:, ::2, ::2]  # native 150 x 150
        with rasterio.open(src / "pan1.tif") as ds:
            pan = ds.read(1).astype(np.float64)[:SIZE, :SIZE]
        ms4 = wald.interp23(ms4, 4)[:, :SIZE, :SIZE]  # a 4-band image on a 256 x 256 grid
        origin = f"real WorldView-2 tile ({src})"
    else:
        ms4 = rng.uniform(100.0, 1800.0, (4, SIZE, SIZE))
        pan = rng.uniform(100.0, 1800.0, (SIZE, SIZE))
        origin = f"random data ({src} not found)"
    extra = ms4 * rng.uniform(0.9, 1.1, (4, 1, 1)) + rng.normal(0.0, 5.0, ms4.shape)
    gt = np.clip(np.concatenate([ms4, extra]), 1.0, 2047.0)
    gains = get_sensor("worldview2").ms_gains
    lms = wald.interp23(wald.degrade_ms(gt, gains, 4), 4)
    fused = lms + rng.normal(0.0, 10.0, lms.shape)
    return {"gt": gt, "lms": lms, "fused": fused, "pan": pan}, origin


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    default_data = os.environ.get("BNNPAN_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=Path(default_data))
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    t, origin = build_tile(args.data, rng)
    gt, lms, fused, pan = t["gt"], t["lms"], t["fused"], t["pan"]
    sensor = get_sensor("worldview2")
    ratio, peak, gains = sensor.ratio, sensor.scale, sensor.ms_gains
    g_cut, f_cut = metrics_rr.cut_border(gt), metrics_rr.cut_border(fused)

    def suite() -> tuple[dict[str, float], dict[str, float]]:
        return (metrics_rr.reduced_resolution(gt, fused, ratio, peak),
                metrics_fr.full_resolution(fused, pan, lms, gains, ratio))

    rows: list[tuple[str, Callable[[], object]]] = [
        ("psnr (cut tile)", lambda: metrics_rr.psnr(g_cut, f_cut, peak)),
        ("sam", lambda: metrics_rr.sam(g_cut, f_cut)),
        ("ergas", lambda: metrics_rr.ergas(g_cut, f_cut, ratio)),
        ("q2n", lambda: metrics_rr.q2n(g_cut, f_cut)),
        ("scc", lambda: metrics_rr.scc(g_cut, f_cut)),
        ("q_index", lambda: metrics_rr.q_index(g_cut, f_cut)),
        ("reduced_resolution", lambda: metrics_rr.reduced_resolution(gt, fused, ratio, peak)),
        ("d_lambda_khan", lambda: metrics_fr.d_lambda_khan(fused, lms, gains, ratio)),
        ("d_s", lambda: metrics_fr.d_s(fused, pan, lms, ratio)),
        ("d_lambda_qnr", lambda: metrics_fr.d_lambda_qnr(fused, lms)),
        ("full_resolution", lambda: metrics_fr.full_resolution(fused, pan, lms, gains, ratio)),
        ("TOTAL reduced + full", suite),
    ]
    suite()  # warm-up (imports, kernel caches)
    print(f"tile: {gt.shape[0]} x {SIZE} x {SIZE}, {origin}; {os.cpu_count()} CPUs; "
          f"median of {args.repeat} runs")
    print(f"{'function':<24}{'median s':>10}")
    results = {}
    for name, fn in rows:
        results[name] = median_time(fn, args.repeat)
        print(f"{name:<24}{results[name]:>10.4f}")
    rr, fr = suite()
    print("values: " + ", ".join(f"{k}={v:.4f}" for k, v in {**rr, **fr}.items()))
    total = results["TOTAL reduced + full"]
    verdict = "PASS" if total < TARGET_S else "FAIL"
    print(f"verdict: {verdict}: reduced + full resolution suite {total:.3f} s per 256x256x8 tile "
          f"(target < {TARGET_S:.1f} s)")


if __name__ == "__main__":
    main()
