"""The report: one page that compares every evaluated method on every dataset.

What it shows, and why:

* ``reports/summary.md``: per dataset, a table methods x indices with mean ± std over the
  test tiles and the best value of each column in bold when its lead over the runner-up is
  significant on the paired per-tile values (:mod:`bnnpan.report.stats`), else a line saying which
  columns are "tied within noise (n pairs)". The reduced-resolution indices
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
  ``fp`` and the ``bnnpan_*`` ablations), since the bold marks are usually won by ``fp``: named only
  when its lead over the runner-up is significant, else "tied within noise (n pairs)".
* A "Paired comparisons" section and ``reports/figures/<dataset>_stats.png`` when there are two
  binary networks or one and ``fp``: each binary network against the leading binary network of
  Q2n, ERGAS, SAM and HQNR and against ``fp`` (mean paired difference, bootstrap CI, Wilcoxon p).
* ``reports/figures/<dataset>_subbands.png`` and a "Sub-band error energy" table, when any of
  ``fp``, ``bnn``, ``bnnpan`` has fused tiles: the error of each is split by a one-level Haar
  DWT into LL/LH/HL/HH (:func:`bnnpan.report.subbands.subband_error_energy`), to test the paper's premise that
  binarization degrades the detail bands relatively more than full precision does.
* An "Ablations" table when ``bnnpan`` and at least one ``bnnpan_*`` variant were evaluated:
  each variant's main indices and cost, and its change of Q2n and ERGAS against ``bnnpan``.

Inputs are what ``bnnpan evaluate`` writes (``reports/<D>/<M>/{metrics.json, tiles.csv,
fused/rr_NNN.tif}``) and what ``bnnpan prepare`` wrote (``data/prepared/<D>/{test_rr.h5,
manifest.json}``). Only the (dataset, method) pairs passed in appear: a stale method folder
left by an earlier configuration is ignored. Every file is written atomically.

The work is split by responsibility: :mod:`~bnnpan.report.load` reads the inputs,
:mod:`~bnnpan.report.subbands` analyses the error by sub-band, :mod:`~bnnpan.report.stats` tests the
differences between methods over the tiles, :mod:`~bnnpan.report.tables` writes the
markdown, :mod:`~bnnpan.report.figures` draws the figures; this module ties them together.

The outputs are kept in git, so they hold nothing that changes from run to run on the same
inputs: no fusion times (``timing.json`` and MLflow have them), no dates, and PNGs saved without
the matplotlib version in their metadata. The same inputs give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from bnnpan.atomic import atomic_path
from bnnpan.report.figures import metrics_figure, stats_figure, subband_figure, visual_figure
from bnnpan.report.load import Visual, load_manifest, load_metrics, load_tiles, load_visual
from bnnpan.report.stats import DatasetStats, dataset_stats
from bnnpan.report.subbands import Subbands, load_subbands
from bnnpan.report.tables import (
    HOW_TO_READ,
    ablations_section,
    best_binary_line,
    conventions,
    metrics_frame,
    results_table,
    scenes,
    stats_section,
    subband_section,
    ties_line,
    tile_counts,
    winners,
)


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def build_report(
    pairs: list[tuple[str, str]],
    reports_dir: Path = Path("reports"),
    prepared_dir: Path = Path("data/prepared"),
    tile: int = 0,
) -> dict[str, Path]:
    """Write ``summary.md``, ``metrics.csv`` and two to four figures per dataset for the given pairs.

    ``pairs`` are the (dataset, method) combinations the current parameters evaluate, in the
    order they should appear. Returns ``{"summary": ..., "metrics_csv": ...,
    "<dataset>_metrics": ..., "<dataset>_visual": ...}``, ``"<dataset>_subbands"``
    (``figures/<dataset>_subbands.png``) for each dataset where any of fp, bnn, bnnpan was evaluated
    and has fused reduced-resolution tiles, and ``"<dataset>_stats"`` (``figures/<dataset>_stats.png``,
    the paired comparisons) for each dataset with two binary networks or one and fp
    (:func:`bnnpan.report.comparisons_due`). A listed pair without ``metrics.json`` is a
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
    visuals: dict[str, Visual] = {}
    subbands: dict[str, Subbands | None] = {}
    paired: dict[str, DatasetStats] = {}
    for d, methods in order.items():
        results[d] = {m: load_metrics(reports_dir / d / m / "metrics.json") for m in methods}
        tiles[d] = {m: load_tiles(reports_dir / d / m / "tiles.csv") for m in methods}
        manifests[d] = load_manifest(prepared_dir / d / "manifest.json")
        visuals[d] = load_visual(reports_dir, prepared_dir, d, methods, tile)
        subbands[d] = load_subbands(reports_dir, prepared_dir, d, methods, results[d])
        paired[d] = dataset_stats(methods, results[d], tiles[d])

    written: dict[str, Path] = {}
    fig_dir = reports_dir / "figures"
    for d, methods in order.items():
        written[f"{d}_metrics"] = metrics_figure(d, methods, results[d], winners(paired[d].leads),
                                                 fig_dir / f"{d}_metrics.png")
        written[f"{d}_visual"] = visual_figure(
            d, methods, results[d], tiles[d], visuals[d], fig_dir / f"{d}_visual.png"
        )
        sb = subbands[d]
        if sb is not None:
            written[f"{d}_subbands"] = subband_figure(d, sb, fig_dir / f"{d}_subbands.png")
        if paired[d].due:
            written[f"{d}_stats"] = stats_figure(d, paired[d], fig_dir / f"{d}_stats.png")

    df = metrics_frame(order, results)
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
        lines += [f"## {d}", "", conventions(results[d], methods), "",
                  *results_table(methods, results[d], winners(paired[d].leads)), ""]
        for line in (ties_line(paired[d].leads), best_binary_line(paired[d])):
            if line:
                lines += [line, ""]
        lines += [tile_counts(methods, results[d]), "", "Scenes (licence and attribution):", ""]
        lines += scenes(manifests[d])
        lines += [
            "",
            f"![{d}: indices per method](figures/{d}_metrics.png)",
            "",
            f"![{d}: visual comparison of reduced-resolution test tile {tile}](figures/{d}_visual.png)",
            "",
        ]
        lines += stats_section(d, paired[d])
        if subbands[d] is not None:
            lines += subband_section(d, subbands[d])
        lines += ablations_section(methods, results[d])
    text = "\n".join(lines).rstrip() + "\n"
    written["summary"] = _atomic(reports_dir / "summary.md", lambda t: t.write_text(text, encoding="utf-8"))
    return written
