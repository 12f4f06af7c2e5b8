"""The metrics.json layout that ``bnnpan evaluate`` writes, built from flat per-index values (report tests)."""

from __future__ import annotations

from typing import Any

RR = ("psnr", "sam", "ergas", "q2n", "scc", "q")
FR = ("d_lambda", "d_s", "hqnr", "qnr")


def nested(flat: dict[str, Any], setup: dict[str, Any], n_tiles: tuple[int, int],
           cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"indices": {"rr": ..., "fr": ...}, ["network_cost": cost,] "setup": {"n_tiles": ..., **setup}}``.

    ``flat`` maps an index name to ``{"mean", "std"}``; indices it lacks are left out.
    """
    out: dict[str, Any] = {"indices": {"rr": {k: flat[k] for k in RR if k in flat},
                                       "fr": {k: flat[k] for k in FR if k in flat}}}
    if cost is not None:
        out["network_cost"] = cost
    out["setup"] = {"n_tiles": {"rr": n_tiles[0], "fr": n_tiles[1]}, **setup}
    return out
