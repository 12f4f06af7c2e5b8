# Snakemake rules built from bnnpan's stage list (bnnpan/pipeline/stages.py).
# Each rule is defined inside a function called once per stage: a `rule:` written directly
# in a `for` loop binds the loop variable late, so every rule would run the last stage's
# command. Every rule runs exactly the command dvc.yaml runs for the same stage.

import sys

from bnnpan.config import ConfigError, validate_params
from bnnpan.pipeline import build_stages

# `config` is params.yaml (configfile in the Snakefile), validated like everywhere else. A params error
# ends the run here, before any job starts or any output is touched, with the same one-line message as
# the CLI (naming the file and the key) instead of a traceback into this file.
try:
    _STAGES = build_stages(validate_params(config, ", ".join(map(str, workflow.configfiles)) or "params.yaml"))
except ConfigError as _e:
    print(f"error: {_e}", file=sys.stderr)
    sys.exit(2)
ALL_OUTPUTS = [o for s in _STAGES for o in (*s.outs, *s.metrics, *s.plots)]


def _stage_rule(stage):
    # Directories in the repo (code) and outputs of other stages are both plain inputs.
    rule:
        name:
            stage.name
        input:
            # Order-only deps: Snakemake ignores their mtimes. For the params check that is all of its deps: the
            # Snakefile validates params.yaml when it loads (above), and a check job pending on a params edit would
            # hide the edit from the params rerun trigger of every job below it. For the others it is the check's stamp.
            [ancient(d) if d in stage.order_only else d for d in stage.deps],
        output:
            [directory(o) if o in stage.dirs else o for o in (*stage.outs, *stage.metrics, *stage.plots)],
        params:
            # Not volatile: a digest of the params.yaml values this stage depends on, so
            # Snakemake re-runs the rule when one changes (rerun-trigger "params"), like DVC.
            digest=stage.param_digest,
        log:
            f"logs/{stage.name}.log",
        # the torch threads the stage uses (params' `threads`; null: every core), so Snakemake runs as many
        # stages at once as the cores hold
        threads: stage.threads or workflow.cores
        priority: stage.priority
        # the params check runs on the submit host under a cluster executor (Stage.local)
        localrule: stage.local
        resources:
            **stage.resources,
        shell:
            stage.shell + " > {log} 2>&1"


for _s in _STAGES:
    _stage_rule(_s)
