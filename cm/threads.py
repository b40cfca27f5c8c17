"""The thread count a stage computes with: params.yaml's `resources.<entry>.threads` for it (or
--threads), in torch, BLAS and OpenMP alike, so that its numbers never depend on the machine's core
count or the scheduler's allotment (the order of parallel sums rounds by the thread count).
"""

from __future__ import annotations

import logging
import os

from cm.errors import ConfigError
from cm.pipeline import RESOURCES, THREAD_DEPENDENT, threads_key

log = logging.getLogger("cm")

# What BLAS and OpenMP libraries loaded later in the process (scipy's own BLAS) read at load time.
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def stage_threads(args, params: dict) -> int:
    """The thread count a stage computes with: params.yaml's for it, unless --threads overrides it."""
    stage = args.stage.replace("-", "_")
    key = threads_key(stage)
    configured = params["resources"][RESOURCES[stage]]["threads"]
    threads = configured if args.threads is None else args.threads
    if threads < 1:
        raise ConfigError(f"--threads = {threads} is not allowed: must be an integer >= 1")
    if threads != configured and stage in THREAD_DEPENDENT:
        log.warning("--threads %d differs from params.yaml's %s = %d, which Snakemake, DVC and dvc.lock use: "
                    "this run's numbers will not match theirs bit for bit; drop --threads to match them, or "
                    "set %s in params.yaml to change it for every orchestrator", threads, key, configured, key)
    return threads


def pin_threads(args, params: dict, *, uses_torch: bool) -> None:
    """Compute with the stage's thread count in torch, BLAS and OpenMP, whatever the machine or scheduler."""
    threads = stage_threads(args, params)
    allotted = os.environ.get("OMP_NUM_THREADS")  # Snakemake sets it to the cores it granted the job
    if allotted is not None and allotted != str(threads):
        log.info("OMP_NUM_THREADS=%s ignored: computing with %s = %d, so that the numbers do not depend on "
                 "the scheduler's allotment", allotted, threads_key(args.stage.replace("-", "_")), threads)
    os.environ.update({var: str(threads) for var in _THREAD_ENV})
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)  # BLAS/OpenMP already loaded (numpy's)
    if uses_torch:
        import torch

        torch.set_num_threads(threads)
