"""Run a stage list on this machine without Snakemake: the executor of ``bnnpan run --params <profile>``.

A profile (``profiles/<name>/params.yaml``) is not the DAG DVC and Snakemake read, so its stages run here,
directly. They used to run one after the other; most of a profile's stages are short evaluate jobs whose
time is the start-up of a Python process (torch, MLflow), so running independent stages side by side on the
machine's cores saves much of a profile's time. This module does what Snakemake's local executor does for
``make run``, and nothing more:

* a stage waits for every stage that writes one of its inputs (a path equal to, under, or above an output);
* among the stages ready to start, the highest :attr:`Stage.priority` first, then the list's order;
* the running stages' threads (:attr:`Stage.threads`, None: all of them) fit in ``cores``, and at most
  ``limits[r]`` of resource ``r`` is held at once (the ``resources`` of a Snakemake profile), as Snakemake
  schedules ``make run``;
* each stage's output goes to ``<log_dir>/<stage>.log``; a failed stage stops new ones from starting, lets
  the running ones finish (their outputs are written atomically, so nothing half-done is left) and raises
  :class:`StageFailed` with the end of its log.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bnnpan.pipeline.stages import Stage

LOG_TAIL = 3000  # characters of a failed stage's log shown in the error


class StageFailed(RuntimeError):
    """A stage exited with a non-zero status."""

    def __init__(self, stage: str, returncode: int, log: Path) -> None:
        text = log.read_text(errors="replace") if log.is_file() else ""
        super().__init__(f"stage {stage} failed with exit status {returncode} (log: {log})\n{text[-LOG_TAIL:]}")
        self.stage, self.returncode, self.log = stage, returncode, log


def _outputs(s: Stage) -> tuple[str, ...]:
    return (*s.outs, *s.metrics, *s.plots)


def _overlaps(a: str, b: str) -> bool:
    """True when paths ``a`` and ``b`` are the same, or one is a directory holding the other."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def dependencies(stages: Sequence[Stage]) -> dict[str, set[str]]:
    """``{stage: names of the earlier stages it reads an output of}`` (the list is in execution order)."""
    deps: dict[str, set[str]] = {}
    for i, s in enumerate(stages):
        deps[s.name] = {t.name for t in stages[:i] if any(_overlaps(d, o) for d in s.deps for o in _outputs(t))}
    return deps


@dataclass
class _Job:
    stage: Stage
    proc: subprocess.Popen
    log: Path
    started: float


def run_stages(stages: Sequence[Stage], command: Callable[[Stage], list[str]], *, cores: int = 1,
               limits: Mapping[str, int] | None = None, env: Mapping[str, str] | None = None,
               log_dir: Path = Path("logs"), echo: Callable[[str], None] = print, poll: float = 0.2) -> None:
    """Run ``stages`` (in a valid execution order) on ``cores`` cores; see the module docstring.

    ``command(stage)`` is the command line of a stage. A stage asking for more of a resource than its limit
    would never start: that is a :class:`ValueError` before anything runs.
    """
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    limits = dict(limits or {})
    for s in stages:
        for r, n in s.resources.items():
            if r in limits and n > limits[r]:
                raise ValueError(f"stage {s.name} needs {r}={n}, more than the limit {r}={limits[r]}")
    deps = dependencies(stages)
    pending = list(stages)
    done: set[str] = set()
    running: list[_Job] = []
    failure: StageFailed | None = None
    log_dir.mkdir(parents=True, exist_ok=True)

    def cost(s: Stage) -> int:
        return min(s.threads or cores, cores)

    def fits(s: Stage) -> bool:
        if sum(cost(j.stage) for j in running) + cost(s) > cores:
            return False
        for r, n in s.resources.items():
            used = sum(j.stage.resources.get(r, 0) for j in running)
            if r in limits and used + n > limits[r]:
                return False
        return True

    try:
        while pending or running:
            while failure is None:
                ready = max((s for s in pending if deps[s.name] <= done and fits(s)), key=lambda s: s.priority,
                            default=None)  # the first of the highest priority (max keeps the first of ties)
                if ready is None:
                    break
                pending.remove(ready)
                log = log_dir / f"{ready.name}.log"
                cmd = command(ready)
                echo(f"start  {ready.name}: {' '.join(cmd)}")
                with log.open("w") as fh:
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
                running.append(_Job(ready, proc, log, time.perf_counter()))
            if not running:
                if failure is None and pending:  # cannot happen for a list in execution order
                    raise ValueError(f"stages {[s.name for s in pending]} wait for stages that never run")
                break
            time.sleep(poll)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                took = time.perf_counter() - job.started
                if job.proc.returncode:
                    echo(f"FAILED {job.stage.name} ({took:.0f} s, exit {job.proc.returncode}; log {job.log})")
                    failure = failure or StageFailed(job.stage.name, job.proc.returncode, job.log)
                else:
                    echo(f"done   {job.stage.name} ({took:.0f} s; {len(done) + 1}/{len(stages)})")
                    done.add(job.stage.name)
            if failure is not None:
                pending.clear()
    except BaseException:
        for job in running:  # interrupted (Ctrl-C): stop the children too; their outputs are atomic
            job.proc.terminate()
        for job in running:
            job.proc.wait()
        raise
    if failure is not None:
        raise failure
