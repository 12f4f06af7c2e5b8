"""The one stage list: the only definition of the DAG (DVC and Snakemake are generated from it)."""

from bnnpan.pipeline.stages import Stage, build_stages, dvc_yaml, render_dvc_yaml

__all__ = ["Stage", "build_stages", "dvc_yaml", "render_dvc_yaml"]
