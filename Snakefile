# Class-imbalanced diffusion training with Capacity Manipulation.
#   snakemake --cores all              workstation
#   snakemake --profile slurm          cluster (slurm/config.yaml)
# Every rule runs one `python -m cm <stage>` command; the same stages are in dvc.yaml.

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from cm.config import ConfigError, load_yaml

min_version("9.0")


# Snakemake's own reading of a broken file says only "not valid JSON or YAML": say where first.
try:
    load_yaml("params.yaml")
except ConfigError as err:
    raise WorkflowError(str(err)) from None


configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        expand("results/{experiment}/report/summary.md", experiment=config["run"]),
        "results/dvc_commit.txt",
    default_target: True
