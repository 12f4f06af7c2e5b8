"""The metrics.json layout that ``bnnpan evaluate`` writes, built from flat per-index values (report tests).

tests/test_evaluate.py checks that a real metrics.json equals what :func:`nested` builds from its parts, so the
report tests' inputs keep the layout evaluate writes.
"""

from __future__ import annotations

from typing import Any

RR = ("psnr", "sam", "ergas", "q2n", "scc", "q")
FR = ("d_lambda", "d_s", "hqnr", "qnr")  # the toolbox's, on every dataset
FR_MTF = ("d_s_mtf", "hqnr_mtf")  # our MTF variant of D_s: only on datasets with pan_degradation: mtf


def nested(flat: dict[str, Any], setup: dict[str, Any], n_tiles: tuple[int, int],
           cost: dict[str, Any] | None = None, environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"indices": {"rr": ..., "fr": ...}, ["network_cost": cost,] "setup": {"n_tiles": ..., **setup}
    [, "run_environment": environment]}``.

    ``flat`` maps an index name to ``{"mean", "std"}``; indices it lacks are left out (``d_s_mtf`` and
    ``hqnr_mtf`` come after the four full-resolution indices when present).
    """
    out: dict[str, Any] = {"indices": {"rr": {k: flat[k] for k in RR if k in flat},
                                       "fr": {k: flat[k] for k in FR + FR_MTF if k in flat}}}
    if cost is not None:
        out["network_cost"] = cost
    out["setup"] = {"n_tiles": {"rr": n_tiles[0], "fr": n_tiles[1]}, **setup}
    if environment is not None:
        out["run_environment"] = environment
    return out
