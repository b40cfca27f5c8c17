"""`snakemake --profile slurm` on a real SLURM cluster (.ci/slurm-cluster.sh starts one here)."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import run
from tests.test_one_answer import assert_same_numbers, numbers, outputs
from tests.test_pipeline import check_products, dvc_is_clean


def cluster_is_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return state.returncode == 0 and any(s in state.stdout for s in ("idle", "mix", "alloc"))


pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not cluster_is_up(), reason="no SLURM cluster (run .ci/slurm-cluster.sh)")]


def test_profile_runs_the_pipeline_as_slurm_jobs(project, tmp_path):
    local = tmp_path / "local"
    shutil.copytree(project, local, symlinks=True)
    # The same pipeline on this machine, at the same time: SLURM's jobs mostly wait for the scheduler.
    with ThreadPoolExecutor(2) as pool:
        cluster = pool.submit(run, ["snakemake", "--profile", "slurm"], project, timeout=1200)
        pool.submit(run, ["snakemake", "--cores", "all"], local, timeout=1200).result()
        cluster.result()
    check_products(project)
    assert dvc_is_clean(project)
    # One answer: the cluster's jobs computed what a workstation computes, bit for bit.
    assert_same_numbers(numbers(local), numbers(project), "slurm")
    assert outputs(project) == outputs(local)
    # Every non-local job went through sbatch and left its SLURM log.
    logs = list((project / "logs" / "slurm").rglob("*.log"))
    assert len(logs) >= 12, logs
