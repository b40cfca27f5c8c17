"""MLflow: one run per stage job, grouped under one parent run per pipeline invocation.

Stages log once, at their end, inside a file lock, so parallel jobs never write the SQLite store
at the same moment. Tracking is a record, not a dependency: any failure here becomes a warning
and the stage still succeeds.

The pipeline invocation is named by $CM_PIPELINE_ID (the Snakefile's onstart sets it, and SLURM
jobs inherit it); under `dvc repro` it is derived from the DVC process that runs the stages.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

PIPELINE_ENV = "CM_PIPELINE_ID"
LOCK_FILE = ".mlflow.lock"


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file in the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def pipeline_id() -> str | None:
    """The id of the pipeline invocation this stage belongs to, if any."""
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV]
    if os.environ.get("DVC_STAGE"):  # run by dvc repro / dvc exp run: the DVC process is the invocation
        import psutil

        for proc in psutil.Process().parents():
            with contextlib.suppress(psutil.Error):
                if any(Path(arg).name == "dvc" for arg in proc.cmdline()[:2]):
                    return f"dvc-{proc.pid}-{int(proc.create_time())}"
    return None


@contextlib.contextmanager
def _store_lock() -> Iterator[None]:
    with open(Path.cwd() / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their string form."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _finite_scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _parent_run(client, experiment_id: str, pid: str, orchestrator: str) -> str:
    """The parent run of a pipeline invocation, created by the first stage that needs it."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`cm.pipeline_id` = '{pid}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={"cm.pipeline_id": pid, "cm.orchestrator": orchestrator,
                                  "cm.stage": "pipeline"})
    # The parent is only a folder for its children; children attach to it by id at any time.
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def log_stage(settings: dict, *, stage: str, experiment: str, method: str | None = None,
              seed: int | None = None, params: dict | None = None, metrics: dict | None = None,
              history: list[dict] | None = None, artifacts: list[str | Path] = ()) -> str | None:
    """Log one stage job as an MLflow run; returns its run id, or None when tracking is off/failed."""
    if not settings["enabled"]:
        return None
    try:
        return _log_stage(settings, stage, experiment, method, seed, params or {}, metrics or {},
                          history or [], artifacts)
    except Exception as err:  # never let tracking fail a stage
        log.warning("MLflow tracking failed (%s: %s); the stage's outputs are not affected",
                    type(err).__name__, err)
        return None


def _log_stage(settings, stage, experiment, method, seed, params, metrics, history, artifacts):
    import mlflow
    from mlflow.entities import Metric

    os.environ.pop("MLFLOW_RUN_ID", None)  # an inherited run id would hijack this run
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    pid = pipeline_id()
    tags = {"experiment": experiment, "stage": stage, "method": method or "", "seed": "" if seed is None else str(seed),
            "cm.orchestrator": "snakemake" if os.environ.get(PIPELINE_ENV) else ("dvc" if pid else "cli")}
    if os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = os.environ["DVC_STAGE"]
    name = " ".join(str(part) for part in (stage, experiment, method, None if seed is None else f"seed{seed}") if part)
    with _store_lock():
        exp = mlflow.set_experiment(settings["experiment_name"])
        parent = _parent_run(client, exp.experiment_id, pid, tags["cm.orchestrator"]) if pid else None
        with mlflow.start_run(run_name=name, parent_run_id=parent, tags=tags) as run:
            if params:
                mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
            scalars = _finite_scalars(metrics)
            now = int(time.time() * 1000)
            series = [Metric(k, float(v), now, int(row["step"])) for row in history
                      for k, v in row.items() if k != "step" and math.isfinite(v)]
            series += [Metric(k, v, now, 0) for k, v in scalars.items()]
            for start in range(0, len(series), 1000):  # MLflow's batch limit
                client.log_batch(run.info.run_id, metrics=series[start:start + 1000])
            for path in artifacts:
                if Path(path).is_file():
                    mlflow.log_artifact(str(path))
            return run.info.run_id
