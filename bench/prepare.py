"""Benchmark: wall time and peak memory of ``fetch`` + ``prepare``.

Each measured command runs in a fresh child process (``python -m bnnpan.cli ...``, this checkout's
code), so its peak RSS is that command's own, imports included; everything happens in a temporary
directory.

Default: fetch + prepare on the default scene (``--params``), ``--repeat`` runs, one table.
Target (issue 2): fetch + prepare under 20 s and under 2 GB on the 2-core reference machine.

``--sizes 2048 4096 8192``: ``prepare`` on scenes of those PAN sides, built by mirror-tiling the real
WorldView-2 tile 1 of ``../shared/data/worldview2-spacenet6/`` (600 x 600 PAN, native 150 x 150 MS,
no nodata; ``--data`` to point elsewhere) and written as a ``geotiff`` scene source (PAN at 0.5 m, MS
at 2 m, ratio 4); one dataset, role ``all``, stride ``--stride`` (16). ``--bands 8`` (default) gives
the MS 8 bands, the 4 real ones (blue, green, red, NIR1) each used twice, as the WorldView-2 8-band
product the memory figures of issue 11 were measured on; ``--bands 4`` keeps the real 4. Prints wall
time, peak RSS and the number of training patches per size, then the peak-RSS growth between the two
largest sizes. Target (issue 11): growth below 20 % from 4k to 8k and below 2 GB at 8k.

    python bench/prepare.py [--params params.yaml] [--repeat 3] [--track]
    python bench/prepare.py --sizes 2048 4096 8192 [--bands 8] [--stride 16] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import REPO, child_env, measure

sys.path.insert(0, str(REPO))  # this checkout's bnnpan, here as in the measured children
CLI = [sys.executable, "-m", "bnnpan.cli"]


def default_scene(args: argparse.Namespace) -> None:
    track = [] if args.track else ["--no-track"]
    rows: dict[str, list[tuple[float, float]]] = {"fetch": [], "prepare": [], "fetch+prepare": []}
    for _ in range(args.repeat):
        work = Path(tempfile.mkdtemp(prefix="bnnpan-bench-"))
        try:
            shutil.copy(args.params, work / "params.yaml")
            env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
            f = measure([*CLI, "fetch", *track], work, env)
            p = measure([*CLI, "prepare", *track], work, env)
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


def tiled_scene(src: Path, side: int, n_bands: int, out: Path) -> dict[str, object]:
    """Write ``pan.tif`` (side x side) and ``ms.tif`` (n_bands x side/4 x side/4) mirror-tiled from WV2 tile 1.

    The PAN and the native MS (``ms1.tif`` stored nearest-upsampled x2: ``[:, ::2, ::2]``) are extended
    by symmetric mirroring (``numpy.pad(mode='symmetric')``), which keeps them co-registered: MS pixel
    ``j`` still covers PAN pixels ``4j .. 4j + 3``. Returns the ``scenes.<name>`` entry of the params.
    """
    import numpy as np
    import rasterio
    from affine import Affine

    if side % 4:
        sys.exit(f"--sizes: {side} is not a multiple of the WorldView-2 ratio 4")
    with rasterio.open(src / "pan1.tif") as ds:
        pan, crs, t = ds.read(1), ds.crs, ds.transform
    with rasterio.open(src / "ms1.tif") as ds:
        ms = ds.read()[:, ::2, ::2]
    ms = np.concatenate([ms, ms])[:n_bands] if n_bands == 8 else ms
    h = side // 4
    pan = np.pad(pan, ((0, side - pan.shape[0]), (0, side - pan.shape[1])), mode="symmetric")
    ms = np.pad(ms, ((0, 0), (0, h - ms.shape[1]), (0, h - ms.shape[2])), mode="symmetric")
    ms = ms.astype(np.uint16) if np.array_equal(ms, np.round(ms)) and ms.min() >= 0 and ms.max() < 65536 else ms
    out.mkdir(parents=True, exist_ok=True)
    common = dict(driver="GTiff", crs=crs, compress="deflate", tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(out / "pan.tif", "w", width=side, height=side, count=1, dtype=pan.dtype.name,
                       transform=Affine(0.5, 0, t.c, 0, -0.5, t.f), **common) as ds:
        ds.write(pan, 1)
    with rasterio.open(out / "ms.tif", "w", width=h, height=h, count=n_bands, dtype=ms.dtype.name,
                       transform=Affine(2.0, 0, t.c, 0, -2.0, t.f), **common) as ds:
        ds.write(ms)
    from bnnpan.sensors import get_sensor

    bands = ["blue", "green", "red", "nir1"] if n_bands == 4 else list(get_sensor("worldview2").bands)
    return {"source": "geotiff", "sensor": "worldview2", "bands": bands, "pan": str(out / "pan.tif"),
            "ms": str(out / "ms.tif"), "licence": "CC BY-SA 4.0", "attribution": "SpaceNet 6, Maxar"}


def sizes(args: argparse.Namespace) -> None:
    import h5py

    rows = []
    for side in args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"bnnpan-bench-prep{side}-"))
        try:
            scene = tiled_scene(Path(args.data), side, args.bands, work / "src")
            params = {"scenes": {"wv2_tiled": scene},
                      "datasets": {"wv2_tiled": {"scenes": ["wv2_tiled"], "stride": args.stride}}}
            (work / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
            env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
            measure([*CLI, "fetch", "--no-track"], work, env)
            runs = [measure([*CLI, "prepare", "--no-track"], work, env) for _ in range(args.repeat)]
            with h5py.File(work / "data/prepared/wv2_tiled/train.h5") as f:
                n = len(f["gt"])
            size = sum(x.stat().st_size for x in (work / "data/prepared").rglob("*") if x.is_file())
            rows.append((side, statistics.median(r[0] for r in runs), max(r[1] for r in runs), n, size))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"bnnpan prepare on mirror-tiled WorldView-2 ({args.bands} MS bands"
          f"{', the 4 real ones twice' if args.bands == 8 else ''}), stride {args.stride}, "
          f"{args.repeat} run(s) per size, {os.cpu_count()} cores")
    print(f"{'PAN side':>9}{'wall s':>9}{'peak RSS MiB':>14}{'train patches':>15}{'prepared MiB':>14}")
    for side, wall, rss, n, size in rows:
        print(f"{side:>9}{wall:>9.1f}{rss:>14.0f}{n:>15}{size / 2**20:>14.0f}")
    if len(rows) >= 2:
        (s0, _, r0, _, _), (s1, _, r1, _, _) = rows[-2], rows[-1]
        growth = r1 / r0 - 1
        ok = growth < 0.20 and r1 < 2048
        print(f"peak RSS {s0} -> {s1}: {growth:+.1%} (target < +20 % and < 2048 MiB at the largest): "
              f"{'met' if ok else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--repeat", type=int, default=None, help="runs per measurement (default 3; 1 with --sizes)")
    ap.add_argument("--track", action="store_true", help="include MLflow logging (SQLite store) in the timing")
    ap.add_argument("--sizes", type=int, nargs="+", help="PAN sides of mirror-tiled WorldView-2 scenes")
    ap.add_argument("--bands", type=int, choices=(4, 8), default=8)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "worldview2-spacenet6"),
                    help="folder with pan1.tif and ms1.tif")
    args = ap.parse_args()
    if args.sizes:
        args.repeat = args.repeat or 1
        sizes(args)
    else:
        args.repeat = args.repeat or 3
        default_scene(args)


if __name__ == "__main__":
    main()
