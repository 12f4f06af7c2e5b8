"""The report's markdown: the results table, the best-binary line, the ablation and sub-band sections.

Pure functions of the loaded inputs (:mod:`bnnpan.report.load`) that return lines of markdown; no
file is read or written here. Numbers are shown at a fixed precision per index
(:func:`decimals`: PSNR 2, SAM and ERGAS 3, the Q-type indices in [0, 1] 4); a value not computed
reads n/a. The figures use the same formatting (:func:`fmt`).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from bnnpan.report import ABLATION_PREFIX, FP_METHOD, PROPOSED
from bnnpan.report.load import COST, METRICS, OPTIONAL_METRICS, REDUCED_METRICS, num, setup, stat
from bnnpan.report.stats import (
    ALPHA,
    BEST_BINARY_INDICES,
    CONFIDENCE,
    HIGHER_IS_BETTER,
    LABELS,
    N_RESAMPLES,
    SEED,
    STATS_INDICES,
    DatasetStats,
    Lead,
    PairedDiff,
    min_attainable_p,
)
from bnnpan.report.subbands import SUBBANDS, Subbands, ratios_to_fp

DECIMALS = {"psnr": 2, "sam": 3, "ergas": 3}  # the Q-type indices (in [0, 1]): 4
# What each standard ablation switch of bnnpan changes (a variant not listed here is named as is).
ABLATION_LEGEND = {
    "no_bwtc": "plain binary conv instead of the wavelet unit (BWTC)",
    "no_fpstats": "sub-band units without the full-precision mean/std re-centring and rescaling",
    "no_ldpc": "no latent prior (LDPC off)",
    "oracle_prior": "the latent from the stage-1 encoder E1, which sees the ground truth "
                    "(an upper bound; reduced resolution only, so its full-resolution cells are n/a)",
    "no_cdc": "no channel-wise distribution calibration (CDC off)",
}


def decimals(key: str) -> int:
    return DECIMALS.get(key, 4)


def arrow(up: bool) -> str:
    return "↑" if up else "↓"


def fmt(v: float | None, key: str) -> str:
    if v is None:
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{decimals(key)}f}"


def _cell(mean: float | None, std: float | None, key: str) -> str:
    if mean is None:
        return "n/a"
    if std is None or not math.isfinite(mean):
        return fmt(mean, key)
    return f"{fmt(mean, key)} ± {fmt(std, key)}"


def claimed_winner(ld: Lead) -> str | None:
    """The method a table may mark as best on ``ld.key``: the leader, when its lead over the runner-up is
    significant (:attr:`bnnpan.report.stats.Lead.winner`) and visible at the shown precision; else None."""
    w, ru = ld.winner, ld.runner_up
    if w is None or ru is None:
        return None
    shown = [round(ld.means[m], decimals(ld.key)) if math.isfinite(ld.means[m]) else ld.means[m] for m in (w, ru)]
    return w if shown[0] != shown[1] else None


def winners(leads: dict[str, Lead]) -> dict[str, set[str]]:
    """Per index, the set of methods to mark as best (empty or one method)."""
    return {key: {w} if (w := claimed_winner(ld)) else set() for key, ld in leads.items()}


def _no_winner(ld: Lead) -> str:
    """Why ``ld`` names no winner: "tied within noise (n pairs)", or no per-tile values, or a tie at the shown
    precision."""
    d = ld.diff
    if d is None or d.n == 0:
        return "no paired per-tile values to test the lead"
    if ld.winner is not None:
        return "tied at the shown precision"
    return f"tied within noise ({d.n} pair{'s' if d.n != 1 else ''})"


def md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _ms(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.0f}" if float(v) >= 10 else f"{float(v):.1f}"


def _cost_cells(cost: dict[str, Any] | None) -> list[str]:
    """Params = binary/32 + FP (thousands); OPs = BOPs/64 + FLOPs (millions) at 64² and 256² inputs; the file
    sizes; the measured ms per test tile, packed 1-bit runtime / float simulation (evaluate's measurement)."""
    if not cost:
        return ["—", "—", "—", "—"]
    small, big, file = cost.get("64") or {}, cost.get("256") or {}, cost.get("file") or {}
    params = num(big.get("params_equiv"))
    ops = [num(c.get("ops")) for c in (small, big)]
    sizes = [num(file.get(k)) for k in ("packed_bytes", "fp32_bytes")]
    measured = cost.get("measured") or {}
    timing = (f"{_ms(measured.get('packed_ms'))} / {_ms(measured.get('float_ms'))}" if measured else "n/a")
    return ["n/a" if params is None else f"{params / 1e3:.1f}",
            " / ".join("n/a" if v is None else f"{v / 1e6:.1f}" for v in ops),
            " / ".join("n/a" if v is None else f"{v / 1e3:.1f}" for v in sizes), timing]


def results_table(methods: list[str], results: dict[str, dict[str, Any]], best: dict[str, set[str]],
                  indices: list[tuple[str, str, bool]] | None = None) -> list[str]:
    """The main table: a row per method, mean ± std per index of ``indices`` (default METRICS; ``best[key]`` in
    bold), then the cost columns."""
    indices = METRICS if indices is None else indices
    head = (["Method", "Kind"] + [f"{label} {arrow(up)}" for _, label, up in indices]
            + ["Params (K eq.)", "OPs (M) 64² / 256²", "packed / FP32 file (kB)", "ms/tile packed / float"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---", ":---"] + ["---:"] * (len(head) - 2)) + "|"]
    for m in methods:
        r = results[m]
        cells = [md(m), md(setup(r).get("kind", ""))]
        for key, _, _ in indices:
            c = _cell(*stat(r, key), key)
            cells.append(f"**{c}**" if m in best.get(key, ()) else c)
        cells += _cost_cells(r.get(COST))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ties_line(leads: dict[str, Lead]) -> str | None:
    """Under the main table: the columns without a bold mark and why ("tied within noise (2 pairs): PSNR dB,
    ..."); None when every column with two or more values has a winner. The pairs are (tile, seed) pairs."""
    groups: dict[str, list[str]] = {}
    for key, label, _ in [*METRICS, *OPTIONAL_METRICS]:
        if key not in leads:
            continue
        ld = leads[key]
        if ld.runner_up is not None and claimed_winner(ld) is None:
            groups.setdefault(_no_winner(ld), []).append(label)
    if not groups:
        return None
    return ("Columns without a bold mark (the leader's lead over the runner-up is not significant): "
            + "; ".join(f"{why}: {', '.join(labels)}" for why, labels in groups.items()) + ".")


def best_binary_line(st: DatasetStats) -> str | None:
    """"Best binary method: Q2n X (...), ERGAS ..." naming a binary network only where its lead over the
    runner-up is significant, else "Q2n tied within noise (n pairs): X 0.xxxx, runner-up Y 0.xxxx"."""
    if not st.binary:
        return None
    parts = []
    for key in BEST_BINARY_INDICES:
        ld, label = st.binary_leads[key], LABELS[key]
        if ld.leader is None:
            parts.append(f"{label} n/a")
            continue
        value = f"{md(ld.leader)} {fmt(ld.means[ld.leader], key)}"
        if ld.runner_up is None:
            only = "the only binary network" + (" with a value" if len(st.binary) > 1 else "")
            parts.append(f"{label} {value} ({only})")
            continue
        runner_up = f"runner-up {md(ld.runner_up)} {fmt(ld.means[ld.runner_up], key)}"
        if claimed_winner(ld) is not None:
            assert ld.diff is not None
            parts.append(f"{label} {value} ({runner_up}; Δ {_diff_text(ld.diff, key)}, {ld.diff.n} pairs)")
        else:
            parts.append(f"{label} {_no_winner(ld)}: {value}, {runner_up}")
    return "Best binary method: " + "; ".join(parts) + "."


def _signed(v: float, key: str) -> str:
    """A difference at one decimal more than the index's table precision, always signed."""
    return f"{v:+.{decimals(key) + 1}f}"


def _p(p: float | None) -> str:
    return "n/a" if p is None else "< 0.001" if p < 0.001 else f"{p:.3f}"


def _diff_text(d: PairedDiff, key: str) -> str:
    """"+0.00020 [-0.00010, +0.00050], p 0.500" (the note appended when there is one); "n/a (why)" without pairs."""
    if d.mean is None:
        return f"n/a ({d.note})"
    if d.ci is None and d.p is None:
        return f"{_signed(d.mean, key)} ({d.note})"
    ci = "n/a" if d.ci is None else f"{_signed(d.ci[0], key)}, {_signed(d.ci[1], key)}"
    text = f"{_signed(d.mean, key)} [{ci}], p {_p(d.p)}"
    return f"{text} ({d.note})" if d.note else text


def _diff_cell(d: PairedDiff | None, key: str) -> str:
    if d is None:
        return "n/a"
    text = _diff_text(d, key)
    return f"**{text}**" if d.significant else text


def _n_text(ns: list[int]) -> str:
    lo, hi = min(ns), max(ns)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def stats_section(dataset: str, st: DatasetStats, seeded: bool = False) -> list[str]:
    """The "Paired comparisons" section: each binary network against the leading binary network of each of
    Q2n, ERGAS, SAM and HQNR and against fp, bnnpan against each other binary network, with the figure; [] when
    there is nothing to compare. ``seeded``: some method has several seeds (the text says how the (tile, seed)
    pairs are formed)."""
    if not st.due:
        return []
    diffs = [d for group in (st.vs_leader, st.vs_fp) for per in group.values() for d in per.values()]
    n_rr = [d.n for g in (st.vs_leader, st.vs_fp) for k, per in g.items() if k in REDUCED_METRICS
            for d in per.values() if d.n]
    n_fr = [d.n for g in (st.vs_leader, st.vs_fp) for k, per in g.items() if k not in REDUCED_METRICS
            for d in per.values() if d.n]
    pairs = ", ".join(f"{_n_text(ns)} {what}" for ns, what in ((n_rr, "reduced-resolution (Q2n, ERGAS, SAM)"),
                                                               (n_fr, "full-resolution (HQNR)")) if ns)
    n_max = max((d.n for d in diffs), default=0)
    limit = ""
    if n_max == 1:
        limit = " With one pair there is no interval and no test: no difference here can be significant."
    elif n_max >= 2 and min_attainable_p(n_max) >= ALPHA:
        limit = (f" With {n_max} pair{'s' if n_max != 1 else ''} the signed-rank test cannot go below "
                 f"p = {min_attainable_p(n_max):.3g}, so no difference here can be significant (that needs at least "
                 f"{_min_pairs()} pairs).")
    lines = [
        "### Paired comparisons of the binary networks",
        "",
        "Per test tile, Δ = method − reference (pairs keyed by (tile, training seed)"
        + ("; one seed per method, so pairs = tiles" if not seeded else
           ": two networks trained with the same S seeds share tiles × S pairs, a network and a single-run "
           "method only its seed-0 run's tiles")
        + "; Q2n, ERGAS and SAM over the reduced-resolution tiles, HQNR over the full-resolution "
        f"ones). Each cell: the mean Δ, its {CONFIDENCE * 100:g} % bootstrap confidence interval "
        f"(`scipy.stats.bootstrap`, paired, percentile, {N_RESAMPLES} resamples, seed {SEED}) and the "
        "two-sided Wilcoxon signed-rank p-value (`scipy.stats.wilcoxon`). ↑: Δ > 0 favours the method, "
        f"↓: Δ < 0 does. **Bold**: significant (p < {ALPHA:g} and the interval excludes 0)."
        + (f" Pairs: {pairs}." if pairs else "") + limit,
        "",
    ]
    cols = [(key, LABELS[key], HIGHER_IS_BETTER[key]) for key in STATS_INDICES]
    if len(st.binary) >= 2:
        leaders = {key: st.binary_leads[key].leader for key in STATS_INDICES}
        head = ["Method"] + [f"{label} {arrow(up)} vs {md(leaders[k]) if leaders[k] else 'n/a'}"
                             for k, label, up in cols]
        lines += ["Against the leading binary network of each index (the best mean; Δ = method − leader):", "",
                  "| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * len(cols)) + "|"]
        for m in st.binary:
            cells = [md(m)] + ["(leader)" if leaders[k] == m else _diff_cell(st.vs_leader.get(k, {}).get(m), k)
                               for k, _, _ in cols]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if st.has_fp:
        head = ["Method"] + [f"{label} {arrow(up)}" for _, label, up in cols]
        lines += [f"Against full precision (Δ = method − {FP_METHOD}):", "",
                  "| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * len(cols)) + "|"]
        for m in st.binary:
            lines.append("| " + " | ".join([md(m)] + [_diff_cell(st.vs_fp.get(k, {}).get(m), k) for k, _, _ in cols])
                         + " |")
        lines.append("")
    if st.vs_proposed:
        head = ["Baseline"] + [f"{label} {arrow(up)}" for _, label, up in cols]
        lines += [f"The proposed method against each binary baseline (Δ = {PROPOSED} − baseline; ↑/↓: Δ > 0 / Δ < 0 "
                  f"favours {PROPOSED}):", "",
                  "| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * len(cols)) + "|"]
        for m in (b for b in st.binary if b != PROPOSED):
            lines.append("| " + " | ".join([md(m)] + [_diff_cell(st.vs_proposed.get(k, {}).get(m), k)
                                                      for k, _, _ in cols]) + " |")
        lines.append("")
    lines += [f"![{dataset}: paired differences with {CONFIDENCE * 100:g} % confidence intervals]"
              f"(figures/{dataset}_stats.png)", ""]
    return lines


def _min_pairs() -> int:
    """The fewest non-zero differences with which the signed-rank test can reach p < ALPHA."""
    n = 1
    while min_attainable_p(n) >= ALPHA:
        n += 1
    return n


def _plain(mean: float | None, key: str) -> str:
    return "n/a" if mean is None else fmt(mean, key)


def _delta(v: float | None, ref: float | None, key: str) -> str:
    if v is None or ref is None or not (math.isfinite(v) and math.isfinite(ref)):
        return "n/a"
    return f"{v - ref:+.{decimals(key)}f}"


def ablations_section(methods: list[str], results: dict[str, dict[str, Any]]) -> list[str]:
    """The "Ablations" section: bnnpan, then each ``bnnpan_*`` variant in evaluation order; [] without them."""
    variants = [m for m in methods if m.startswith(ABLATION_PREFIX)]
    if PROPOSED not in methods or not variants:
        return []
    cols = [("q2n", "Q2n", True), ("ergas", "ERGAS", False), ("sam", "SAM °", False), ("psnr", "PSNR dB", True),
            ("d_s", "D_s", False), ("hqnr", "HQNR", True)]
    head = ["Variant"] + [f"{label} {arrow(up)}" for _, label, up in cols] + ["OPs (M) 256²", "ΔQ2n", "ΔERGAS"]
    ref = results[PROPOSED]
    legend = []
    for m in variants:
        switch = m[len(ABLATION_PREFIX):]
        what = ABLATION_LEGEND.get(switch, "a user-defined variant (see its configuration)")
        legend.append(f"`{md(switch)}`: {what}")
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
        cells = [md(m)] + [_plain(stat(r, key)[0], key) for key, _, _ in cols]
        ops = num(((r.get(COST) or {}).get("256") or {}).get("ops"))
        cells.append("—" if not r.get(COST) else "n/a" if ops is None else f"{ops / 1e6:.1f}")
        if m == PROPOSED:
            cells += ["(ref.)", "(ref.)"]
        else:
            cells += [_delta(stat(r, k)[0], stat(ref, k)[0], k) for k in ("q2n", "ergas")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


HOW_TO_READ = """\
## How to read this report

Each dataset has one table: a row per method, a column per quality index, each cell the
**mean ± std over the test tiles** (the population std; for a network trained with several seeds,
over every (tile, seed) value: tiles × seeds values, and a "Seeds" table separates the spread over
seeds from the spread over tiles); ↑ means higher is better, ↓ lower is better. The best value
of a column is in **bold** only when its lead over the runner-up is significant, tested on the
paired per-tile values (Wilcoxon signed-rank p < 0.05 and a 95 % bootstrap confidence interval of
the mean difference that excludes 0) and visible at the shown precision; a line under the table
names the columns without a winner ("tied within noise (n pairs)": n (tile, seed) pairs are too
few, or the lead is within the tile-to-tile spread).
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
packed 8 per byte against the FP32 state_dict; classical methods show —. Beside that theoretical
cost, "ms/tile" is measured: the milliseconds per reduced-resolution test tile of the network with
its binary convs on the packed 1-bit kernels (XNOR + popcount) / on the float simulation, timed by
`evaluate` on one tile, interleaved, median of 5, at the stage's thread count (in `metrics.json`,
`network_cost.measured`). A measurement on the machine that ran the DAG, not a property of the
method: it changes from run to run (`python bench/infer.py` compares the runtimes more carefully);
per-tile fusion times of the whole test set are in each method's `timing.json` and MLflow run. Under each table, "Best
binary method" names the binary network that ranks first on Q2n and on ERGAS when its lead over
the runner-up is significant by the same test, and says "tied within noise (n pairs)" otherwise
(the bold marks are usually won by the full-precision `fp`; the `bnnpan_*` ablations are left out
of that ranking but stay in the table). Then come a chart of the indices (dot = mean, bar = ± std
over the (tile, seed) values, each index on its own fitted axis; a red dot = the significant winner)
and a visual comparison of one test tile (the first seed's run of each network): the RGB composites
share the ground truth's 2-98 % stretch, an enlarged crop (the window of highest PAN gradient
energy, outlined on the full view) shows the details, and the error maps (|fused - GT| averaged
over bands, in DN) share one colour scale. The conventions line of each dataset also says on which
CPU, library versions, threads and device the compared runs were evaluated, and warns when they
differ (float results may then differ in the last digits). The results, paired-comparisons and seeds
tables are also written as LaTeX (booktabs) in `tables/`, with the same bold marks;
`metrics_tiles.csv` has every per-(tile, seed) value behind the tables.
A "Paired comparisons" section gives, for every binary network against the leading binary network
of each of Q2n, ERGAS, SAM and HQNR and against `fp`, the mean per-tile difference, its 95 %
bootstrap confidence interval and the Wilcoxon p-value, with a figure of the intervals (reduced-
and full-resolution test tiles are different sets: HQNR pairs over the full-resolution ones).
Where `fp`, `bnn` or `bnnpan` was evaluated, a sub-band
section splits their error by a one-level Haar wavelet transform into LL (smooth content) and
LH/HL/HH (details) to test the premise that binarization loses the details relatively more; where
`bnnpan` and its `bnnpan_*` variants were evaluated, an ablation table gives each variant's change
of Q2n and ERGAS against `bnnpan`. A cell without a value (not computed, e.g. the full-resolution
indices of `bnnpan_oracle_prior`, whose prior needs the ground truth) reads n/a.
"""


def seeds_section(dataset: str, rows: dict[str, dict[str, Any]], seeds: dict[str, list[int]]) -> list[str]:
    """The "Seeds" table: per network (``rows``: :func:`bnnpan.report.runs.seed_rows`; ``seeds``: each network's
    training seeds), for each of Q2n, ERGAS, SAM and HQNR the mean ± std over seeds of the per-seed tile means
    (number of seeds), and the mean within-seed std over tiles; [] without networks."""
    if not rows:
        return []
    from bnnpan.report.runs import SEED_INDICES

    head = ["Method", "Seeds"]
    for key in SEED_INDICES:
        head += [f"{LABELS[key]} {arrow(HIGHER_IS_BETTER[key])} over seeds", f"{LABELS[key]} std over tiles"]
    lines = [
        "### Seeds",
        "",
        "Each network trained with several seeds is one run per seed. Per index: the **mean ± std over seeds of "
        "the per-seed tile means** (the sample std, ddof = 1, over the seeds; the number of seeds in brackets): "
        "how much the result moves with the training seed; then the **mean within-seed std over tiles** (each "
        "run's population std over its test tiles, averaged over the seeds): how much it moves from tile to "
        "tile. Q2n, ERGAS and SAM over the reduced-resolution tiles, HQNR over the full-resolution ones.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join([":---", ":---"] + ["---:"] * (len(head) - 2)) + "|",
    ]
    for m, cells in rows.items():
        line = [md(m), ", ".join(str(x) for x in seeds.get(m, [0]))]
        for key in SEED_INDICES:
            c = cells[key]
            line += [seed_cell_text(c, key), _plain(c.within, key)]
        lines.append("| " + " | ".join(line) + " |")
    return lines + ["", f"LaTeX: [`tables/{dataset}_seeds.tex`](tables/{dataset}_seeds.tex)", ""]


def seed_cell_text(c: Any, key: str) -> str:
    """"0.9123 ± 0.0012 (3)"; the std n/a with one seed; "n/a (0)" without a value."""
    if c.mean is None:
        return f"n/a ({c.n})"
    return f"{_cell(c.mean, c.std, key) if c.std is not None else fmt(c.mean, key) + ' ± n/a'} ({c.n})"


def tile_counts(methods: list[str], results: dict[str, dict[str, Any]]) -> str:
    counts = {}
    for m in methods:
        n = setup(results[m]).get("n_tiles") or {}
        counts[m] = (n.get("rr"), n.get("fr"))
    distinct = set(counts.values())
    if len(distinct) == 1:
        rr, fr = distinct.pop()
        return f"Test tiles: {rr} at reduced resolution, {fr} at full resolution."
    per = "; ".join(f"{md(m)}: {rr} / {fr}" for m, (rr, fr) in counts.items())
    return f"Test tiles (reduced / full resolution; they differ between methods, compare with care): {per}."


def conventions(results: dict[str, dict[str, Any]], methods: list[str],
                indices: list[tuple[str, str, bool]] | None = None, environment: str = "") -> str:
    """The dataset's conventions line: sensor, ratio, bands, DN scale, PSNR peak, border cut, block size; which
    D_s / HQNR is which when the ``_mtf`` variants are among ``indices``; then the ``environment`` line of the
    compared runs (:func:`bnnpan.report.runs.environment_line`)."""
    info = setup(results[methods[0]])
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
    peaks = {_g(setup(results[m]).get("psnr_peak")) for m in methods}
    note = "" if len(peaks) <= 1 else f" (warning: the methods used different PSNR peaks: {sorted(peaks)})"
    text = "Conventions: " + "; ".join(bits) + "." + note
    optional = [label for key, label, _ in OPTIONAL_METRICS if any(k == key for k, _, _ in indices or [])]
    if optional:
        text += (" D_s and HQNR are the toolbox's (D_s's PAN_L is the bicubic shrink of the PAN, protocol.md); "
                 + " and ".join(optional) + " use an MTF-filtered, decimated PAN_L, as this dataset's "
                 "reduced-resolution inputs are made.")
    if environment:
        text += " " + environment
    return text


def _g(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(int(f)) if f.is_integer() else f"{f:g}"


def scenes(manifest: dict[str, Any]) -> list[str]:
    lines = []
    for s in manifest.get("scenes", []):
        name = s.get("name", "?")
        lic = s.get("licence") or "licence not recorded"
        att = s.get("attribution") or "attribution not recorded"
        role = f" (role: {s['role']})" if s.get("role") else ""
        lines.append(f"- `{name}`{role}: {att}; licence: {lic}")
    return lines or ["- (the manifest lists no scenes)"]


def _premise(sb: Subbands) -> str:
    """One sentence: does bnn lose the detail bands relatively more than fp on this data (computed)."""
    claim = ("The paper's premise (binarization degrades the detail bands LH/HL/HH relatively more than "
             "LL, against full precision)")
    if FP_METHOD not in sb.methods or "bnn" not in sb.methods:
        present = ", ".join(sb.methods)
        return f"{claim} cannot be tested on this data: it needs both fp and bnn (present: {present})."
    r = ratios_to_fp(sb, "bnn")
    if r["detail"] is None or r["LL"] is None:
        return f"{claim} cannot be tested on this data: fp has a zero error energy in some sub-band."
    verdict = "holds" if r["detail"] > r["LL"] else "does not hold"
    text = (f"{claim} **{verdict}** on this data: the bnn / fp error-energy ratio is {r['detail']:.3f} on average "
            f"over LH/HL/HH against {r['LL']:.3f} on LL.")
    if PROPOSED in sb.methods:
        q = ratios_to_fp(sb, PROPOSED)
        if q["detail"] is not None and q["LL"] is not None:
            text += f" For bnnpan / fp: {q['detail']:.3f} over LH/HL/HH against {q['LL']:.3f} on LL."
    return text


def _energy(v: float) -> str:
    """Whole DN² between 1000 and 10^7 (no exponent: easier to compare in a column), else 4 significant digits."""
    return f"{v:.0f}" if 1e3 <= abs(v) < 1e7 else f"{v:.4g}"


def subband_section(dataset: str, sb: Subbands) -> list[str]:
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
        lines.append(f"| {md(m)} | " + " | ".join(cells) + " |")
    if FP_METHOD in sb.methods:
        for m in sb.methods:
            if m == FP_METHOD:
                continue
            r = ratios_to_fp(sb, m)
            cells = ["n/a" if r[k] is None else f"{r[k]:.3f}" for k in (*SUBBANDS, "total")]
            lines.append(f"| {md(m)} / fp | " + " | ".join(cells) + " |")
    lines += ["", _premise(sb), "", f"![{dataset}: sub-band error energy](figures/{dataset}_subbands.png)", ""]
    return lines


def metrics_frame(order: dict[str, list[str]], results: dict[str, dict[str, dict[str, Any]]],
                  optional: list[str] | None = None) -> pd.DataFrame:
    """``metrics.csv``: one row per (dataset, method) in ``order``: kind, mean and std of every index (those of
    METRICS, then the optional indices named in ``optional``: empty for a dataset without them), the cost
    figures of networks (``<figure>_<64|256|file>``), the tile counts and the number of training seeds (the
    mean and std of a method with several are over every (tile, seed) value)."""
    index_keys = [k for k, _, _ in METRICS] + [k for k, _, _ in OPTIONAL_METRICS if k in (optional or [])]
    rows = []
    for d, methods in order.items():
        for m in methods:
            r = results[d][m]
            row: dict[str, Any] = {"dataset": d, "method": m, "kind": setup(r).get("kind")}
            for key in index_keys:
                row[f"{key}_mean"], row[f"{key}_std"] = stat(r, key)
            for size, c in (r.get(COST) or {}).items():
                keys = ("packed_bytes", "fp32_bytes") if size == "file" else (
                    "params_equiv", "binary_params", "fp_params", "bytes", "bops", "flops", "ops")
                for k in keys:
                    row[f"{k}_{size}"] = num((c or {}).get(k))
            n = setup(r).get("n_tiles") or {}
            row["n_tiles_reduced"] = n.get("rr")
            row["n_tiles_full"] = n.get("fr")
            row["n_seeds"] = len(setup(r).get("seeds") or [0])
            rows.append(row)
    return pd.DataFrame(rows)


#: the indices of the cross-scene table (reduced resolution: fidelity; HQNR: the full-resolution view)
CROSS_INDICES = ("q2n", "ergas", "sam", "hqnr")


def trained_on(methods: list[str], results: dict[str, dict[str, Any]]) -> str | None:
    """The dataset the networks of a test-only dataset were trained on (``setup.trained_on`` of its network
    runs, when that is another dataset); None for a dataset that scores its own networks."""
    here = {setup(results[m]).get("dataset") for m in methods}
    src = {setup(results[m]).get("trained_on") for m in methods if setup(results[m]).get("kind") == "network"}
    src -= {None} | here
    return sorted(src)[0] if src else None


def _ranks(methods: list[str], results: dict[str, dict[str, Any]], key: str) -> dict[str, int]:
    up = HIGHER_IS_BETTER[key]
    vals = {m: stat(results[m], key)[0] for m in methods}
    ranked = sorted((m for m in methods if vals[m] is not None and math.isfinite(vals[m])),
                    key=lambda m: (-vals[m] if up else vals[m], methods.index(m)))
    return {m: i + 1 for i, m in enumerate(ranked)}


def cross_scene_section(dataset: str, source: str, methods: list[str], results: dict[str, dict[str, Any]],
                        source_results: dict[str, dict[str, Any]]) -> list[str]:
    """In-scene against cross-scene: every method evaluated on both ``source`` (where the networks were trained
    and tested on held-out tiles of the same scenes) and ``dataset`` (scenes no network saw), side by side.

    Per index of :data:`CROSS_INDICES`: the mean on each and the change (cross - in), and the rank of the
    method among those shown on Q2n in each, so a method that only does well on the scene it was trained on
    stands out. Means over different tiles: no paired test is possible between the two columns.
    """
    both = [m for m in methods if m in source_results]
    if not both:
        return []
    head = ["method"]
    for k in CROSS_INDICES:
        lab = f"{LABELS[k]} {arrow(HIGHER_IS_BETTER[k])}"
        head += [f"{lab} in-scene", f"{lab} cross-scene", "Δ"]
    head += ["Q2n rank in → cross"]
    r_in, r_x = _ranks(both, source_results, "q2n"), _ranks(both, results, "q2n")
    out = [f"### Cross-scene: trained on {source}, tested on {dataset}", "",
           f"The networks were trained on `{source}` and never saw the scenes of `{dataset}`; the classical methods "
           f"need no training. In-scene: the held-out test tiles of `{source}`; cross-scene: every test tile of "
           f"`{dataset}` (means over other tiles, so no paired test between the two). A network that loses ranks "
           "here has learnt its training scene more than the sensor.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in both:
        row = [md(m)]
        for k in CROSS_INDICES:
            a, b = stat(source_results[m], k)[0], stat(results[m], k)[0]
            row += [_plain(a, k), _plain(b, k), _delta(b, a, k)]
        row.append(f"{r_in.get(m, 'n/a')} → {r_x.get(m, 'n/a')}")
        out.append("| " + " | ".join(row) + " |")
    return [*out, ""]
