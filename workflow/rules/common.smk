# Helpers and validation shared by the rules. Nothing here has side effects at parse time:
# SLURM jobs re-read the Snakefile.

import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cm.config import ConfigError, check_params, load_yaml
from cm.method_names import MERGE_ONLY, evaluated_methods
from cm.pipeline import CODE, RESOURCES, stage_params, train_processes
from cm.runlock import FolderBusyError, claim, stale_snakemake_lock

# `--config 'seeds=[0,1,2]'` arrives as strings: Snakemake parses lists with YAML's BaseLoader.
# Negative ones too, so that the schema names the value's range rather than its type.
if isinstance(config.get("seeds"), list):
    config["seeds"] = [int(s) if isinstance(s, str) and s.lstrip("+-").isdigit() else s for s in config["seeds"]]

# One clear message for a configuration mistake, before any job is scheduled. Snakemake read the
# files with plain YAML, which keeps the last of a duplicated key: read them again as the CLI does.
try:
    for configfile_path in workflow.configfiles:
        load_yaml(configfile_path)
    config.update(check_params(config))
except ConfigError as err:
    raise WorkflowError(str(err)) from None
validate(config, "../schemas/params.schema.yaml")

# A second run in the same folder is refused before it looks at any file (jobs re-reading the
# Snakefile on a cluster are part of the run that holds the lock, so they skip this).
if workflow.is_main_process:
    try:
        claim()
    except FolderBusyError as err:
        raise WorkflowError(str(err)) from None
    # After a kill, Snakemake's lock stays behind and the next run would stop on its LockException.
    # (Not for the runs that take no lock: the unlock itself and dry runs.)
    stale = stale_snakemake_lock()
    if stale and not {"--unlock", "-n", "--dry-run", "--dryrun"} & set(sys.argv):
        raise WorkflowError(stale)


wildcard_constraints:
    experiment="[A-Za-z][A-Za-z0-9_]*",
    method="[a-z0-9_+]+",
    seed=r"\d+",


def code(stage):
    """The package sources a stage's result depends on (a rerun trigger, as DVC's deps)."""
    files = []
    for entry in CODE[stage]:
        path = Path(entry)
        files += sorted(map(str, path.rglob("*.py"))) if path.is_dir() else [entry]
    return files


def settings(stage):
    """The params.yaml values a stage reads, for Snakemake's params rerun trigger."""
    return lambda wc: stage_params(config, stage, **wc)


def res(rule, key):
    """A portable resource of a rule: params.yaml resources.<entry>.<key>, the entry given by
    cm/pipeline.py's RESOURCES. The stage computes with that entry's `threads` itself (no --threads
    on the command, as in dvc.yaml), so `threads` here only schedules the job: when --cores is
    smaller Snakemake grants fewer, the job still runs that many threads, and the results stay
    those of dvc repro and of every other --cores."""
    return config["resources"][RESOURCES[rule]][key]


def run_files(pattern):
    """`pattern` for every evaluated model and seed of the comparison, experiment left as a wildcard."""
    return expand(pattern, method=evaluated_methods(config), seed=config["seeds"], allow_missing=True)


def trained_model(wildcards):
    """The training checkpoint a merge reads: a theta_g-only model (`<method>_gonly`) reuses its method's."""
    method = MERGE_ONLY.get(wildcards.method, wildcards.method)
    return f"results/{wildcards.experiment}/train/{method}/seed{wildcards.seed}/model.pt"


onstart:
    # Names this invocation for MLflow ($CM_PIPELINE_ID, inherited by its jobs): every stage run joins
    # one parent run, which a rerun after a failure or an interruption continues.
    from cm import tracking

    tracking.begin_pipeline()


onsuccess:
    from cm import tracking

    hint = tracking.end_pipeline(config["tracking"], ok=True)
    if hint:
        print(hint)


onerror:
    from cm import tracking
    from cm.failures import job_errors

    tracking.end_pipeline(config["tracking"], ok=False)
    for line in job_errors(log):  # the failed jobs' own one-line errors, not only "check log"
        print(line, file=sys.stderr)
