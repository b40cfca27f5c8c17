"""The stages' code and parameter dependencies: one table for the Snakefile and dvc.yaml.

The Snakefile reads it to declare inputs and rerun triggers; a test checks that dvc.yaml's
`deps` and `params` say the same, so editing a module reruns the same stages under both
orchestrators. Only the modules that decide a stage's result are listed (not the CLI, I/O or
tracking), so a change to, say, the report does not retrain models.
"""

from __future__ import annotations

from cm.config import MERGED_BLOCKS
from cm.method_names import param_sections

CODE = {
    "prepare_data": ["cm/data"],
    "train_evaluator": ["cm/data", "cm/metrics", "cm/evaluate.py"],
    "reference_features": ["cm/data", "cm/metrics", "cm/evaluate.py"],
    "pretrain": ["cm/accel.py", "cm/checkpoint.py", "cm/data", "cm/diffusion.py", "cm/distributed.py", "cm/finetune",
                 "cm/methods", "cm/models", "cm/pretrain.py", "cm/train.py", "cm/trainer.py"],
    "train": ["cm/accel.py", "cm/checkpoint.py", "cm/data", "cm/diffusion.py", "cm/distributed.py", "cm/finetune",
              "cm/lowrank.py", "cm/methods", "cm/models", "cm/train.py", "cm/trainer.py"],
    "merge": ["cm/checkpoint.py", "cm/finetune", "cm/lowrank.py", "cm/merge.py", "cm/models"],
    "sample": ["cm/accel.py", "cm/checkpoint.py", "cm/data", "cm/diffusion.py", "cm/finetune", "cm/models",
               "cm/sample.py"],
    "evaluate": ["cm/evaluate.py", "cm/metrics"],
    "probe": ["cm/checkpoint.py", "cm/data", "cm/diffusion.py", "cm/finetune", "cm/lowrank.py", "cm/models",
              "cm/probe"],
    "report": ["cm/data", "cm/metrics", "cm/report"],
}

# The params.yaml `resources` entry of each stage. Its `threads` is the count the stage computes
# with whoever runs it (Snakemake, DVC, SLURM, by hand), so results never depend on the machine's
# core count; the Snakefile schedules the job with the same entry.
RESOURCES = {"prepare_data": "default", "train_evaluator": "evaluate", "reference_features": "evaluate",
             "pretrain": "train", "train": "train", "merge": "default", "sample": "sample", "evaluate": "evaluate",
             "probe": "evaluate", "report": "default"}


def train_processes(params: dict) -> int:
    """Training processes per model: one per GPU of resources.train.gpu (torchrun when > 1)."""
    return max(1, params["resources"]["train"]["gpu"])


def threads_key(stage: str) -> str:
    """The params.yaml key of a stage's thread count."""
    return f"resources.{RESOURCES[stage]}.threads"


# params.yaml keys each stage reads; {experiment} and {method} are filled per job. The thread count
# is one where floats depend on it (the order of parallel sums), and so is training's GPU count (the
# processes' all-reduce): changing either reruns the stage, and dvc.lock records the counts.
PARAMS = {
    "prepare_data": ["experiments.{experiment}.data"],
    "train_evaluator": ["experiments.{experiment}.data", "experiments.{experiment}.evaluate.feature_net",
                        threads_key("train_evaluator")],
    "reference_features": ["experiments.{experiment}.data", "experiments.{experiment}.evaluate",
                           threads_key("reference_features")],
    "pretrain": ["experiments.{experiment}.model", "experiments.{experiment}.diffusion",
                 "experiments.{experiment}.finetune", threads_key("pretrain")],
    "train": ["experiments.{experiment}.model", "experiments.{experiment}.diffusion",
              "experiments.{experiment}.train", "experiments.{experiment}.data.hflip",
              "experiments.{experiment}.finetune", "method_params.{section}", threads_key("train"),
              "resources.train.gpu"],
    "merge": [threads_key("merge")],
    "sample": ["experiments.{experiment}.diffusion", "experiments.{experiment}.sample", threads_key("sample")],
    "evaluate": ["experiments.{experiment}.data", "experiments.{experiment}.evaluate", threads_key("evaluate")],
    "probe": ["experiments.{experiment}.diffusion", "experiments.{experiment}.probe", threads_key("probe")],
    "report": ["methods", "theta_g_only", "seeds", "report"],
}
THREAD_DEPENDENT = tuple(stage for stage, keys in PARAMS.items() if threads_key(stage) in keys)


def lookup(params: dict, dotted: str):
    """params['a']['b'] for 'a.b'."""
    value = params
    for key in dotted.split("."):
        value = value[key]
    return value


def param_keys(stage: str, **wildcards) -> list[str]:
    """A job's params.yaml keys; {section} stands for every method_params section the method reads
    (`cm` and `cbdm` for cm+cbdm)."""
    keys = []
    for key in PARAMS[stage]:
        sections = param_sections(wildcards["method"]) if "{section}" in key else [None]
        keys += [key.format(section=s, **wildcards) for s in sections]
    return keys


def stage_params(params: dict, stage: str, **wildcards) -> dict:
    """The values of a stage's parameters for one job (experiments completed from `defaults`):
    Snakemake's rerun trigger."""
    return {key: lookup(params, key) for key in param_keys(stage, **wildcards)}


def dvc_param_keys(stage: str, **wildcards) -> list[str]:
    """The params.yaml keys DVC tracks for a job. DVC reads params.yaml as written, so where a stage
    reads an experiment's setting it tracks the `defaults` value and the experiment's block that may
    change it; a fine-tuning's pretraining also takes the defaults' data and train blocks. A key
    inside another tracked key is left out."""
    keys = []
    for key in param_keys(stage, **wildcards):
        parts = key.split(".")
        if parts[0] != "experiments":
            keys.append(key)
            continue
        block = parts[2]
        if block in MERGED_BLOCKS:
            keys.append(".".join(["defaults", block, *parts[3:]]))
        if block == "finetune":
            keys += ["defaults.finetune", "defaults.data", "defaults.train"]
        keys.append(".".join(parts[:3]))
    return [key for key in dict.fromkeys(keys) if not any(key.startswith(other + ".") for other in keys)]


def dvc_stage_names(params: dict, experiment: str) -> list[str]:
    """The dvc.yaml stage names of one experiment (foreach/matrix naming)."""
    def per_run(stages, methods):
        return [f"{stage}@{experiment}-{m}-{s}" for stage in stages for m in methods for s in params["seeds"]]

    shared = [f"{stage}@{experiment}" for stage in ("prepare_data", "pretrain", "train_evaluator",
                                                      "reference_features")]
    return (shared + per_run(("train", "merge", "sample", "evaluate", "probe"), params["methods"])
            + per_run(("merge_gonly", "sample_gonly", "evaluate_gonly"), params["theta_g_only"])
            + [f"report@{experiment}"])
