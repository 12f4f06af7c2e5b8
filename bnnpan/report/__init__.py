"""The report stage: tables and figures for every evaluated method.

Modules, by responsibility: :mod:`~bnnpan.report.load` reads what ``bnnpan evaluate`` and
``bnnpan prepare`` wrote (with clear errors), :mod:`~bnnpan.report.runs` combines a method's training
seeds and compares the runs' environments, :mod:`~bnnpan.report.subbands` the sub-band error
analysis, :mod:`~bnnpan.report.stats` the paired statistics over the test tiles,
:mod:`~bnnpan.report.tables` the markdown, :mod:`~bnnpan.report.latex` the LaTeX tables,
:mod:`~bnnpan.report.figures` the matplotlib figures,
and :mod:`~bnnpan.report.build` the entry point that ties them together.

Constants shared with the stage list live here (importing them does not load matplotlib).
"""

#: methods whose per-sub-band error energy the report draws (fp vs its plain-BNN twin vs BNNPan)
SUBBAND_METHODS = ("fp", "bnn", "bnnpan")
#: the full-precision network (the upper bound; not a binary method)
FP_METHOD = "fp"
#: the proposed network, and the name prefix of its ablation variants (``bnnpan_no_ldpc``, ...)
PROPOSED = "bnnpan"
ABLATION_PREFIX = "bnnpan_"


def is_binary(method: str, network: bool) -> bool:
    """Whether ``method`` is a binary network: a network, not ``fp`` and not a ``bnnpan_*`` ablation."""
    return network and method != FP_METHOD and not method.startswith(ABLATION_PREFIX)


def comparisons_due(binary: list[str], has_fp: bool) -> bool:
    """Whether a dataset gets the paired-statistics section and its ``<dataset>_stats.png`` figure: there is
    something to compare, two binary networks (each against the leader) or one and ``fp``."""
    return len(binary) >= 2 or (len(binary) >= 1 and has_fp)
