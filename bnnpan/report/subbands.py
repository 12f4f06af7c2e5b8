"""Sub-band analysis of the error: does binarization lose the detail bands relatively more than fp?

The one-level Haar sub-bands are named as in :mod:`bnnpan.models.wavelet`: LH = pywt's cH (low-pass
along the width, high-pass along the height), HL = cV, HH = cD. The methods compared are those of
:data:`bnnpan.report.SUBBAND_METHODS` (full precision, its plain-BNN twin, the proposed network).
The markdown section is :func:`bnnpan.report.tables.subband_section`, the figure
:func:`bnnpan.report.figures.subband_figure`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pywt

from bnnpan.report import FP_METHOD, SUBBAND_METHODS
from bnnpan.report.load import n_test_tiles, read_fused, read_tile, setup

SUBBANDS = ("LL", "LH", "HL", "HH")
DETAIL_BANDS = ("LH", "HL", "HH")


def subband_error_energy(gt: np.ndarray, fused: np.ndarray, cut: int = 0) -> dict[str, float]:
    """Energy per pixel of the error ``fused - gt`` in each one-level Haar sub-band, summed over bands.

    Why: the paper's premise is that binarization loses the detail bands (LH, HL, HH: edges and
    texture) relatively more than the smooth LL band; splitting the error of a full-precision net
    and of its binary twin by sub-band tests that directly.

    What, exactly: with ``gt`` and ``fused`` both ``C x H x W``, the error ``e = fused - gt`` is
    cropped by ``cut`` pixels on every side, then by one more row (column) at the bottom (right)
    when the remaining height (width) is odd, to ``C x H' x W'`` with ``H'``, ``W'`` even. Each band
    ``e_c`` is decomposed by ``pywt.dwt2(e_c, "haar", mode="periodization")`` (orthonormal Haar,
    no padding) into ``LL, (LH, HL, HH)``, each ``H'/2 x W'/2``, and for every sub-band ``s``::

        E_s = (1 / (H' W')) * sum_c sum_ij s_c[i, j]^2
            = (1/4) * sum_c mean_ij s_c[i, j]^2    (the mean squared coefficient, / 4 sub-bands)

    in DN^2 when the inputs are in DN. The transform is orthonormal, so by Parseval
    ``E_LL + E_LH + E_HL + E_HH = (1 / (H' W')) * sum_c sum_ij e_c[i, j]^2 = sum_c MSE_c``: the total
    error energy per pixel (the per-band MSE summed over bands) is split without loss between the
    four sub-bands. A constant offset lands entirely in LL; a +1/-1 checkerboard entirely in HH;
    rows alternating +1/-1 (high-pass along the height, constant along the width) in LH.

    Returns ``{"LL": E_LL, "LH": E_LH, "HL": E_HL, "HH": E_HH}``. Raises :class:`ValueError` for
    shapes that are not the same ``C x H x W``, a negative ``cut`` or a crop smaller than 2 x 2.
    """
    g = np.asarray(gt, dtype=np.float64)
    f = np.asarray(fused, dtype=np.float64)
    if g.ndim != 3 or g.shape != f.shape:
        raise ValueError(f"gt and fused must both be C x H x W of the same shape, got {g.shape} and {f.shape}")
    cut = int(cut)
    if cut < 0:
        raise ValueError(f"border cut must be >= 0, got {cut}")
    _, h, w = g.shape
    h2, w2 = (h - 2 * cut) // 2 * 2, (w - 2 * cut) // 2 * 2
    if h2 < 2 or w2 < 2:
        raise ValueError(f"a border cut of {cut} px leaves less than 2 x 2 pixels of a {h} x {w} tile")
    err = (f - g)[:, cut : cut + h2, cut : cut + w2]
    ll, (lh, hl, hh) = pywt.dwt2(err, "haar", mode="periodization", axes=(-2, -1))
    n = float(h2 * w2)
    return {name: float(np.sum(c * c)) / n for name, c in zip(SUBBANDS, (ll, lh, hl, hh), strict=True)}


@dataclass
class Subbands:
    """Sub-band error energies of the methods in SUBBAND_METHODS, averaged over the same test tiles."""

    methods: list[str]
    energy: dict[str, dict[str, float]]  # method -> sub-band -> mean E_s over the tiles (DN^2 per pixel)
    n_tiles: int
    cut: int


def load_subbands(
    reports_dir: Path, prepared_dir: Path, dataset: str, methods: list[str], results: dict[str, dict[str, Any]],
    folders: dict[str, str] | None = None,
) -> Subbands | None:
    """Average :func:`subband_error_energy` over the reduced-resolution test tiles for fp/bnn/bnnpan.

    A method takes part when it was evaluated and has at least one ``fused/rr_NNN.tif`` of a tile
    of ``test_rr.h5``; the average runs over the tiles that every taking-part method has, so the
    methods are compared on the same tiles. None when no method takes part. ``folders[m]`` is the run
    folder the fused tiles of ``m`` are read from (its first seed's run); ``m`` itself when absent.
    """
    candidates = [m for m in methods if m in SUBBAND_METHODS]
    if not candidates:
        return None
    h5_path = prepared_dir / dataset / "test_rr.h5"
    n = n_test_tiles(h5_path)

    def rr(m: str, i: int) -> Path:
        return reports_dir / dataset / (folders or {}).get(m, m) / "fused" / f"rr_{i:03d}.tif"

    have = {m: {i for i in range(n) if rr(m, i).is_file()} for m in candidates}
    used = [m for m in candidates if have[m]]
    if not used:
        return None
    common = sorted(set.intersection(*(have[m] for m in used)))
    if not common:
        raise ValueError(f"{dataset}: the methods {used} have no reduced-resolution fused tile in common "
                         f"(re-run `bnnpan evaluate`)")
    info = setup(results[FP_METHOD if FP_METHOD in used else used[0]])
    cut = int(info.get("border_cut") or 0)
    total = {m: dict.fromkeys(SUBBANDS, 0.0) for m in used}
    for i in common:
        gt, _, _ = read_tile(h5_path, i)
        for m in used:
            e = subband_error_energy(gt, read_fused(rr(m, i), gt.shape), cut)
            for s in SUBBANDS:
                total[m][s] += e[s]
    energy = {m: {s: v / len(common) for s, v in t.items()} for m, t in total.items()}
    return Subbands(used, energy, len(common), cut)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def ratios_to_fp(sb: Subbands, m: str) -> dict[str, float | None]:
    """``E_s(m) / E_s(fp)`` per sub-band, plus "total" and "detail" (the mean of the LH/HL/HH ratios)."""
    e, ref = sb.energy[m], sb.energy[FP_METHOD]
    out: dict[str, float | None] = {s: _ratio(e[s], ref[s]) for s in SUBBANDS}
    out["total"] = _ratio(sum(e.values()), sum(ref.values()))
    detail = [out[s] for s in DETAIL_BANDS]
    out["detail"] = None if any(r is None for r in detail) else float(np.mean(detail))
    return out
