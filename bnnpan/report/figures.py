"""The report's figures (matplotlib, Agg backend): indices per method, the visual comparison, sub-bands.

Each function draws one figure from the loaded inputs and saves it atomically with
:func:`save_fig`: at most about a megapixel by default (the report lives in git; the indices and
visual figures are saved at full DPI so their text and panels stay readable, the visual one
palette-encoded above 1.5 MB) and without the matplotlib version in the PNG metadata, so the same
inputs give byte-identical files.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from bnnpan.atomic import atomic_path  # noqa: E402
from bnnpan.report import FP_METHOD, SUBBAND_METHODS  # noqa: E402
from bnnpan.report.load import METRICS, REDUCED_METRICS, Visual, setup, stat  # noqa: E402
from bnnpan.report.stats import (  # noqa: E402
    CONFIDENCE,
    HIGHER_IS_BETTER,
    LABELS,
    STATS_INDICES,
    DatasetStats,
    PairedDiff,
)
from bnnpan.report.subbands import SUBBANDS, Subbands, ratios_to_fp  # noqa: E402
from bnnpan.report.tables import arrow, fmt  # noqa: E402

PNG_METADATA = {"Software": None}  # no matplotlib version in the PNGs: same inputs, same bytes
DPI = 110
VISUAL_COLUMNS = 5  # panels per row of the visual comparison (GT + 4 methods)


def save_fig(fig: plt.Figure, path: Path, max_pixels: float = 1.0e6, max_bytes: int | None = None) -> Path:
    """Save at DPI, lowered when needed so the PNG stays under ``max_pixels`` (image grids of many
    methods are large and compress badly: the report lives in git).

    ``max_bytes``: when the PNG is larger, it is re-encoded with a 256-colour palette (median cut, no
    dithering: deterministic, and no dither noise to mistake for a fusion artefact), which about thirds
    the size of a grid of photographs at the cost of slight banding in smooth gradients.
    """
    w, h = fig.get_size_inches()
    dpi = min(DPI, (max_pixels / (w * h)) ** 0.5)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata=PNG_METADATA)
        data = buf.getvalue()
        if max_bytes is not None and len(data) > max_bytes:
            data = _palette_png(data)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return path
    finally:
        plt.close(fig)


def _palette_png(data: bytes) -> bytes:
    """``data`` (a PNG) re-encoded with a 256-colour median-cut palette; PIL writes no version or date chunk."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        pal = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    pal.save(out, format="PNG", optimize=True)
    return out.getvalue()


METRICS_FONT = 9.5  # pt at the saved size (the figure is saved at DPI, not scaled down)


def metrics_figure(dataset: str, methods: list[str], results: dict[str, dict[str, Any]], best: dict[str, set[str]],
                   path: Path, indices: list[tuple[str, str, bool]] | None = None) -> Path:
    """Dot-and-interval plot per index: methods on the y axis (top to bottom in table order), one panel per
    index with its own x range fitted to the means ± std (so small differences between many methods are
    seen, unlike bars from 0), the significant winner (``best[key]``) as a red dot with its label in bold."""
    indices = METRICS if indices is None else indices
    n = len(methods)
    ncol = min(len(indices), 6)
    nrow = -(-len(indices) // ncol)
    longest = max(len(m) for m in methods)
    label_w = 0.3 + 0.085 * longest  # inches of y tick labels at METRICS_FONT
    panel_h = 0.3 * n + 0.9
    fig, axes = plt.subplots(nrow, ncol, squeeze=False, sharey=True,
                             figsize=(label_w + 2.35 * ncol, nrow * panel_h + 0.9))
    y = np.arange(n)[::-1]
    for ax, (key, label, up) in zip(axes.ravel(), indices, strict=False):
        stats = [stat(results[m], key) for m in methods]
        winner = best.get(key, set())
        finite = [(mean, std or 0.0) for mean, std in stats if mean is not None and math.isfinite(mean)]
        if finite:
            lo = min(m - (s if math.isfinite(s) else 0.0) for m, s in finite)
            hi = max(m + (s if math.isfinite(s) else 0.0) for m, s in finite)
            pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi) * 0.01, 1e-6)
            ax.set_xlim(lo - pad, hi + pad)
        for yi, m, (mean, std) in zip(y, methods, stats, strict=True):
            if mean is None or not math.isfinite(mean):
                text = "n/a" if mean is None else fmt(mean, key)
                ax.text(0.5, yi, text, ha="center", va="center", fontsize=METRICS_FONT, color="0.4",
                        transform=ax.get_yaxis_transform())
                continue
            colour = "C3" if m in winner else "0.2"
            if std is not None and math.isfinite(std) and std > 0:
                ax.plot([mean - std, mean + std], [yi, yi], color=colour, lw=1.6, solid_capstyle="butt")
            ax.plot([mean], [yi], "o", color=colour, ms=6 if m in winner else 4.5, zorder=3)
        ax.set_title(f"{label} {arrow(up)}  ({'RR' if key in REDUCED_METRICS else 'FR'})", fontsize=METRICS_FONT + 1,
                     fontweight="bold", loc="left")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.tick_params(axis="x", labelsize=METRICS_FONT - 0.5)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_ylim(-0.6, n - 0.4)
    for ax in axes[:, 0]:
        ax.set_yticks(y)
        ax.set_yticklabels(methods, fontsize=METRICS_FONT)
    for r in range(nrow):  # bold labels of the methods that win a column of this row
        row_winners = {m for ax, (k, _, _) in zip(axes[r], indices[r * ncol:(r + 1) * ncol], strict=False)
                       for m in best.get(k, set())}
        for t in axes[r, 0].get_yticklabels():
            if t.get_text() in row_winners:
                t.set_fontweight("bold")
                t.set_color("C3")
    for ax in axes.ravel()[len(indices):]:
        ax.set_visible(False)
    fig.suptitle(
        f"{dataset}: dot = mean, bar = ± std (population) over the (tile, seed) values; RR = reduced resolution "
        "(Wald, reference = original MS), FR = full resolution (no reference);\n"
        "each index on its own axis range; red = best with a significant lead over the runner-up "
        "(paired test, see summary.md)",
        fontsize=METRICS_FONT + 0.5,
    )
    fig.tight_layout()
    w, h = fig.get_size_inches()
    return save_fig(fig, path, max_pixels=w * h * DPI**2)


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


def subband_figure(dataset: str, sb: Subbands, path: Path) -> Path:
    """Left: mean error energy per Haar sub-band per method; right: each method's energy / fp's, per band."""
    colours = plt.get_cmap("tab10")
    colour = {m: colours(SUBBAND_METHODS.index(m) % colours.N) for m in sb.methods}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    _grouped_bars(left, list(SUBBANDS), {m: [sb.energy[m][s] for s in SUBBANDS] for m in sb.methods}, colour, ".3g")
    left.set_title("error energy per sub-band (DN² per pixel, log scale)", fontsize=10, loc="left")
    others = [m for m in sb.methods if m != FP_METHOD]
    if FP_METHOD in sb.methods and others:
        ratios = {m: ratios_to_fp(sb, m) for m in others}
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
    return save_fig(fig, path)


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


def detail_window(pan: np.ndarray, side: int, cut: int = 0) -> tuple[int, int]:
    """Top-left corner (row, col) of the ``side`` x ``side`` window of highest PAN gradient energy.

    Why: the crop shown enlarged in the visual comparison should hold the details (edges, texture) where
    fusion methods differ, not a flat field; choosing it from the PAN (an input, the same for every method)
    favours none of them, and it is deterministic (the first maximum in row-major order). The window stays
    inside the ``cut`` px border when it fits there (the indices ignore the border).
    """
    p = np.asarray(pan, dtype=np.float64)
    h, w = p.shape
    side = max(1, min(side, h, w))
    gy, gx = np.gradient(p)
    sums = _window_sums(gy * gy + gx * gx, side)
    lo = cut if h - 2 * cut >= side and w - 2 * cut >= side else 0
    r_hi, c_hi = (h - side - lo, w - side - lo)
    window = sums[lo : r_hi + 1, lo : c_hi + 1]
    r, c = np.unravel_index(int(np.argmax(window)), window.shape)
    return int(r) + lo, int(c) + lo


def _window_sums(a: np.ndarray, side: int) -> np.ndarray:
    """Sum of ``a`` over every ``side`` x ``side`` window, indexed by its top-left corner (an integral image)."""
    i = np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return i[side:, side:] - i[:-side, side:] - i[side:, :-side] + i[:-side, :-side]


VISUAL_PANEL = 3.0  # inches per panel at DPI: about 330 px, so a 256 px tile is seen at its own resolution
VISUAL_MAX_BYTES = 1_500_000


def visual_figure(
    dataset: str,
    methods: list[str],
    results: dict[str, dict[str, Any]],
    tiles: dict[str, pd.DataFrame | None],
    visual: Visual,
    path: Path,
) -> Path:
    """Ground truth and every method's fusion of one test tile, each with an enlarged detail crop below it and
    its absolute error below that (the ground truth's column: GT, its crop, the PAN).

    All RGB panels share the GT's 2-98 % stretch, all error maps one colour scale; the crop (a quarter of the
    tile's side, :func:`detail_window`) is outlined on every full view and shown with nearest-neighbour
    enlargement, so pixels stay pixels. Saved at full resolution (panels of about 330 px) and re-encoded with
    a palette if it would exceed :data:`VISUAL_MAX_BYTES`."""
    gt, pan, attrs, fused, tile = visual.gt, visual.pan, visual.attrs, visual.fused, visual.tile
    info = setup(results[methods[0]])
    rgb = _rgb_indices(attrs, info, gt.shape[0])

    lo = np.percentile(gt[rgb], 2, axis=(1, 2))
    hi = np.percentile(gt[rgb], 98, axis=(1, 2))
    errors = {m: np.abs(f - gt).mean(axis=0) for m, f in fused.items()}
    all_err = np.concatenate([e.ravel() for e in errors.values()])
    vmax = float(np.percentile(all_err, 99.5)) if all_err.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    plo, phi = np.percentile(pan, [2, 98])
    cut = int(info.get("border_cut") or 0)
    h, w = gt.shape[1:]
    side = max(4, min(h, w) // 4)
    r0, c0 = detail_window(pan, side, cut)

    # Panels: (GT, GT crop, PAN) then (method RGB, crop, error), wrapped every VISUAL_COLUMNS panels.
    n_panels = 1 + len(methods)
    ncol = min(n_panels, VISUAL_COLUMNS)
    nblock = -(-n_panels // ncol)
    fig, axes = plt.subplots(
        3 * nblock, ncol, figsize=(VISUAL_PANEL * ncol + 1.0, 3 * nblock * (VISUAL_PANEL + 0.35) + 0.7),
        squeeze=False, layout="constrained",
    )

    def slot(k: int) -> tuple[plt.Axes, plt.Axes, plt.Axes]:
        r, c = divmod(k, ncol)
        return axes[3 * r, c], axes[3 * r + 1, c], axes[3 * r + 2, c]

    def outline(ax: plt.Axes) -> None:
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), side, side, fill=False, lw=1.2, ec="yellow"))

    def crop(a: np.ndarray) -> np.ndarray:
        return a[..., r0 : r0 + side, c0 : c0 + side]

    scene = _tile_scene(tiles, tile)
    top, mid, bottom = slot(0)
    gt_rgb = np.moveaxis(_stretch(gt[rgb], lo, hi), 0, -1)
    top.imshow(gt_rgb, interpolation="nearest")
    outline(top)
    top.set_title("ground truth (RGB)\n" + (f"scene {scene}" if scene else f"tile {tile}"), fontsize=9)
    mid.imshow(crop(np.moveaxis(gt_rgb, -1, 0)).transpose(1, 2, 0), interpolation="nearest")
    mid.set_title(f"ground truth, detail ({side} x {side} px)", fontsize=9)
    bottom.imshow(np.clip((pan - plo) / max(phi - plo, 1e-12), 0, 1), cmap="gray", interpolation="nearest")
    outline(bottom)
    bottom.set_title("PAN (degraded input)", fontsize=9)
    im = None
    error_axes = []
    for k, m in enumerate(methods, start=1):
        top, mid, bottom = slot(k)
        view = np.moveaxis(_stretch(fused[m][rgb], lo, hi), 0, -1)
        top.imshow(view, interpolation="nearest")
        outline(top)
        s = _tile_scores(tiles.get(m), tile)
        score = "  ".join(
            f"{lab} {fmt(s[key], key)}" for key, lab in (("q2n", "Q2n"), ("ergas", "ERGAS")) if key in s
        )
        top.set_title(f"{m}\n{score}" if score else m, fontsize=9)
        mid.imshow(view[r0 : r0 + side, c0 : c0 + side], interpolation="nearest")
        mid.set_title(f"{m}, detail", fontsize=9)
        im = bottom.imshow(errors[m], cmap="inferno", vmin=0, vmax=vmax, interpolation="nearest")
        bottom.set_title(f"|{m} − GT|", fontsize=9)
        error_axes.append(bottom)
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
        cb = fig.colorbar(im, ax=error_axes, shrink=0.9 if nblock == 1 else 0.5, pad=0.01, extend="max")
        cb.set_label("mean |error| over bands (DN)", fontsize=9)
        cb.ax.tick_params(labelsize=8)
    band_names = info.get("bands") or attrs.get("bands") or []
    rgb_txt = "/".join(str(band_names[i]) for i in rgb) if len(band_names) > max(rgb) else str(rgb)
    fig.suptitle(
        f"{dataset}, reduced-resolution test tile {tile}: RGB = {rgb_txt}, GT 2-98 % stretch for all; yellow = the "
        f"detail crop (highest PAN gradient energy), enlarged below each view"
        + (f"; dashed = {cut} px border cut" if cut else ""),
        fontsize=10,
    )
    fw, fh = fig.get_size_inches()
    return save_fig(fig, path, max_pixels=fw * fh * DPI**2, max_bytes=VISUAL_MAX_BYTES)


def _interval_panel(ax: plt.Axes, key: str, rows: list[str], diffs: dict[str, PairedDiff], fixed: dict[str, str],
                    title: str) -> None:
    """Dot (mean Δ) and bar (confidence interval) per row, top to bottom; ``fixed`` rows show a text instead."""
    y = np.arange(len(rows))[::-1]
    for yi, m in zip(y, rows, strict=True):
        d = diffs.get(m)
        if m in fixed or d is None or d.mean is None:
            text = fixed.get(m) or ("n/a" if d is None else f"n/a ({d.note})")
            ax.text(0.5, yi, text, ha="center", va="center", fontsize=7, color="0.4",
                    transform=ax.get_yaxis_transform())
            continue
        colour = "C3" if d.significant else "0.35"
        if d.ci is not None:
            ax.plot(d.ci, [yi, yi], color=colour, lw=2.2, solid_capstyle="butt")
        ax.plot([d.mean], [yi], "o", color=colour, ms=5)
        p = "n/a" if d.p is None else "<0.001" if d.p < 0.001 else f"{d.p:.3f}"
        ax.annotate(f"p {p}", (1.0, yi), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", ha="left", va="center", fontsize=7, color=colour)
    ax.axvline(0.0, color="0.2", lw=0.9, ls="--")
    ax.set_yticks(y)
    ax.set_yticklabels(rows, fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    up = HIGHER_IS_BETTER[key]
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_xlabel(f"Δ {LABELS[key]} ({'> 0' if up else '< 0'}: method better)", fontsize=8)


def stats_figure(dataset: str, st: DatasetStats, path: Path) -> Path:
    """The paired comparisons as dot-and-interval plots: a column per index of STATS_INDICES, a row against the
    leading binary network (when there are two or more) and a row against fp (when it was evaluated); red = a
    significant difference."""
    kinds = (["leader"] if len(st.binary) >= 2 else []) + (["fp"] if st.has_fp else [])
    rows = st.binary
    fig, axes = plt.subplots(len(kinds), len(STATS_INDICES), squeeze=False,
                             figsize=(3.6 * len(STATS_INDICES) + 0.6, len(kinds) * (0.32 * len(rows) + 1.5) + 0.8))
    for r, kind in enumerate(kinds):
        for c, key in enumerate(STATS_INDICES):
            ax = axes[r, c]
            label = f"{LABELS[key]} {arrow(HIGHER_IS_BETTER[key])}"
            if kind == "leader":
                leader = st.binary_leads[key].leader
                diffs = st.vs_leader.get(key, {})
                fixed = {leader: "(leader)"} if leader else {}
                title = f"{label}: method − {leader or 'n/a'} (leader)"
            else:
                diffs, fixed, title = st.vs_fp.get(key, {}), {}, f"{label}: method − fp"
            _interval_panel(ax, key, rows, diffs, fixed, title)
    ns = sorted({d.n for g in (st.vs_leader, st.vs_fp) for per in g.values() for d in per.values() if d.n})
    pairs = "" if not ns else f"; pairs per comparison: {ns[0]}" + (f"-{ns[-1]}" if ns[-1] != ns[0] else "")
    fig.suptitle(
        f"{dataset}: paired per-tile differences of the binary networks; dot = mean Δ, bar = {CONFIDENCE * 100:g} % "
        f"bootstrap CI, p = Wilcoxon signed-rank{pairs}; red = significant (p < 0.05, CI excludes 0)",
        fontsize=9,
    )
    fig.tight_layout()
    return save_fig(fig, path)



QUICKLOOK_SIDE = 640  # pixels of the overview panels' longer side
QUICKLOOK_DETAIL = 128  # PAN pixels of the zoomed detail's side


def _read_decimated(path: Path, shape: tuple[int, int], bands: list[int] | None = None) -> np.ndarray:
    """``path`` read at ``shape`` (GDAL's averaging; a COG answers from its overviews), float64, nodata NaN."""
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(path) as src:
        idx = [b + 1 for b in bands] if bands is not None else list(range(1, src.count + 1))
        a = src.read(idx, out_shape=(len(idx), *shape), resampling=Resampling.average, masked=True)
        return np.ma.filled(a.astype(np.float64), np.nan)


def _read_window(path: Path, row: int, col: int, side: int, bands: list[int] | None = None) -> np.ndarray:
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as src:
        idx = [b + 1 for b in bands] if bands is not None else list(range(1, src.count + 1))
        a = src.read(idx, window=Window(col, row, side, side), masked=True)
        return np.ma.filled(a.astype(np.float64), np.nan)


def _rgb_panel(a: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.nan_to_num(_stretch(a, lo, hi).transpose(1, 2, 0), nan=0.0)


def _ground_detail(pan: np.ndarray, side: int, bright: float, max_bright: float = 0.02) -> tuple[int, int]:
    """:func:`detail_window` among the windows with at most ``max_bright`` of their pixels above ``bright`` (the
    display's white point) or nodata: texture on the ground rather than the edges of saturated clouds; all
    windows if none qualifies."""
    p = np.nan_to_num(pan, nan=bright)
    h, w = p.shape
    side = max(1, min(side, h, w))
    gy, gx = np.gradient(np.minimum(p, bright))
    score = _window_sums(gy * gy + gx * gx, side)
    ok = _window_sums((p >= bright).astype(np.float64), side) <= max_bright * side * side
    if ok.any():
        score = np.where(ok, score, -1.0)
    r, c = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(r), int(c)


def deploy_figure(name: str, method: str, fused: Path, scene_dir: Path, path: Path) -> Path:
    """Quicklook of a whole scene sharpened by ``bnnpan fuse``: PAN, EXP and the fused image, over the whole scene
    (top row, decimated by averaging; a COG answers from its overviews) and over a zoomed detail at full
    resolution (bottom row: the :data:`QUICKLOOK_DETAIL` px window of highest PAN gradient energy, saturated
    pixels left out, outlined above).

    EXP is the MS upsampled by the 23-tap interpolator (:func:`bnnpan.data.wald.interp23`), computed on the detail's
    MS window with a 12 MS px margin. The colour panels share the fused image's 2-98 % stretch; nodata is black.
    Only windows and overviews are read, so the figure costs the same for any scene size.
    """
    import json

    from bnnpan.data import wald

    meta = json.loads((scene_dir / "scene.json").read_text())
    ratio = int(meta["ratio"])
    ph, pw = (int(v) for v in meta["pan_shape"])
    n_bands = int(meta["ms_shape"][0])
    rgb = _rgb_indices({}, meta, n_bands)
    k = max(1, math.ceil(max(ph, pw) / QUICKLOOK_SIDE))
    shape = (max(1, ph // k), max(1, pw // k))
    pan_small = _read_decimated(scene_dir / "pan.tif", shape)[0]
    exp_small = _read_decimated(scene_dir / "ms.tif", shape, rgb)
    fused_small = _read_decimated(fused, shape, rgb)
    valid = fused_small[:, np.isfinite(fused_small).all(0)]
    lo = np.percentile(valid, 2, axis=1) if valid.size else np.zeros(3)
    hi = np.percentile(valid, 98, axis=1) if valid.size else np.ones(3)
    pvalid = pan_small[np.isfinite(pan_small)]
    plo, phi = np.percentile(pvalid, [2, 98]) if pvalid.size else (0.0, 1.0)

    # the detail: chosen on the decimated PAN, read at full resolution, aligned to the MS grid
    side = min(QUICKLOOK_DETAIL, ph, pw) // ratio * ratio
    small_side = max(2, side // k)
    r0, c0 = _ground_detail(pan_small, small_side, float(phi))
    row = min(max(0, (r0 * k) // ratio * ratio), ph - side)
    col = min(max(0, (c0 * k) // ratio * ratio), pw - side)
    pan_d = _read_window(scene_dir / "pan.tif", row, col, side)[0]
    fused_d = _read_window(fused, row, col, side, rgb)
    margin = 12
    mr, mc, ms_side = row // ratio, col // ratio, side // ratio
    r_lo, c_lo = max(0, mr - margin), max(0, mc - margin)
    ms_h, ms_w = int(meta["ms_shape"][1]), int(meta["ms_shape"][2])
    r_hi, c_hi = min(ms_h, mr + ms_side + margin), min(ms_w, mc + ms_side + margin)
    ms_win = _read_window(scene_dir / "ms.tif", r_lo, c_lo, max(r_hi - r_lo, c_hi - c_lo), rgb)
    ms_win = ms_win[:, : r_hi - r_lo, : c_hi - c_lo]
    up = wald.interp23(np.nan_to_num(ms_win), ratio)
    oy, ox = (mr - r_lo) * ratio, (mc - c_lo) * ratio
    exp_d = up[:, oy : oy + side, ox : ox + side]
    exp_d[:, ~np.isfinite(fused_d).all(0)] = np.nan

    fig, axes = plt.subplots(2, 3, figsize=(3 * 3.2, 2 * 3.2 * min(1.0, shape[0] / shape[1]) + 0.6), dpi=DPI,
                             squeeze=False)
    panels = [("PAN", np.clip((pan_small - plo) / max(phi - plo, 1e-12), 0, 1), True),
              ("EXP (MS, interpolated)", _rgb_panel(exp_small, lo, hi), False),
              (f"{method} (fused)", _rgb_panel(fused_small, lo, hi), False)]
    details = [np.clip((pan_d - plo) / max(phi - plo, 1e-12), 0, 1), _rgb_panel(exp_d, lo, hi),
               _rgb_panel(fused_d, lo, hi)]
    for j, ((title, img, grey), det) in enumerate(zip(panels, details, strict=True)):
        ax = axes[0, j]
        ax.imshow(np.nan_to_num(img), cmap="gray" if grey else None, interpolation="nearest")
        ax.add_patch(Rectangle((col / k - 0.5, row / k - 0.5), side / k, side / k, fill=False, ec="yellow", lw=1.2))
        ax.set_title(title, fontsize=9)
        axes[1, j].imshow(np.nan_to_num(det), cmap="gray" if grey else None, interpolation="nearest")
        axes[1, j].set_title(f"detail {side} x {side} px at ({row}, {col})", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{name}: {meta.get('sensor', '')} scene {ph} x {pw} PAN px, sharpened by {method}", fontsize=10)
    fig.tight_layout()
    return save_fig(fig, path, max_pixels=1.6e6)
