"""The report: one page that compares every evaluated method on every dataset.

What it shows, and why:

* ``reports/summary.md``: per dataset, a table methods x indices with mean ± std over the
  test tiles (for a network trained with several seeds: over every (tile, seed) value, the runs
  being combined by :mod:`bnnpan.report.runs`) and the best value of each column in bold when its
  lead over the runner-up is significant on the paired per-(tile, seed) values
  (:mod:`bnnpan.report.stats`), else a line saying which
  columns are "tied within noise (n pairs)". The reduced-resolution indices
  (PSNR, SAM, ERGAS, Q2n, SCC, Q) follow Wald's protocol: the original MS is the ground
  truth of a fusion of degraded inputs, so they measure fidelity exactly but at a scale that
  is not the one of use. The full-resolution indices (D_λ, D_s, HQNR, QNR; and D_s / HQNR with an
  MTF-filtered PAN_L, ``d_s_mtf`` / ``hqnr_mtf``, as columns of their own where a dataset has them) need no
  reference and are computed on the original scale, but they can rank methods wrongly (the
  plain interpolated MS, EXP, often gets an excellent D_λ because it injects no detail), so
  the page says to read both families together. The conventions that change the numbers
  (DN scale, PSNR peak, border cut, block size, which D_s is which) are stated per dataset with the
  run environment of the compared runs (a warning line when their ``run_environment`` blocks differ), the
  tile counts and the licence and attribution of every scene the test tiles come from.
* ``reports/metrics.csv``: the same numbers, one row per (dataset, method), for other tools.
* ``reports/metrics_tiles.csv``: every per-(tile, seed) value behind the tables, one row per
  (dataset, method, seed, resolution, tile).
* ``reports/tables/<dataset>_{results,comparisons,seeds}.tex``: the results, paired-comparisons (when
  due) and seeds (when a method has several seeds) tables as LaTeX booktabs tabulars with the same bold
  marks (:mod:`bnnpan.report.latex`), linked from summary.md.
* ``reports/figures/<dataset>_metrics.png``: a dot-and-interval plot per index (mean ± std over the
  (tile, seed) values, each index on its own fitted axis, methods on the y axis), so the size of the
  differences is seen against the spread over tiles.
* ``reports/figures/<dataset>_visual.png``: one reduced-resolution test tile, ground truth
  and every method (its first seed's run) side by side with the same colour stretch (the GT's 2-98
  percentiles), each with an enlarged detail crop (the window of highest PAN gradient energy), and below
  them the PAN and each method's absolute error on one shared colour scale, so
  the numbers in the table can be checked by eye (blur, colour shifts, artefacts).
* A "Seeds" section when a method has several seeds: per network, the mean ± std over seeds of the
  per-seed tile means and the mean within-seed std over tiles.
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
* A "Cross-scene" table under a test-only dataset (``models_from``: networks trained on another dataset,
  tested on scenes they never saw) when that other dataset is reported too: each method's Q2n, ERGAS, SAM and
  HQNR in-scene and cross-scene side by side, the change, and its Q2n rank in each.
* An "Ablations" table when ``bnnpan`` and at least one ``bnnpan_*`` variant were evaluated:
  each variant's main indices and cost, and its change of Q2n and ERGAS against ``bnnpan``.

Inputs are what ``bnnpan evaluate`` writes, one folder per run (``reports/<D>/<run>/{metrics.json, tiles.csv,
fused/rr_NNN.tif}``, ``<run>`` = :func:`bnnpan.config.run_name` of the method and seed) and what ``bnnpan
prepare`` wrote (``data/prepared/<D>/{test_rr.h5,
manifest.json}``). Only the (dataset, method) pairs passed in appear: a stale method folder
left by an earlier configuration is ignored. Every file is written atomically.

The work is split by responsibility: :mod:`~bnnpan.report.load` reads the inputs,
:mod:`~bnnpan.report.runs` combines a method's seeds and describes the runs' environments,
:mod:`~bnnpan.report.subbands` analyses the error by sub-band, :mod:`~bnnpan.report.stats` tests the
differences between methods over the tiles, :mod:`~bnnpan.report.tables` writes the
markdown, :mod:`~bnnpan.report.latex` the LaTeX tables, :mod:`~bnnpan.report.figures` draws the figures;
this module ties them together.

The outputs are kept in git, so they hold nothing that changes from run to run on the same
inputs: no fusion times (``timing.json`` and MLflow have them), no dates, and PNGs saved without
the matplotlib version in their metadata. The same inputs give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bnnpan.atomic import atomic_path
from bnnpan.report.figures import deploy_figure, metrics_figure, stats_figure, subband_figure, visual_figure
from bnnpan.report.latex import comparisons_tex, results_tex, seeds_tex
from bnnpan.report.load import OPTIONAL_METRICS, Visual, load_manifest, load_visual
from bnnpan.report.runs import (
    Run,
    combine,
    environment_line,
    load_runs,
    multi_seed,
    present_indices,
    seed_rows,
    seeds_of,
    tiles_frame,
)
from bnnpan.report.stats import DatasetStats, dataset_stats
from bnnpan.report.subbands import Subbands, load_subbands
from bnnpan.report.tables import (
    HOW_TO_READ,
    ablations_section,
    best_binary_line,
    conventions,
    cross_scene_section,
    metrics_frame,
    results_table,
    scenes,
    seeds_section,
    stats_section,
    subband_section,
    ties_line,
    tile_counts,
    trained_on,
    winners,
)


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def _text(path: Path, text: str) -> Path:
    return _atomic(path, lambda t: t.write_text(text, encoding="utf-8"))


def build_report(
    pairs: list[tuple[str, str]],
    reports_dir: Path = Path("reports"),
    prepared_dir: Path = Path("data/prepared"),
    tile: int = 0,
    seeds: Mapping[str, Sequence[int] | None] | None = None,
    deploy: Sequence[tuple[str, str, Path, Path]] = (),
) -> dict[str, Path]:
    """Write ``summary.md``, ``metrics.csv``, ``metrics_tiles.csv``, the LaTeX tables and two to four figures per
    dataset for the given pairs.

    ``pairs`` are the (dataset, method) combinations the current parameters evaluate, in the
    order they should appear; ``seeds[m]`` the training seeds of method ``m`` (missing or None: ``[0]``, one
    run), each run read from ``reports/<dataset>/<run_name(m, s)>/``. Returns ``{"summary": ...,
    "metrics_csv": ..., "metrics_tiles_csv": ..., "<dataset>_metrics": ..., "<dataset>_visual": ...,
    "<dataset>_results_tex": ...}``, ``"<dataset>_subbands"`` (``figures/<dataset>_subbands.png``) for each
    dataset where any of fp, bnn, bnnpan was evaluated and has fused reduced-resolution tiles,
    ``"<dataset>_stats"`` (``figures/<dataset>_stats.png``, the paired comparisons) and
    ``"<dataset>_comparisons_tex"`` for each dataset with two binary networks or one and fp
    (:func:`bnnpan.report.comparisons_due`), and ``"<dataset>_seeds_tex"`` for each dataset where a method has
    more than one seed. A listed run without ``metrics.json`` is a :class:`ValueError` naming the file.

    ``deploy``: ``(name, method, fused GeoTIFF, raw scene folder)`` of each whole scene the DAG sharpened
    (``params.deploy``); each gets a quicklook ``"deploy_<name>"`` (``figures/deploy_<name>.png``) and a line in
    the Deployment section.
    """
    reports_dir, prepared_dir = Path(reports_dir), Path(prepared_dir)
    for name, _, fused, scene_dir in deploy:
        for need in (Path(fused), Path(scene_dir) / "scene.json"):
            if not need.is_file():
                raise ValueError(f"{need} not found: the deployment {name} has not run (`bnnpan fuse`, or dvc repro)")
    if not pairs:
        raise ValueError("no (dataset, method) pairs to report on; configure methods and run `bnnpan evaluate`")
    order: dict[str, list[str]] = {}
    for d, m in pairs:
        if m not in order.setdefault(d, []):
            order[d].append(m)

    # Load everything first, so a missing input fails before any file is replaced.
    runs: dict[str, dict[str, list[Run]]] = {}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    tiles: dict[str, dict[str, pd.DataFrame | None]] = {}
    indices: dict[str, list[tuple[str, str, bool]]] = {}
    manifests: dict[str, dict[str, Any]] = {}
    visuals: dict[str, Visual] = {}
    subbands: dict[str, Subbands | None] = {}
    paired: dict[str, DatasetStats] = {}
    for d, methods in order.items():
        runs[d] = {m: load_runs(reports_dir, d, m, seeds_of(m, seeds)) for m in methods}
        combined = {m: combine(runs[d][m]) for m in methods}
        results[d] = {m: c[0] for m, c in combined.items()}
        tiles[d] = {m: c[1] for m, c in combined.items()}
        indices[d] = present_indices([r for m in methods for r in runs[d][m]])
        first = {m: runs[d][m][0].name for m in methods}  # the visual and the sub-bands show the first seed's run
        manifests[d] = load_manifest(prepared_dir / d / "manifest.json")
        visuals[d] = load_visual(reports_dir, prepared_dir, d, methods, tile, first)
        subbands[d] = load_subbands(reports_dir, prepared_dir, d, methods, results[d], first)
        paired[d] = dataset_stats(methods, results[d], tiles[d], indices[d])

    written: dict[str, Path] = {}
    fig_dir, tex_dir = reports_dir / "figures", reports_dir / "tables"
    for d, methods in order.items():
        best = winners(paired[d].leads)
        written[f"{d}_metrics"] = metrics_figure(d, methods, results[d], best, fig_dir / f"{d}_metrics.png",
                                                 indices[d])
        written[f"{d}_visual"] = visual_figure(
            d, methods, results[d], {m: runs[d][m][0].tiles for m in methods}, visuals[d],
            fig_dir / f"{d}_visual.png",
        )
        sb = subbands[d]
        if sb is not None:
            written[f"{d}_subbands"] = subband_figure(d, sb, fig_dir / f"{d}_subbands.png")
        if paired[d].due:
            written[f"{d}_stats"] = stats_figure(d, paired[d], fig_dir / f"{d}_stats.png")
        written[f"{d}_results_tex"] = _text(tex_dir / f"{d}_results.tex",
                                            results_tex(d, methods, results[d], best, indices[d]))
        if paired[d].due:
            written[f"{d}_comparisons_tex"] = _text(tex_dir / f"{d}_comparisons.tex", comparisons_tex(d, paired[d]))
        if multi_seed(runs[d]):
            written[f"{d}_seeds_tex"] = _text(tex_dir / f"{d}_seeds.tex",
                                              seeds_tex(d, seed_rows(methods, runs[d]), _seed_lists(runs[d])))

    optional = sorted({k for d in order for k, _, _ in indices[d]} & {k for k, _, _ in OPTIONAL_METRICS})
    df = metrics_frame(order, results, optional)
    written["metrics_csv"] = _atomic(reports_dir / "metrics.csv", lambda t: df.to_csv(t, index=False))
    per_tile_df = tiles_frame(order, runs)
    written["metrics_tiles_csv"] = _atomic(reports_dir / "metrics_tiles.csv",
                                           lambda t: per_tile_df.to_csv(t, index=False))

    # summary.md
    lines = [
        "# bnnpan: pan-sharpening results",
        "",
        "Generated by the report stage (`bnnpan.report.build`) from `reports/<dataset>/<method>/metrics.json`; "
        "the numbers are also in [`metrics.csv`](metrics.csv), every per-(tile, seed) value behind them in "
        "[`metrics_tiles.csv`](metrics_tiles.csv), and the tables as LaTeX in `tables/`.",
        "",
        HOW_TO_READ,
    ]
    for d, methods in order.items():
        env = environment_line([r for m in methods for r in runs[d][m]])
        lines += [f"## {d}", "", conventions(results[d], methods, indices[d], env), ""]
        several = {m: [r.seed for r in runs[d][m]] for m in methods if len(runs[d][m]) > 1}
        if several:
            lines += ["Trained with several seeds: " + "; ".join(f"{m} ({', '.join(map(str, s))})"
                                                                  for m, s in several.items())
                      + ". Their cells are the mean ± std over every (tile, seed) value (the population std over "
                      "tiles × seeds); the Seeds table below separates the two spreads.", ""]
        lines += [*results_table(methods, results[d], winners(paired[d].leads), indices[d]), "",
                  f"LaTeX: [`tables/{d}_results.tex`](tables/{d}_results.tex)", ""]
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
        if multi_seed(runs[d]):
            lines += seeds_section(d, seed_rows(methods, runs[d]), _seed_lists(runs[d]))
        section = stats_section(d, paired[d], multi_seed(runs[d]))
        if section:
            section[-1:-1] = [f"LaTeX: [`tables/{d}_comparisons.tex`](tables/{d}_comparisons.tex)", ""]
        lines += section
        if subbands[d] is not None:
            lines += subband_section(d, subbands[d])
        lines += ablations_section(methods, results[d])
        source = trained_on(methods, results[d])
        if source is not None and source in results:
            lines += cross_scene_section(d, source, methods, results[d], results[source])
    if deploy:
        lines += ["## Deployment", "",
                  "Whole scenes sharpened by `bnnpan fuse` (params `deploy:`), Cloud-Optimized GeoTIFFs on the PAN "
                  "grid. Top: the whole scene (decimated); bottom: a detail at full resolution (outlined above).", ""]
        for name, method, fused, scene_dir in deploy:
            fig = deploy_figure(name, method, Path(fused), Path(scene_dir), fig_dir / f"deploy_{name}.png")
            written[f"deploy_{name}"] = fig
            lines += [f"- `{fused}`: {method}", "", f"![{name}: PAN, EXP and {method}](figures/deploy_{name}.png)",
                      ""]
    text = "\n".join(lines).rstrip() + "\n"
    written["summary"] = _text(reports_dir / "summary.md", text)
    return written


def _seed_lists(runs: Mapping[str, Sequence[Run]]) -> dict[str, list[int]]:
    return {m: [r.seed for r in rs] for m, rs in runs.items()}
