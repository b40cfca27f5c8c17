"""The stages' code and parameter dependencies: one table for the Snakefile and dvc.yaml.

The Snakefile reads it to declare inputs and rerun triggers; a test checks that dvc.yaml's
`deps` and `params` say the same, so editing a module reruns the same stages under both
orchestrators. Only the modules that decide a stage's result are listed (not the CLI, I/O or
tracking), so a change to, say, the report does not retrain models.
"""

from __future__ import annotations

CODE = {
    "prepare_data": ["cm/data"],
    "train_evaluator": ["cm/data", "cm/metrics", "cm/evaluate.py"],
    "reference_features": ["cm/data", "cm/metrics", "cm/evaluate.py"],
    "train": ["cm/data", "cm/diffusion.py", "cm/lowrank.py", "cm/methods", "cm/models", "cm/train.py"],
    "merge": ["cm/lowrank.py", "cm/merge.py", "cm/models"],
    "sample": ["cm/diffusion.py", "cm/models", "cm/sample.py"],
    "evaluate": ["cm/evaluate.py", "cm/metrics"],
    "report": ["cm/report.py"],
}

# params.yaml keys each stage reads; {experiment} and {method} are filled per job.
PARAMS = {
    "prepare_data": ["experiments.{experiment}.data"],
    "train_evaluator": ["experiments.{experiment}.data", "experiments.{experiment}.evaluate"],
    "reference_features": ["experiments.{experiment}.data", "experiments.{experiment}.evaluate"],
    "train": ["experiments.{experiment}.model", "experiments.{experiment}.diffusion",
              "experiments.{experiment}.train", "experiments.{experiment}.data.hflip",
              "method_params.{method}"],
    "merge": [],
    "sample": ["experiments.{experiment}.diffusion", "experiments.{experiment}.sample"],
    "evaluate": ["experiments.{experiment}.evaluate"],
    "report": ["methods", "seeds"],
}


def lookup(params: dict, dotted: str):
    """params['a']['b'] for 'a.b'."""
    value = params
    for key in dotted.split("."):
        value = value[key]
    return value


def stage_params(params: dict, stage: str, **wildcards) -> dict:
    """The values of a stage's parameters for one job: Snakemake's rerun trigger."""
    return {key.format(**wildcards): lookup(params, key.format(**wildcards)) for key in PARAMS[stage]}
