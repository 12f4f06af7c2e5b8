"""The run environment, recorded beside every result: why the same seed can give other numbers.

Seeding makes a run repeatable **on one machine with one setting**, not everywhere. Float addition
is not associative, and the order of a reduction (a convolution's sum over channels and taps, a
gradient's sum over a batch) depends on the CPU (its vector width, and the kernels oneDNN / MKL pick
for its instruction set), on the library versions, and on how the work is split between torch's
intra-op threads. The same seed on two CPUs, or with two thread counts, gives weights that differ in
the last bits after one step and validation PSNRs up to 0.5 dB apart after a training run (README,
"Results"). So bnnpan states the conditions instead of assuming them:

* the intra-op thread count is a setting (``threads`` in ``params.yaml``, resolved by
  :func:`resolve_threads`), applied by ``train``, ``pretrain-prior`` and ``evaluate``
  (:func:`apply_threads`) and part of the training resume digest;
* :func:`run_environment` gathers what else decides the float results -- CPU model, torch / NumPy /
  Python versions, platform, the threads actually used, the device -- and ``evaluate`` writes it into
  every ``metrics.json`` (the top-level ``environment`` block), while ``train``, ``pretrain-prior`` and
  ``evaluate`` log it to their MLflow runs (:func:`bnnpan.tracking.log_environment`).

Two results can be expected to agree bit for bit only when their ``environment`` blocks are equal. The
block holds nothing that changes between two runs on one machine (no time, host name or process id), so
a re-run leaves the tracked ``metrics.json`` byte-identical. NumPy (the indices, the classical methods)
does not use torch's threads: its reductions are sequential, and its few BLAS calls (least squares,
matrix products) follow the BLAS library's own thread setting, which ``threads`` does not change.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

THREADS_ENV = "BNNPAN_THREADS"  # used when params' `threads` is null (e.g. bench/lr_select.py's parallel jobs)
THREAD_SOURCES = ("params", THREADS_ENV, "cpu_count")


def resolve_threads(setting: int | None) -> tuple[int, str]:
    """The intra-op thread count a stage uses, and where it comes from.

    ``setting`` (params' ``threads``) wins when given; when it is null, ``$BNNPAN_THREADS`` if set to a
    positive integer (``0`` or empty: unset), else every CPU (``os.cpu_count()``) -- the behaviour of
    ``train`` before the setting existed. Returns ``(n, source)``, ``source`` one of
    :data:`THREAD_SOURCES`.

    Raises
    ------
    ValueError
        When ``setting`` is not a positive integer, or ``$BNNPAN_THREADS`` is set to something else than
        a non-negative integer.
    """
    if setting is not None:
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ValueError(f"threads must be a positive integer or null, got {setting!r}")
        return setting, "params"
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = -1
        if n < 0:
            raise ValueError(f"${THREADS_ENV}={env!r}: expected a positive integer (0 or unset: every CPU)")
        if n > 0:
            return n, THREADS_ENV
    return os.cpu_count() or 1, "cpu_count"


def apply_threads(setting: int | None) -> tuple[int, str]:
    """Set torch's intra-op thread count from ``setting`` (:func:`resolve_threads`); return ``(n, source)``."""
    import torch

    n, source = resolve_threads(setting)
    torch.set_num_threads(n)
    return n, source


def cpu_model() -> str:
    """The CPU's model name: ``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5, check=True).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or "unknown"


def run_environment(device: Any = "cpu", threads_source: str | None = None) -> dict[str, Any]:
    """What decides a run's float results on this machine: a flat JSON-able dict, the same on every call.

    Keys, in this order: ``cpu`` (model name), ``cpu_count`` (logical CPUs), ``threads`` (torch's intra-op
    thread count **now**: call it after :func:`apply_threads`), ``threads_source`` (how the setting was
    resolved, see :func:`resolve_threads`; None when not given), ``device`` (the torch device the
    computation ran on: ``cpu``, ``cuda:0``, ...), ``gpu`` (that CUDA device's name; None on the CPU),
    ``torch``, ``cuda`` (torch's CUDA build; None for a CPU build), ``numpy``, ``python``, ``platform``
    (``platform.platform()``: OS, kernel, libc) and ``machine`` (the architecture).
    """
    import numpy as np
    import torch

    dev = torch.device(str(device))
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" and torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "threads_source": threads_source,
        "device": str(dev),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
