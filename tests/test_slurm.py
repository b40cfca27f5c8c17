"""`snakemake --profile slurm` on a real SLURM cluster (.ci/slurm-cluster.sh starts one here)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import run
from tests.helpers import assert_same_numbers, check_products, dvc_is_clean, numbers, outputs


def cluster_is_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return state.returncode == 0 and any(s in state.stdout for s in ("idle", "mix", "alloc"))


pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not cluster_is_up(), reason="no SLURM cluster (run .ci/slurm-cluster.sh)")]


def test_profile_runs_the_pipeline_as_slurm_jobs(project, snakemake_run):
    run(["snakemake", "--profile", "slurm"], project, timeout=1200)
    check_products(project)
    assert dvc_is_clean(project)
    # One answer: the cluster's jobs computed what a workstation computes, bit for bit.
    assert_same_numbers(numbers(snakemake_run), numbers(project), "slurm")
    assert outputs(project) == outputs(snakemake_run)
    # Every non-local job went through sbatch and left its SLURM log.
    logs = list((project / "logs" / "slurm").rglob("*.log"))
    assert len(logs) >= 12, logs
