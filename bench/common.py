"""Shared helpers of the benchmarks: the prepared dataset the training ones run on, and measuring a command
(wall time and peak RSS of a child process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a measured command: this checkout's ``bnnpan`` first on the path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def measure_run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one child process running ``cmd``.

    A small wrapper process runs ``cmd`` and reads its children's ``ru_maxrss``, so the peak is the
    command's own (imports included), not this script's. A failure exits with the command's stderr.
    """
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
    *lines, last = out.stdout.rstrip("\n").split("\n")
    dt, rss = last.split()
    return float(dt), float(rss), "\n".join(lines)


def measure(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    dt, rss, _ = measure_run(cmd, cwd, env)
    return dt, rss


def prepared_params(p, dataset: str, work: Path):
    """``p`` with ``paths.prepared`` pointing at a prepared ``dataset``.

    Uses ``<paths.prepared>/<dataset>`` when it is there; otherwise prepares it into ``work``, from
    ``<paths.raw>`` when the fetched scenes are there, else fetching them (verified downloads) first
    (an imported PanCollection dataset: its files, imported into ``work``).
    """
    from bnnpan.config import PanCollectionDataset
    from bnnpan.data.prepare import prepare_dataset

    if (Path(p.paths.prepared) / dataset / "train.h5").is_file():
        return p
    raw = Path(p.paths.raw)
    # an imported dataset (source: pancollection) has no scenes: its files are imported as they are
    scenes = [] if isinstance(p.datasets[dataset], PanCollectionDataset) else p.datasets[dataset].scenes
    if not all((raw / s / "scene.json").is_file() for s in scenes):
        from bnnpan.data.download import FetchContext
        from bnnpan.data.sources import fetch_scene

        raw = work / "raw"
        for s in scenes:
            fetch_scene(s, p.scenes[s], FetchContext(downloads=work / "dl", progress=False), raw / s)
    p = p.model_copy(update={"paths": p.paths.model_copy(update={
        "raw": str(raw), "prepared": str(work / "prepared"), "downloads": str(work / "dl")})})
    prepare_dataset(p, dataset)
    return p
