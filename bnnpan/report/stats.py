"""Paired statistics over the test tiles: is a difference between two methods more than noise?

Two methods scored on the same test tiles give paired per-tile values of an index; the question is
whether their difference is consistent across the tiles or within the tile-to-tile spread. For the
values ``a`` of a method and ``b`` of a reference on the pairs they share, keyed by ``(tile, seed)``
(the ``seed`` column of ``tiles.csv``: a network trained with S seeds has S values per tile, so two such
networks share tiles x S pairs, while a classical method, one run of seed 0, pairs with a network's seed-0
run only), with the differences ``d = a - b``:

* the **mean difference** ``mean(d)``, in the index's unit;
* its **95 % bootstrap confidence interval**: :func:`scipy.stats.bootstrap` on ``(a, b)`` with
  ``paired=True`` (the pairs are resampled together), the percentile method, 9999 resamples and a
  fixed seed, so the report is the same on every run of the same inputs;
* the **Wilcoxon signed-rank p-value** (:func:`scipy.stats.wilcoxon`, two-sided; zero differences are
  dropped, the ``"wilcox"`` convention; exact for small samples). It needs no normality but many
  pairs: with ``n`` non-zero differences the smallest two-sided p it can give is ``2 / 2^n``
  (:func:`min_attainable_p`), 0.5 for 2 pairs, so fewer than 6 pairs can never reach p < 0.05.

A difference is **significant** when p < 0.05 *and* the interval excludes 0. The cases the scipy
calls do not cover are explicit, never an exception: no pairs (everything n/a), one pair (the mean
only: no interval, no test), every difference zero (interval [0, 0], p = 1).

Direction: PSNR, Q2n, SCC, Q, HQNR and QNR are higher-is-better, SAM, ERGAS, D_λ and D_s
lower-is-better (:data:`bnnpan.report.load.METRICS`); :class:`Lead` and :func:`favours` read the
sign of a difference with it. :func:`dataset_stats` gathers what the report shows per dataset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from bnnpan.report import FP_METHOD, PROPOSED, comparisons_due
from bnnpan.report.load import ALL_METRICS, METRICS, binary_methods, per_tile, stat

PairKey = tuple[int, int]  # (tile, seed)

ALPHA = 0.05
CONFIDENCE = 0.95
N_RESAMPLES = 9999
SEED = 0
#: the indices of the paired comparisons of the binary networks, in table order
STATS_INDICES = ("q2n", "ergas", "sam", "hqnr")
#: the indices of the "Best binary method" line
BEST_BINARY_INDICES = ("q2n", "ergas")
HIGHER_IS_BETTER = {k: up for k, _, up in ALL_METRICS}
LABELS = {k: label for k, label, _ in ALL_METRICS}


@dataclass(frozen=True)
class PairedDiff:
    """The paired difference ``method - reference`` of one index over the pairs both have."""

    n: int  # pairs used (both values present)
    mean: float | None  # mean difference; None without pairs
    ci: tuple[float, float] | None  # bootstrap confidence interval of the mean difference
    p: float | None  # two-sided Wilcoxon signed-rank p-value
    note: str = ""  # why ci / p are n/a or p is 1 without a test; "" otherwise

    @property
    def significant(self) -> bool:
        """p < ALPHA and the confidence interval excludes 0."""
        return (self.p is not None and self.p < ALPHA and self.ci is not None
                and (self.ci[0] > 0 or self.ci[1] < 0))

    @property
    def sign(self) -> int:
        """+1 (significantly above 0), -1 (significantly below 0) or 0 (not significant)."""
        if not self.significant:
            return 0
        assert self.ci is not None
        return 1 if self.ci[0] > 0 else -1


def min_attainable_p(n: int) -> float:
    """The smallest two-sided p the exact signed-rank test can give with ``n`` non-zero differences, ``2/2^n``
    (all of one sign); 1 for n <= 1."""
    return 1.0 if n <= 1 else min(1.0, 2.0 ** (1 - n))


def _mean_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a - b, axis=axis)


def paired_difference(
    values: Mapping[PairKey, float],
    reference: Mapping[PairKey, float],
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> PairedDiff:
    """Mean, bootstrap CI and Wilcoxon p of ``values - reference`` over the ``(tile, seed)`` keys both have.

    Keys present in only one mapping, and NaN values, are left out. The pairs are taken in sorted key
    order, so the result does not depend on the mappings' order. See the module docstring for the
    statistics and the cases without a test.
    """
    keys = sorted(k for k in set(values) & set(reference)
                  if math.isfinite(values[k]) and math.isfinite(reference[k]))
    n = len(keys)
    if n == 0:
        return PairedDiff(0, None, None, None, "no common pairs")
    a = np.array([values[k] for k in keys], dtype=np.float64)
    b = np.array([reference[k] for k in keys], dtype=np.float64)
    d = a - b
    mean = float(d.mean())
    if n == 1:
        return PairedDiff(1, mean, None, None, "one pair: no interval, no test")
    if not np.any(d):
        return PairedDiff(n, 0.0, (0.0, 0.0), 1.0, f"all {n} differences are zero")
    boot = sps.bootstrap((a, b), _mean_diff, paired=True, vectorized=True, n_resamples=n_resamples,
                         confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    lo, hi = (float(x) for x in (boot.confidence_interval.low, boot.confidence_interval.high))
    p = float(sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    return PairedDiff(n, mean, (lo, hi), p)


def _paired(values: Mapping[PairKey, float] | None, reference: Mapping[PairKey, float] | None) -> PairedDiff:
    """:func:`paired_difference`, or "no per-tile values" when either method has none for the index."""
    if values is None or reference is None:
        return PairedDiff(0, None, None, None, "no per-tile values")
    return paired_difference(values, reference)


def favours(diff: PairedDiff, higher_is_better: bool) -> int:
    """+1 when ``diff`` (method - reference) is significantly better for the method, -1 when significantly
    better for the reference, 0 when tied within noise."""
    return diff.sign if higher_is_better else -diff.sign


@dataclass(frozen=True)
class Lead:
    """The best and second-best method on one index (by mean) and the paired test of the lead."""

    key: str
    ranking: list[str]  # methods with a mean, best first (ties: the earlier method first)
    means: dict[str, float]
    diff: PairedDiff | None  # ranking[0] - ranking[1]; None with fewer than two ranked methods

    @property
    def leader(self) -> str | None:
        return self.ranking[0] if self.ranking else None

    @property
    def runner_up(self) -> str | None:
        return self.ranking[1] if len(self.ranking) > 1 else None

    @property
    def winner(self) -> str | None:
        """The leader when its lead over the runner-up is significant and in its favour, else None."""
        if self.diff is None or favours(self.diff, HIGHER_IS_BETTER[self.key]) <= 0:
            return None
        return self.leader


def lead(key: str, methods: list[str], means: Mapping[str, float | None],
         values: Mapping[str, Mapping[PairKey, float] | None]) -> Lead:
    """Rank ``methods`` by their mean of index ``key`` (its direction) and test the leader against the runner-up
    on the per-tile ``values`` (``{method: {(tile, seed): value}}``; None or missing: no per-tile values)."""
    up = HIGHER_IS_BETTER[key]
    ranked = {m: float(means[m]) for m in methods if means.get(m) is not None and not math.isnan(float(means[m]))}
    order = sorted(ranked, key=lambda m: (-ranked[m] if up else ranked[m], methods.index(m)))
    diff = None
    if len(order) >= 2:
        diff = _paired(values.get(order[0]), values.get(order[1]))
    return Lead(key, order, ranked, diff)


@dataclass
class DatasetStats:
    """What the report shows of the paired statistics of one dataset."""

    binary: list[str]  # the binary networks, in table order
    has_fp: bool
    pairs: dict[str, dict[str, dict[PairKey, float] | None]]  # index -> method -> per-tile values
    leads: dict[str, Lead]  # every index shown (METRICS and the optional ones present), over every method: bold
    binary_leads: dict[str, Lead]  # STATS_INDICES (BEST_BINARY_INDICES among them), over the binary networks
    vs_leader: dict[str, dict[str, PairedDiff]] = field(default_factory=dict)  # index -> method -> (m - leader)
    vs_fp: dict[str, dict[str, PairedDiff]] = field(default_factory=dict)  # index -> method -> (m - fp)
    # index -> baseline -> (bnnpan - baseline): the proposed method against every other binary network
    vs_proposed: dict[str, dict[str, PairedDiff]] = field(default_factory=dict)

    @property
    def due(self) -> bool:
        """Whether the dataset gets the comparisons section and figure (:func:`bnnpan.report.comparisons_due`)."""
        return comparisons_due(self.binary, self.has_fp)


def dataset_stats(methods: list[str], results: dict[str, dict[str, Any]],
                  tiles: Mapping[str, pd.DataFrame | None],
                  indices: list[tuple[str, str, bool]] | None = None) -> DatasetStats:
    """The leads of every index of ``indices`` (default :data:`METRICS`) over all methods, and every binary
    network against the leading binary network of each of STATS_INDICES and against ``fp`` (when ``fp`` was
    evaluated); and ``bnnpan`` (the proposed method, when evaluated) against every other binary network."""
    indices = METRICS if indices is None else indices
    binary = binary_methods(methods, results)
    has_fp = FP_METHOD in methods
    pairs = {key: {m: per_tile(tiles.get(m), key) for m in methods} for key, _, _ in indices}
    means = {key: {m: stat(results[m], key)[0] for m in methods} for key, _, _ in indices}
    leads = {key: lead(key, methods, means[key], pairs[key]) for key, _, _ in indices}
    binary_leads = {key: lead(key, binary, means[key], pairs[key]) for key in STATS_INDICES}
    out = DatasetStats(binary, has_fp, pairs, leads, binary_leads)
    for key in STATS_INDICES:
        leader = binary_leads[key].leader
        if leader is not None and len(binary) >= 2:
            out.vs_leader[key] = {m: _paired(pairs[key][m], pairs[key][leader]) for m in binary if m != leader}
        if has_fp:
            out.vs_fp[key] = {m: _paired(pairs[key][m], pairs[key][FP_METHOD]) for m in binary}
        if PROPOSED in binary and len(binary) >= 2:
            out.vs_proposed[key] = {m: _paired(pairs[key][PROPOSED], pairs[key][m]) for m in binary if m != PROPOSED}
    return out
