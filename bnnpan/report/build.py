"""The report: one page that compares every evaluated method on every dataset.

What it shows, and why:

* ``reports/summary.md``: per dataset, a table methods x indices with mean ± std over the
  test tiles and the best value of each column in bold. The reduced-resolution indices
  (PSNR, SAM, ERGAS, Q2n, SCC, Q) follow Wald's protocol: the original MS is the ground
  truth of a fusion of degraded inputs, so they measure fidelity exactly but at a scale that
  is not the one of use. The full-resolution indices (D_λ, D_s, HQNR, QNR) need no
  reference and are computed on the original scale, but they can rank methods wrongly (the
  plain interpolated MS, EXP, often gets an excellent D_λ because it injects no detail), so
  the page says to read both families together. The conventions that change the numbers
  (DN scale, PSNR peak, border cut, block size) are stated per dataset, with the tile counts
  and the licence and attribution of every scene the test tiles come from.
* ``reports/metrics.csv``: the same numbers, one row per (dataset, method), for other tools.
* ``reports/figures/<dataset>_metrics.png``: one bar chart per index (error bars = std), so
  the size of the differences is seen against the spread over tiles.
* ``reports/figures/<dataset>_visual.png``: one reduced-resolution test tile, ground truth
  and every method side by side with the same colour stretch (the GT's 2-98 percentiles),
  and below them the PAN and each method's absolute error on one shared colour scale, so
  the numbers in the table can be checked by eye (blur, colour shifts, artefacts).
* Under each results table, the best *binary* method on Q2n and on ERGAS (networks other than
  ``fp`` and the ``bnnpan_*`` ablations), since the bold marks are usually won by ``fp``.
* ``reports/figures/<dataset>_subbands.png`` and a "Sub-band error energy" table, when any of
  ``fp``, ``bnn``, ``bnnpan`` has fused tiles: the error of each is split by a one-level Haar
  DWT into LL/LH/HL/HH (:func:`subband_error_energy`), to test the paper's premise that
  binarization degrades the detail bands relatively more than full precision does.
* An "Ablations" table when ``bnnpan`` and at least one ``bnnpan_*`` variant were evaluated:
  each variant's main indices and cost, and its change of Q2n and ERGAS against ``bnnpan``.

Inputs are what ``bnnpan evaluate`` writes (``reports/<D>/<M>/{metrics.json, tiles.csv,
fused/rr_NNN.tif}``) and what ``bnnpan prepare`` wrote (``data/prepared/<D>/{test_rr.h5,
manifest.json}``). Only the (dataset, method) pairs passed in appear: a stale method folder
left by an earlier configuration is ignored. Every file is written atomically.

The outputs are kept in git, so they hold nothing that changes from run to run on the same
inputs: no fusion times (``timing.json`` and MLflow have them), no dates, and PNGs saved without
the matplotlib version in their metadata. The same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd
import pywt
import rasterio  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from bnnpan.atomic import atomic_path  # noqa: E402
from bnnpan.data.hdf5io import h5_errors, open_h5  # noqa: E402
from bnnpan.report import SUBBAND_METHODS

# (key, label, higher_is_better), in table order.
METRICS: list[tuple[str, str, bool]] = [
    ("psnr", "PSNR dB", True),
    ("sam", "SAM °", False),
    ("ergas", "ERGAS", False),
    ("q2n", "Q2n", True),
    ("scc", "SCC", True),
    ("q", "Q", True),
    ("d_lambda", "D_λ", False),
    ("d_s", "D_s", False),
    ("hqnr", "HQNR", True),
    ("qnr", "QNR", True),
]
REDUCED_METRICS = ("psnr", "sam", "ergas", "q2n", "scc", "q")
FULL_METRICS = ("d_lambda", "d_s", "hqnr", "qnr")
# The groups of metrics.json (bnnpan.eval.evaluate writes them; not imported, so that this stage
# depends on this file alone): indices.rr / indices.fr, network_cost (networks only), setup.
INDICES, COST, SETUP = "indices", "network_cost", "setup"
PNG_METADATA = {"Software": None}  # no matplotlib version in the PNGs: same inputs, same bytes
DECIMALS = {"psnr": 2, "sam": 3, "ergas": 3}  # the Q-type indices (in [0, 1]): 4
DPI = 110
VISUAL_COLUMNS = 6  # panels per row of the visual comparison (GT + 5 methods)

# Sub-band analysis of the error: the one-level Haar sub-bands (named as in bnnpan.models.wavelet:
# LH = pywt's cH, low-pass along the width and high-pass along the height; HL = cV; HH = cD) and the
# methods it compares (full precision, its plain-BNN twin, the proposed network).
SUBBANDS = ("LL", "LH", "HL", "HH")
DETAIL_BANDS = ("LH", "HL", "HH")
FP_METHOD = "fp"
PROPOSED = "bnnpan"
ABLATION_PREFIX = "bnnpan_"
# What each standard ablation switch of bnnpan changes (a variant not listed here is named as is).
ABLATION_LEGEND = {
    "no_bwtc": "plain binary conv instead of the wavelet unit (BWTC)",
    "no_fpstats": "sub-band units without the full-precision mean/std re-centring and rescaling",
    "no_ldpc": "no latent prior (LDPC off)",
    "oracle_prior": "the latent from the stage-1 encoder E1, which sees the ground truth "
                    "(an upper bound; reduced resolution only, so its full-resolution cells are n/a)",
    "no_cdc": "no channel-wise distribution calibration (CDC off)",
}


def _decimals(key: str) -> int:
    return DECIMALS.get(key, 4)


def _arrow(up: bool) -> str:
    return "↑" if up else "↓"


# ----------------------------------------------------------------------------- inputs


def _num(v: Any) -> float | None:
    """A JSON number as float; None for null, a missing value or NaN (inf is kept)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _load_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: metrics file not found (run `bnnpan evaluate` for this dataset and method)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-run `bnnpan evaluate`") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object; re-run `bnnpan evaluate`")
    if not isinstance(data.get(INDICES), dict):
        raise ValueError(f"{path}: no `{INDICES}` group (a metrics file of an older layout); re-run `bnnpan evaluate`")
    return data


def _stat(m: dict[str, Any], key: str) -> tuple[float | None, float | None]:
    group = (m.get(INDICES) or {}).get("rr" if key in REDUCED_METRICS else "fr") or {}
    v = group.get(key)
    if not isinstance(v, dict):
        return None, None
    return _num(v.get("mean")), _num(v.get("std"))


def _setup(m: dict[str, Any]) -> dict[str, Any]:
    """The ``setup`` group of a metrics dictionary (conventions, kind, tile counts); {} when absent."""
    v = m.get(SETUP)
    return v if isinstance(v, dict) else {}


def _load_tiles(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    return pd.read_csv(path)


def _load_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: dataset manifest not found (run `bnnpan prepare`)")
    return json.loads(path.read_text())


def _decode_attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _read_tile(h5_path: Path, tile: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Ground truth (C x H x W), PAN (H x W) and attributes of reduced-resolution test tile ``tile``."""
    if not h5_path.is_file():
        raise ValueError(f"{h5_path}: test file not found (run `bnnpan prepare`)")
    with open_h5(h5_path) as f, h5_errors(h5_path, f"read test tile {tile}"):
        if "gt" not in f or "pan" not in f:
            raise ValueError(f"{h5_path}: needs datasets `gt` and `pan`, has {list(f)}")
        n = f["gt"].shape[0]
        if not 0 <= tile < n:
            raise ValueError(f"{h5_path}: tile {tile} out of range (the file has {n} tiles)")
        gt = np.asarray(f["gt"][tile], dtype=np.float64)
        pan = np.asarray(f["pan"][tile, 0], dtype=np.float64)
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
    return gt, pan, attrs


def _read_fused(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{path}: fused tile not found (run `bnnpan evaluate`)")
    with rasterio.open(path) as src:
        a = src.read().astype(np.float64)
    if a.shape != shape:
        raise ValueError(f"{path}: shape {a.shape} does not match the ground truth {shape}")
    return a


# ----------------------------------------------------------------------------- sub-band error


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
class _Subbands:
    """Sub-band error energies of the methods in SUBBAND_METHODS, averaged over the same test tiles."""

    methods: list[str]
    energy: dict[str, dict[str, float]]  # method -> sub-band -> mean E_s over the tiles (DN^2 per pixel)
    n_tiles: int
    cut: int


def _n_test_tiles(h5_path: Path) -> int:
    if not h5_path.is_file():
        raise ValueError(f"{h5_path}: test file not found (run `bnnpan prepare`)")
    with open_h5(h5_path) as f, h5_errors(h5_path, "read its tiles"):
        if "gt" not in f:
            raise ValueError(f"{h5_path}: needs dataset `gt`, has {list(f)}")
        return int(f["gt"].shape[0])


def _load_subbands(
    reports_dir: Path, prepared_dir: Path, dataset: str, methods: list[str], results: dict[str, dict[str, Any]]
) -> _Subbands | None:
    """Average :func:`subband_error_energy` over the reduced-resolution test tiles for fp/bnn/bnnpan.

    A method takes part when it was evaluated and has at least one ``fused/rr_NNN.tif`` of a tile
    of ``test_rr.h5``; the average runs over the tiles that every taking-part method has, so the
    methods are compared on the same tiles. None when no method takes part.
    """
    candidates = [m for m in methods if m in SUBBAND_METHODS]
    if not candidates:
        return None
    h5_path = prepared_dir / dataset / "test_rr.h5"
    n = _n_test_tiles(h5_path)

    def rr(m: str, i: int) -> Path:
        return reports_dir / dataset / m / "fused" / f"rr_{i:03d}.tif"

    have = {m: {i for i in range(n) if rr(m, i).is_file()} for m in candidates}
    used = [m for m in candidates if have[m]]
    if not used:
        return None
    common = sorted(set.intersection(*(have[m] for m in used)))
    if not common:
        raise ValueError(f"{dataset}: the methods {used} have no reduced-resolution fused tile in common "
                         f"(re-run `bnnpan evaluate`)")
    info = _setup(results[FP_METHOD if FP_METHOD in used else used[0]])
    cut = int(info.get("border_cut") or 0)
    total = {m: dict.fromkeys(SUBBANDS, 0.0) for m in used}
    for i in common:
        gt, _, _ = _read_tile(h5_path, i)
        for m in used:
            e = subband_error_energy(gt, _read_fused(rr(m, i), gt.shape), cut)
            for s in SUBBANDS:
                total[m][s] += e[s]
    energy = {m: {s: v / len(common) for s, v in t.items()} for m, t in total.items()}
    return _Subbands(used, energy, len(common), cut)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _ratios_to_fp(sb: _Subbands, m: str) -> dict[str, float | None]:
    """``E_s(m) / E_s(fp)`` per sub-band, plus "total" and "detail" (the mean of the LH/HL/HH ratios)."""
    e, ref = sb.energy[m], sb.energy[FP_METHOD]
    out: dict[str, float | None] = {s: _ratio(e[s], ref[s]) for s in SUBBANDS}
    out["total"] = _ratio(sum(e.values()), sum(ref.values()))
    detail = [out[s] for s in DETAIL_BANDS]
    out["detail"] = None if any(r is None for r in detail) else float(np.mean(detail))
    return out


def _premise(sb: _Subbands) -> str:
    """One sentence: does bnn lose the detail bands relatively more than fp on this data (computed)."""
    claim = ("The paper's premise (binarization degrades the detail bands LH/HL/HH relatively more than "
             "LL, against full precision)")
    if FP_METHOD not in sb.methods or "bnn" not in sb.methods:
        present = ", ".join(sb.methods)
        return f"{claim} cannot be tested on this data: it needs both fp and bnn (present: {present})."
    r = _ratios_to_fp(sb, "bnn")
    if r["detail"] is None or r["LL"] is None:
        return f"{claim} cannot be tested on this data: fp has a zero error energy in some sub-band."
    verdict = "holds" if r["detail"] > r["LL"] else "does not hold"
    text = (f"{claim} **{verdict}** on this data: the bnn / fp error-energy ratio is {r['detail']:.3f} on average "
            f"over LH/HL/HH against {r['LL']:.3f} on LL.")
    if PROPOSED in sb.methods:
        q = _ratios_to_fp(sb, PROPOSED)
        if q["detail"] is not None and q["LL"] is not None:
            text += f" For bnnpan / fp: {q['detail']:.3f} over LH/HL/HH against {q['LL']:.3f} on LL."
    return text


def _energy(v: float) -> str:
    """Whole DN² between 1000 and 10^7 (no exponent: easier to compare in a column), else 4 significant digits."""
    return f"{v:.0f}" if 1e3 <= abs(v) < 1e7 else f"{v:.4g}"


def _subband_section(dataset: str, sb: _Subbands) -> list[str]:
    lines = [
        "### Sub-band error energy",
        "",
        f"One-level orthonormal Haar DWT of the error (fused − GT) of each of the {sb.n_tiles} reduced-resolution "
        f"test tiles, after a {sb.cut} px border cut: energy per pixel in DN² summed over bands, mean over the "
        "tiles; by Parseval LL + LH + HL + HH = total, the per-band MSE summed over bands. The rows "
        "`<method> / fp` divide by full precision's energy in the same sub-band (> 1: that band loses more "
        "than fp).",
        "",
        "| Method | LL | LH | HL | HH | total |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    for m in sb.methods:
        e = sb.energy[m]
        cells = [_energy(e[s]) for s in SUBBANDS] + [_energy(sum(e.values()))]
        lines.append(f"| {_md(m)} | " + " | ".join(cells) + " |")
    if FP_METHOD in sb.methods:
        for m in sb.methods:
            if m == FP_METHOD:
                continue
            r = _ratios_to_fp(sb, m)
            cells = ["n/a" if r[k] is None else f"{r[k]:.3f}" for k in (*SUBBANDS, "total")]
            lines.append(f"| {_md(m)} / fp | " + " | ".join(cells) + " |")
    lines += ["", _premise(sb), "", f"![{dataset}: sub-band error energy](figures/{dataset}_subbands.png)", ""]
    return lines


# ----------------------------------------------------------------------------- writing


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def _save_fig(fig: plt.Figure, path: Path, max_pixels: float = 1.0e6) -> Path:
    """Save at DPI, lowered when needed so the PNG stays under ``max_pixels`` (image grids of many
    methods are large and compress badly: the report lives in git)."""
    w, h = fig.get_size_inches()
    dpi = min(DPI, (max_pixels / (w * h)) ** 0.5)
    try:
        return _atomic(path, lambda t: fig.savefig(t, format="png", dpi=dpi, metadata=PNG_METADATA))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- table


def _fmt(v: float | None, key: str) -> str:
    if v is None:
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{_decimals(key)}f}"


def _cell(mean: float | None, std: float | None, key: str) -> str:
    if mean is None:
        return "n/a"
    if std is None or not math.isfinite(mean):
        return _fmt(mean, key)
    return f"{_fmt(mean, key)} ± {_fmt(std, key)}"


def best_methods(means: dict[str, float | None], key: str, higher_is_better: bool) -> set[str]:
    """The methods whose mean is best for ``key`` at the displayed precision (ties: all of them)."""
    shown = {m: round(v, _decimals(key)) if math.isfinite(v) else v for m, v in means.items() if v is not None}
    if not shown:
        return set()
    target = max(shown.values()) if higher_is_better else min(shown.values())
    return {m for m, v in shown.items() if v == target}


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _cost_cells(cost: dict[str, Any] | None) -> list[str]:
    """Params = binary/32 + FP (thousands); OPs = BOPs/64 + FLOPs (millions) at 64² and 256² inputs."""
    if not cost:
        return ["—", "—", "—"]
    small, big, file = cost.get("64") or {}, cost.get("256") or {}, cost.get("file") or {}
    params = _num(big.get("params_equiv"))
    ops = [_num(c.get("ops")) for c in (small, big)]
    sizes = [_num(file.get(k)) for k in ("packed_bytes", "fp32_bytes")]
    return ["n/a" if params is None else f"{params / 1e3:.1f}",
            " / ".join("n/a" if v is None else f"{v / 1e6:.1f}" for v in ops),
            " / ".join("n/a" if v is None else f"{v / 1e3:.1f}" for v in sizes)]


def _table(methods: list[str], results: dict[str, dict[str, Any]]) -> list[str]:
    head = (["Method", "Kind"] + [f"{label} {_arrow(up)}" for _, label, up in METRICS]
            + ["Params (K eq.)", "OPs (M) 64² / 256²", "packed / FP32 file (kB)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---", ":---"] + ["---:"] * (len(head) - 2)) + "|"]
    best = {
        key: best_methods({m: _stat(results[m], key)[0] for m in methods}, key, up) for key, _, up in METRICS
    }
    for m in methods:
        r = results[m]
        cells = [_md(m), _md(_setup(r).get("kind", ""))]
        for key, _, _ in METRICS:
            c = _cell(*_stat(r, key), key)
            cells.append(f"**{c}**" if m in best[key] else c)
        cells += _cost_cells(r.get(COST))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def binary_methods(methods: list[str], results: dict[str, dict[str, Any]]) -> list[str]:
    """The binary networks, in order: ``info.kind == "network"``, not ``fp`` and not a ``bnnpan_*`` ablation."""
    return [m for m in methods if _setup(results[m]).get("kind") == "network"
            and m != FP_METHOD and not m.startswith(ABLATION_PREFIX)]


def _best_binary_line(methods: list[str], results: dict[str, dict[str, Any]]) -> str | None:
    """"Best binary method: Q2n X (0.xxxx), ERGAS Y (x.xxx)" (ties at the shown precision: all named)."""
    binary = binary_methods(methods, results)
    if not binary:
        return None
    parts = []
    for key, label, up in (("q2n", "Q2n", True), ("ergas", "ERGAS", False)):
        means = {m: _stat(results[m], key)[0] for m in binary}
        best = [m for m in binary if m in best_methods(means, key, up)]
        parts.append(f"{label} {' = '.join(map(_md, best))} ({_fmt(means[best[0]], key)})" if best else f"{label} n/a")
    return "Best binary method: " + ", ".join(parts) + "."


def _plain(mean: float | None, key: str) -> str:
    return "n/a" if mean is None else _fmt(mean, key)


def _delta(v: float | None, ref: float | None, key: str) -> str:
    if v is None or ref is None or not (math.isfinite(v) and math.isfinite(ref)):
        return "n/a"
    return f"{v - ref:+.{_decimals(key)}f}"


def _ablations(methods: list[str], results: dict[str, dict[str, Any]]) -> list[str]:
    """The "Ablations" section: bnnpan, then each ``bnnpan_*`` variant in evaluation order; [] without them."""
    variants = [m for m in methods if m.startswith(ABLATION_PREFIX)]
    if PROPOSED not in methods or not variants:
        return []
    cols = [("q2n", "Q2n", True), ("ergas", "ERGAS", False), ("sam", "SAM °", False), ("psnr", "PSNR dB", True),
            ("d_s", "D_s", False), ("hqnr", "HQNR", True)]
    head = ["Variant"] + [f"{label} {_arrow(up)}" for _, label, up in cols] + ["OPs (M) 256²", "ΔQ2n", "ΔERGAS"]
    ref = results[PROPOSED]
    legend = []
    for m in variants:
        switch = m[len(ABLATION_PREFIX):]
        what = ABLATION_LEGEND.get(switch, "a user-defined variant (see its configuration)")
        legend.append(f"`{_md(switch)}`: {what}")
    lines = [
        "### Ablations",
        "",
        "Each `bnnpan_*` variant changes one part of bnnpan; the cells are means over the test tiles and "
        "Δ = variant − bnnpan (ΔQ2n < 0 or ΔERGAS > 0: the variant is worse, so the part it removes helps). "
        "Switches: " + "; ".join(legend) + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for m in [PROPOSED, *variants]:
        r = results[m]
        cells = [_md(m)] + [_plain(_stat(r, key)[0], key) for key, _, _ in cols]
        ops = _num(((r.get(COST) or {}).get("256") or {}).get("ops"))
        cells.append("—" if not r.get(COST) else "n/a" if ops is None else f"{ops / 1e6:.1f}")
        if m == PROPOSED:
            cells += ["(ref.)", "(ref.)"]
        else:
            cells += [_delta(_stat(r, k)[0], _stat(ref, k)[0], k) for k in ("q2n", "ergas")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


HOW_TO_READ = """\
## How to read this report

Each dataset has one table: a row per method, a column per quality index, each cell the
**mean ± std over the test tiles**; ↑ means higher is better, ↓ lower is better, and the best
value of each column (at the shown precision; ties are all marked) is in **bold**.
The first six indices (PSNR, SAM, ERGAS, Q2n, SCC, Q) are computed at **reduced resolution**
with Wald's protocol: PAN and MS are degraded by the resolution ratio, fused, and compared
against the *original MS as ground truth*. The last four (D_λ, D_s, HQNR, QNR) are computed at
**full resolution**, on the original scale, with **no reference**: they estimate the spectral
(D_λ) and spatial (D_s) distortion from the inputs alone. These no-reference indices can rank
methods wrongly (EXP, the interpolated MS that adds no PAN detail, often gets an excellent D_λ),
so read them beside the reduced-resolution ones, not instead of them.
Conventions: images are in the sensor's **DN** (the PSNR peak is the sensor scale, stated per
dataset below), a border of the stated width is cut from every tile before the indices are
computed, and Q, Q2n, D_λ and D_s are averaged over **32 x 32 blocks**. For networks, the cost
columns count per layer (forward hooks) as BNN papers do: Params = binary params / 32 + FP
params (thousands of FP32-equivalent parameters), OPs = BOPs / 64 + FLOPs (millions) for a
64 x 64 and a 256 x 256 input, and the real size of the network file with its binary weights
packed 8 per byte against the FP32 state_dict; classical methods show —. Fusion times depend on
the machine and change from run to run, so they are not in this report: each method's
`timing.json` beside its `metrics.json`, and its MLflow run, have them. Under each table, "Best
binary method" names the binary network that ranks first on Q2n and on ERGAS (the bold marks are
usually won by the full-precision `fp`; the `bnnpan_*` ablations are left out of that ranking but
stay in the table). Each dataset ends with a
bar chart of the indices (error bars = std) and a visual comparison of one test tile: the RGB
composites share the ground truth's 2-98 % stretch, and the error maps (|fused - GT| averaged over
bands, in DN) share one colour scale. Where `fp`, `bnn` or `bnnpan` was evaluated, a sub-band
section splits their error by a one-level Haar wavelet transform into LL (smooth content) and
LH/HL/HH (details) to test the premise that binarization loses the details relatively more; where
`bnnpan` and its `bnnpan_*` variants were evaluated, an ablation table gives each variant's change
of Q2n and ERGAS against `bnnpan`. A cell without a value (not computed, e.g. the full-resolution
indices of `bnnpan_oracle_prior`, whose prior needs the ground truth) reads n/a.
"""


def _tile_counts(methods: list[str], results: dict[str, dict[str, Any]]) -> str:
    counts = {}
    for m in methods:
        n = _setup(results[m]).get("n_tiles") or {}
        counts[m] = (n.get("rr"), n.get("fr"))
    distinct = set(counts.values())
    if len(distinct) == 1:
        rr, fr = distinct.pop()
        return f"Test tiles: {rr} at reduced resolution, {fr} at full resolution."
    per = "; ".join(f"{_md(m)}: {rr} / {fr}" for m, (rr, fr) in counts.items())
    return f"Test tiles (reduced / full resolution; they differ between methods, compare with care): {per}."


def _conventions(results: dict[str, dict[str, Any]], methods: list[str]) -> str:
    info = _setup(results[methods[0]])
    bits = []
    if info.get("sensor"):
        bits.append(f"sensor {info['sensor']}")
    if info.get("ratio") is not None:
        bits.append(f"ratio {info['ratio']}")
    if info.get("bands"):
        bits.append("bands " + ", ".join(map(str, info["bands"])))
    if info.get("scale") is not None:
        bits.append(f"DN scale {_g(info['scale'])}")
    if info.get("psnr_peak") is not None:
        bits.append(f"PSNR peak {_g(info['psnr_peak'])}")
    if info.get("border_cut") is not None:
        bits.append(f"border cut {info['border_cut']} px")
    if info.get("block") is not None:
        bits.append(f"{info['block']} x {info['block']} blocks")
    peaks = {_g(_setup(results[m]).get("psnr_peak")) for m in methods}
    note = "" if len(peaks) <= 1 else f" (warning: the methods used different PSNR peaks: {sorted(peaks)})"
    return "Conventions: " + "; ".join(bits) + "." + note


def _g(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(int(f)) if f.is_integer() else f"{f:g}"


def _scenes(manifest: dict[str, Any]) -> list[str]:
    lines = []
    for s in manifest.get("scenes", []):
        name = s.get("name", "?")
        lic = s.get("licence") or "licence not recorded"
        att = s.get("attribution") or "attribution not recorded"
        role = f" (role: {s['role']})" if s.get("role") else ""
        lines.append(f"- `{name}`{role}: {att}; licence: {lic}")
    return lines or ["- (the manifest lists no scenes)"]


# ----------------------------------------------------------------------------- figures


def _metrics_figure(dataset: str, methods: list[str], results: dict[str, dict[str, Any]], path: Path) -> Path:
    colours = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    longest = max(len(m) for m in methods)
    width = max(13.0, 5 * (0.6 + 0.36 * len(methods)))
    fig, axes = plt.subplots(2, 5, figsize=(width, 6.0 + 0.11 * longest))
    x = np.arange(len(methods))
    small = len(methods) <= 6  # value labels fit horizontally
    for ax, (key, label, up) in zip(axes.ravel(), METRICS, strict=True):
        stats = [_stat(results[m], key) for m in methods]
        means = np.array([s[0] if s[0] is not None and math.isfinite(s[0]) else np.nan for s in stats])
        stds = np.array([s[1] if s[1] is not None and math.isfinite(s[1]) else 0.0 for s in stats])
        best = best_methods({m: s[0] for m, s in zip(methods, stats, strict=True)}, key, up)
        bars = ax.bar(
            x, np.nan_to_num(means), yerr=np.where(np.isnan(means), np.nan, stds), capsize=3,
            color=[colours(i % colours.N) for i in range(len(methods))],
            edgecolor=["black" if m in best else "none" for m in methods], linewidth=1.6,
            error_kw={"elinewidth": 1, "ecolor": "0.25"},
        )
        for i, (b, (mean, _)) in enumerate(zip(bars, stats, strict=True)):
            if mean is None or not math.isfinite(mean):
                text = "n/a" if mean is None else _fmt(mean, key)
                ax.text(
                    i, 0.02, text, ha="center", va="bottom", fontsize=8 if mean is None else 12, color="0.3",
                    fontweight="bold" if methods[i] in best else "normal",
                    transform=ax.get_xaxis_transform(),  # x in data, y in axes fraction
                )
                b.set_visible(False)
        finite = means[np.isfinite(means)]
        if finite.size:
            lo = float(np.min(finite - stds[np.isfinite(means)]))
            hi = float(np.max(finite + stds[np.isfinite(means)]))
            if key == "psnr" and lo > 0:  # PSNR differences are small against its size: zoom in
                pad = 0.15 * (hi - lo) + 0.5
                ax.set_ylim(max(0.0, lo - pad), hi + pad * (1.0 if small else 2.0))
            else:
                ax.set_ylim(min(0.0, lo * 1.1), hi * (1.15 if small else 1.3) if hi > 0 else 1.0)
        ax.set_title(f"{label} {_arrow(up)}", fontsize=11, fontweight="bold", loc="left")
        ax.set_title("RR" if key in REDUCED_METRICS else "FR", fontsize=8, color="0.4", loc="right")
        for i, (mean, std) in enumerate(stats):
            if mean is not None and math.isfinite(mean):
                ax.annotate(
                    _fmt(mean, key), (i, mean + (std if std is not None and math.isfinite(std) else 0.0)),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=7 if small else 6, rotation=0 if small else 90, color="0.2",
                )
        ax.set_xticks(x)
        ax.set_xticklabels(methods, rotation=40, ha="right", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle(
        f"{dataset}: mean ± std over the test tiles    RR = reduced resolution (Wald protocol, "
        "reference = original MS); FR = full resolution (no reference); black outline = best",
        fontsize=11,
    )
    fig.tight_layout()
    return _save_fig(fig, path)


def _grouped_bars(ax: plt.Axes, groups: list[str], series: dict[str, list[float | None]], colour: dict[str, Any],
                  fmt: str) -> None:
    """One group of bars per entry of ``groups``, one bar per series; None is drawn as "n/a"."""
    k = len(series)
    width = 0.8 / max(k, 1)
    x = np.arange(len(groups))
    for j, (name, values) in enumerate(series.items()):
        pos = x + (j - (k - 1) / 2) * width
        heights = [np.nan if v is None or not math.isfinite(v) else v for v in values]
        ax.bar(pos, np.nan_to_num(heights), width, label=name, color=colour[name])
        for xi, v in zip(pos, values, strict=True):
            text = "n/a" if v is None or not math.isfinite(v) else format(v, fmt)
            y = v if v is not None and math.isfinite(v) and v > 0 else None
            if y is None:
                ax.text(xi, 0.02, text, ha="center", va="bottom", fontsize=7, color="0.3", rotation=90,
                        transform=ax.get_xaxis_transform())
            else:
                ax.annotate(text, (xi, y), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=7 if k <= 3 else 6, rotation=0 if k <= 2 else 90, color="0.2")
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    positive = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v) and v > 0]
    if positive and len(positive) == sum(len(vs) for vs in series.values()):
        ax.set_yscale("log")
        lo, hi = min(positive), max(positive)
        ax.set_ylim(lo / 2, hi * (4 if k > 2 else 2))
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper right")


def _subband_figure(dataset: str, sb: _Subbands, path: Path) -> Path:
    """Left: mean error energy per Haar sub-band per method; right: each method's energy / fp's, per band."""
    colours = plt.get_cmap("tab10")
    colour = {m: colours(SUBBAND_METHODS.index(m) % colours.N) for m in sb.methods}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    _grouped_bars(left, list(SUBBANDS), {m: [sb.energy[m][s] for s in SUBBANDS] for m in sb.methods}, colour, ".3g")
    left.set_title("error energy per sub-band (DN² per pixel, log scale)", fontsize=10, loc="left")
    others = [m for m in sb.methods if m != FP_METHOD]
    if FP_METHOD in sb.methods and others:
        ratios = {m: _ratios_to_fp(sb, m) for m in others}
        groups = [*SUBBANDS, "LH/HL/HH\nmean"]
        _grouped_bars(right, groups, {m: [ratios[m][s] for s in (*SUBBANDS, "detail")] for m in others}, colour,
                      ".2f")
        right.axhline(1.0, color="0.3", lw=1, ls="--")
        right.axvline(3.5, color="0.6", lw=0.8, ls=":")
        right.set_title("energy / fp's energy in the same band (> 1: loses more than fp)", fontsize=10, loc="left")
    else:
        why = "fp was not evaluated" if FP_METHOD not in sb.methods else "no method besides fp"
        right.text(0.5, 0.5, f"no ratio to full precision:\n{why}", ha="center", va="center", fontsize=11,
                   color="0.3", transform=right.transAxes)
        right.set_xticks([])
        right.set_yticks([])
    fig.suptitle(
        f"{dataset}: one-level Haar DWT of the error (fused − GT), mean over {sb.n_tiles} reduced-resolution "
        f"test tiles, border cut {sb.cut} px; LL = smooth content, LH/HL/HH = details",
        fontsize=10,
    )
    fig.tight_layout()
    return _save_fig(fig, path)


def _stretch(a: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.clip((a - lo[:, None, None]) / np.maximum(hi - lo, 1e-12)[:, None, None], 0.0, 1.0)


def _rgb_indices(attrs: dict[str, Any], info: dict[str, Any], n_bands: int) -> list[int]:
    for rgb in (attrs.get("rgb"), info.get("rgb")):
        if isinstance(rgb, (list, tuple)) and len(rgb) == 3 and all(0 <= int(i) < n_bands for i in rgb):
            return [int(i) for i in rgb]
    return [2, 1, 0] if n_bands >= 3 else [0, 0, 0]


def _tile_scores(tiles: pd.DataFrame | None, tile: int) -> dict[str, float]:
    if tiles is None or not {"resolution", "tile"} <= set(tiles.columns):
        return {}
    row = tiles[(tiles["resolution"] == "reduced") & (tiles["tile"] == tile)]
    if row.empty:
        return {}
    return {k: float(row.iloc[0][k]) for k in ("q2n", "ergas") if k in row.columns and pd.notna(row.iloc[0][k])}


def _tile_scene(tiles: dict[str, pd.DataFrame | None], tile: int) -> str | None:
    for df in tiles.values():
        if df is not None and {"resolution", "tile", "scene"} <= set(df.columns):
            row = df[(df["resolution"] == "reduced") & (df["tile"] == tile)]
            if not row.empty and pd.notna(row.iloc[0]["scene"]):
                return str(row.iloc[0]["scene"])
    return None


@dataclass
class _Visual:
    """The inputs of the visual comparison: one reduced-resolution test tile and its fusions."""

    tile: int
    gt: np.ndarray
    pan: np.ndarray
    attrs: dict[str, Any]
    fused: dict[str, np.ndarray]


def _load_visual(reports_dir: Path, prepared_dir: Path, dataset: str, methods: list[str], tile: int) -> _Visual:
    gt, pan, attrs = _read_tile(prepared_dir / dataset / "test_rr.h5", tile)
    fused = {m: _read_fused(reports_dir / dataset / m / "fused" / f"rr_{tile:03d}.tif", gt.shape) for m in methods}
    return _Visual(tile, gt, pan, attrs, fused)


def _visual_figure(
    dataset: str,
    methods: list[str],
    results: dict[str, dict[str, Any]],
    tiles: dict[str, pd.DataFrame | None],
    visual: _Visual,
    path: Path,
) -> Path:
    gt, pan, attrs, fused, tile = visual.gt, visual.pan, visual.attrs, visual.fused, visual.tile
    info = _setup(results[methods[0]])
    rgb = _rgb_indices(attrs, info, gt.shape[0])

    lo = np.percentile(gt[rgb], 2, axis=(1, 2))
    hi = np.percentile(gt[rgb], 98, axis=(1, 2))
    errors = {m: np.abs(f - gt).mean(axis=0) for m, f in fused.items()}
    all_err = np.concatenate([e.ravel() for e in errors.values()])
    vmax = float(np.percentile(all_err, 99.5)) if all_err.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    plo, phi = np.percentile(pan, [2, 98])

    # Panels: (GT, PAN) then (method RGB, method error), wrapped every VISUAL_COLUMNS panels.
    n_panels = 1 + len(methods)
    ncol = min(n_panels, VISUAL_COLUMNS)
    nblock = -(-n_panels // ncol)
    side = 2.7
    fig, axes = plt.subplots(
        2 * nblock, ncol, figsize=(side * ncol + 0.9, 2 * nblock * side + 0.6 + 0.4 * nblock),
        squeeze=False, layout="constrained",
    )

    def slot(k: int) -> tuple[plt.Axes, plt.Axes]:
        r, c = divmod(k, ncol)
        return axes[2 * r, c], axes[2 * r + 1, c]

    scene = _tile_scene(tiles, tile)
    top, bottom = slot(0)
    top.imshow(np.moveaxis(_stretch(gt[rgb], lo, hi), 0, -1), interpolation="nearest")
    top.set_title("ground truth (RGB)\n" + (f"scene {scene}" if scene else f"tile {tile}"), fontsize=9)
    bottom.imshow(np.clip((pan - plo) / max(phi - plo, 1e-12), 0, 1), cmap="gray", interpolation="nearest")
    bottom.set_title("PAN (degraded input)", fontsize=9)
    cut = info.get("border_cut") or 0
    im = None
    error_axes = []
    for k, m in enumerate(methods, start=1):
        top, bottom = slot(k)
        top.imshow(np.moveaxis(_stretch(fused[m][rgb], lo, hi), 0, -1), interpolation="nearest")
        s = _tile_scores(tiles.get(m), tile)
        score = "  ".join(
            f"{lab} {_fmt(s[key], key)}" for key, lab in (("q2n", "Q2n"), ("ergas", "ERGAS")) if key in s
        )
        top.set_title(f"{m}\n{score}" if score else m, fontsize=9)
        im = bottom.imshow(errors[m], cmap="inferno", vmin=0, vmax=vmax, interpolation="nearest")
        bottom.set_title(f"|{m} − GT|", fontsize=9)
        error_axes.append(bottom)
        h, w = errors[m].shape
        if 0 < cut and 2 * cut < min(h, w):
            bottom.add_patch(
                Rectangle((cut - 0.5, cut - 0.5), w - 2 * cut, h - 2 * cut, fill=False, ls="--", lw=0.8, ec="cyan")
            )
    for k in range(n_panels, nblock * ncol):
        for ax in slot(k):
            ax.set_visible(False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        cb = fig.colorbar(im, ax=error_axes, shrink=0.9 if nblock == 1 else 0.6, pad=0.01, extend="max")
        cb.set_label("mean |error| over bands (DN)", fontsize=8)
        cb.ax.tick_params(labelsize=7)
    band_names = info.get("bands") or attrs.get("bands") or []
    rgb_txt = "/".join(str(band_names[i]) for i in rgb) if len(band_names) > max(rgb) else str(rgb)
    fig.suptitle(
        f"{dataset}, reduced-resolution test tile {tile}: RGB = {rgb_txt}, GT 2-98 % stretch for all"
        + (f"; dashed = {cut} px border cut" if cut else ""),
        fontsize=10,
    )
    return _save_fig(fig, path)


# ----------------------------------------------------------------------------- entry point


def build_report(
    pairs: list[tuple[str, str]],
    reports_dir: Path = Path("reports"),
    prepared_dir: Path = Path("data/prepared"),
    tile: int = 0,
) -> dict[str, Path]:
    """Write ``summary.md``, ``metrics.csv`` and two or three figures per dataset for the given pairs.

    ``pairs`` are the (dataset, method) combinations the current parameters evaluate, in the
    order they should appear. Returns ``{"summary": ..., "metrics_csv": ...,
    "<dataset>_metrics": ..., "<dataset>_visual": ...}`` and ``"<dataset>_subbands"``
    (``figures/<dataset>_subbands.png``) for each dataset where any of fp, bnn, bnnpan was evaluated
    and has fused reduced-resolution tiles. A listed pair without ``metrics.json`` is a
    :class:`ValueError` naming the file.
    """
    reports_dir, prepared_dir = Path(reports_dir), Path(prepared_dir)
    if not pairs:
        raise ValueError("no (dataset, method) pairs to report on; configure methods and run `bnnpan evaluate`")
    order: dict[str, list[str]] = {}
    for d, m in pairs:
        if m not in order.setdefault(d, []):
            order[d].append(m)

    # Load everything first, so a missing input fails before any file is replaced.
    results: dict[str, dict[str, dict[str, Any]]] = {}
    tiles: dict[str, dict[str, pd.DataFrame | None]] = {}
    manifests: dict[str, dict[str, Any]] = {}
    visuals: dict[str, _Visual] = {}
    subbands: dict[str, _Subbands | None] = {}
    for d, methods in order.items():
        results[d] = {m: _load_metrics(reports_dir / d / m / "metrics.json") for m in methods}
        tiles[d] = {m: _load_tiles(reports_dir / d / m / "tiles.csv") for m in methods}
        manifests[d] = _load_manifest(prepared_dir / d / "manifest.json")
        visuals[d] = _load_visual(reports_dir, prepared_dir, d, methods, tile)
        subbands[d] = _load_subbands(reports_dir, prepared_dir, d, methods, results[d])

    written: dict[str, Path] = {}
    fig_dir = reports_dir / "figures"
    for d, methods in order.items():
        written[f"{d}_metrics"] = _metrics_figure(d, methods, results[d], fig_dir / f"{d}_metrics.png")
        written[f"{d}_visual"] = _visual_figure(
            d, methods, results[d], tiles[d], visuals[d], fig_dir / f"{d}_visual.png"
        )
        sb = subbands[d]
        if sb is not None:
            written[f"{d}_subbands"] = _subband_figure(d, sb, fig_dir / f"{d}_subbands.png")

    # metrics.csv
    rows = []
    for d, methods in order.items():
        for m in methods:
            r = results[d][m]
            row: dict[str, Any] = {"dataset": d, "method": m, "kind": _setup(r).get("kind")}
            for key, _, _ in METRICS:
                row[f"{key}_mean"], row[f"{key}_std"] = _stat(r, key)
            for size, c in (r.get(COST) or {}).items():
                keys = ("packed_bytes", "fp32_bytes") if size == "file" else (
                    "params_equiv", "binary_params", "fp_params", "bytes", "bops", "flops", "ops")
                for k in keys:
                    row[f"{k}_{size}"] = _num((c or {}).get(k))
            n = _setup(r).get("n_tiles") or {}
            row["n_tiles_reduced"] = n.get("rr")
            row["n_tiles_full"] = n.get("fr")
            rows.append(row)
    df = pd.DataFrame(rows)
    written["metrics_csv"] = _atomic(reports_dir / "metrics.csv", lambda t: df.to_csv(t, index=False))

    # summary.md
    lines = [
        "# bnnpan: pan-sharpening results",
        "",
        "Generated by the report stage (`bnnpan.report.build`) from `reports/<dataset>/<method>/metrics.json`; "
        "the numbers are also in [`metrics.csv`](metrics.csv).",
        "",
        HOW_TO_READ,
    ]
    for d, methods in order.items():
        lines += [f"## {d}", "", _conventions(results[d], methods), "", *_table(methods, results[d]), ""]
        best_binary = _best_binary_line(methods, results[d])
        if best_binary:
            lines += [best_binary, ""]
        lines += [_tile_counts(methods, results[d]), "", "Scenes (licence and attribution):", ""]
        lines += _scenes(manifests[d])
        lines += [
            "",
            f"![{d}: indices per method](figures/{d}_metrics.png)",
            "",
            f"![{d}: visual comparison of reduced-resolution test tile {tile}](figures/{d}_visual.png)",
            "",
        ]
        if subbands[d] is not None:
            lines += _subband_section(d, subbands[d])
        lines += _ablations(methods, results[d])
    text = "\n".join(lines).rstrip() + "\n"
    written["summary"] = _atomic(reports_dir / "summary.md", lambda t: t.write_text(text, encoding="utf-8"))
    return written
