# The Snakemake front end of the bnnpan DAG. The rules are NOT written here: they are
# built from the one stage list in bnnpan/pipeline/stages.py (see workflow/rules/stages.smk),
# the same list dvc.yaml is generated from. Run: `snakemake --profile profiles/default`
# (or `make run`); on a cluster: `snakemake --profile profiles/slurm`.
configfile: "params.yaml"


include: "workflow/rules/stages.smk"


# The default target: every stage's outputs.
rule all:
    default_target: True
    input:
        ALL_OUTPUTS,
