"""MLflow: one run per stage job, grouped under one parent run per pipeline.

A stage's run starts when the stage starts (RUNNING) and ends when it ends: FINISHED, FAILED (an
exception) or KILLED (Ctrl-C, SIGTERM from SLURM or Snakemake). Every write to the store is short
and holds a file lock, so parallel jobs never write the SQLite file at the same moment; the lock is
not held while the stage works. Tracking is a record, not a dependency: any MLflow failure is one
warning and the stage goes on untracked.

The pipeline a stage belongs to is named by $CM_PIPELINE_ID: the Snakefile's onstart sets it
(`begin_pipeline`) and SLURM jobs inherit it; under `dvc repro` the first stage of each DVC process
picks it. The name is kept in .snakemake/ or .dvc/tmp/, so an invocation that failed or was
interrupted is continued by the next one under the same parent run; a new parent starts once the
previous invocation finished successfully (Snakemake's onsuccess; for DVC, its last stage).

The project's own store (MLFLOW_TRACKING_URI unset: mlflow.db in the project folder) keeps
artifacts in mlruns/ under locations relative to the project folder, so a moved or copied project
still finds them (MLflow resolves them against the folder it runs in, as it does sqlite:///mlflow.db).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

PIPELINE_ENV = "CM_PIPELINE_ID"
LOCK_FILE = ".mlflow.lock"
SNAKEMAKE_STATE = Path(".snakemake") / "cm-mlflow-pipeline.json"
DVC_STATE = Path(".dvc") / "tmp" / "cm-mlflow-pipeline.json"
# MLflow 3's UI reads this experiment tag as the experiment's type when its GenAI / machine
# learning switch is off; "custom_model_development" is what it names model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_QUERY = "workflowType=machine_learning&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file in the project folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _project_store() -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI")


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


def _new_pipeline_id(orchestrator: str) -> str:
    return f"{orchestrator}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _read_state(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(path.read_text())
        if isinstance(state, dict) and isinstance(state.get("pipeline_id"), str):
            return state
    return {}


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _store_lock() -> Iterator[None]:
    with open(Path.cwd() / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _warn(what: str, err: BaseException) -> None:
    log.warning("MLflow: could not %s in %s (%s: %s); the stage's outputs are not affected. Check that the "
                "store is writable and reachable, or set tracking.enabled: false in params.yaml",
                what, tracking_uri(), type(err).__name__, str(err).splitlines()[0] if str(err) else "")


# --- Pipeline invocations -------------------------------------------------------------------

def begin_pipeline(state_file: Path = SNAKEMAKE_STATE) -> str:
    """Name this Snakemake invocation's pipeline (Snakefile onstart) and export it to its jobs.

    The previous invocation's name is reused unless it finished successfully, so a run that failed
    or was interrupted continues under the same parent run. Never raises.
    """
    if os.environ.get(PIPELINE_ENV):  # named by the user or an enclosing invocation
        return os.environ[PIPELINE_ENV]
    state = _read_state(state_file)
    pid = state["pipeline_id"] if state and not state.get("finished") else _new_pipeline_id("snakemake")
    try:
        _write_state(state_file, {"pipeline_id": pid, "finished": False})
    except OSError as err:
        log.warning("MLflow: cannot write %s (%s); a rerun after a failure will start a new parent run",
                    state_file, err)
    os.environ[PIPELINE_ENV] = pid
    return pid


def end_pipeline(settings: dict, *, ok: bool, state_file: Path = SNAKEMAKE_STATE) -> str | None:
    """Close this invocation (Snakefile onsuccess/onerror): record the outcome, end the parent run.

    Returns a line saying where to read the runs, or None. Never raises.
    """
    pid = os.environ.get(PIPELINE_ENV)
    if not pid:
        return None
    state = _read_state(state_file)
    if state.get("pipeline_id") == pid:
        with contextlib.suppress(OSError):
            _write_state(state_file, {**state, "finished": ok})
    if not settings["enabled"] or (_project_store() and not (Path.cwd() / "mlflow.db").exists()):
        return None
    try:
        with _store_lock():
            client, exp = _client(settings["experiment_name"], create=False)
            if exp is None:
                return None
            parent = _find_parent(client, exp.experiment_id, pid)
            if parent is None:
                return None
            client.set_terminated(parent.info.run_id, "FINISHED" if ok else "FAILED")
            return ui_hint(exp.experiment_id)
    except Exception as err:
        _warn("close the pipeline's parent run", err)
        return None


def ui_hint(experiment_id: str) -> str:
    """Where a person reads the runs: MLflow's UI on its model-training runs page, one row per run."""
    uri, page = tracking_uri(), f"#/experiments/{experiment_id}/runs?{UI_QUERY}"
    if uri.startswith(("http://", "https://")):
        return f"MLflow: {uri.rstrip('/')}/{page}"
    store = "sqlite:///mlflow.db" if _project_store() else uri
    return f"MLflow: run `mlflow ui --backend-store-uri {store}` here, then open http://127.0.0.1:5000/{page}"


def _dvc_process() -> str | None:
    """An id of the `dvc repro`/`dvc exp run` process running this stage, if any."""
    import psutil

    for proc in psutil.Process().parents():
        with contextlib.suppress(psutil.Error):
            if any(Path(arg).name == "dvc" for arg in proc.cmdline()[:2]):
                return f"{proc.pid}-{int(proc.create_time())}"
    return None


def _pipeline() -> tuple[str | None, str]:
    """(pipeline id, orchestrator) of this stage; call with the store lock held (DVC state file)."""
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV], "snakemake"
    if not os.environ.get("DVC_STAGE"):
        return None, "cli"
    process = _dvc_process()
    if process is None:
        return None, "dvc"
    state = _read_state(DVC_STATE)
    if state.get("dvc_process") == process:
        pid = state["pipeline_id"]
    elif state and state.get("status") != "FINISHED":  # the previous invocation failed or was stopped
        pid = state["pipeline_id"]
    else:
        pid = _new_pipeline_id("dvc")
    # RUNNING until the stage ends, so that one killed outright (SIGKILL) still counts as unfinished.
    _write_state(DVC_STATE, {"pipeline_id": pid, "dvc_process": process, "status": "RUNNING"})
    return pid, "dvc"


# --- MLflow ---------------------------------------------------------------------------------

def _client(experiment_name: str, *, create: bool = True):
    """(client, experiment) with the experiment marked as model training; None when absent and not create."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        if not create:
            return client, None
        client.create_experiment(experiment_name, tags=dict([EXPERIMENT_KIND]))
        exp = client.get_experiment_by_name(experiment_name)
    elif exp.tags.get(EXPERIMENT_KIND[0]) is None:  # a store made before the tag
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    if _project_store() and exp.artifact_location != f"mlruns/{exp.experiment_id}":
        try:
            _relative_artifacts(client, exp.experiment_id)
        except Exception as err:  # a nicety: runs are still recorded, with absolute locations
            log.warning("MLflow: could not make the artifact location of experiment %s relative (%s: %s); "
                        "its artifacts are found only while the project stays in %s",
                        exp.name, type(err).__name__, err, Path.cwd())
    return client, exp


def _relative_artifacts(client, experiment_id: str) -> None:
    """Store the experiment's artifact location as mlruns/<id>, relative to the project folder.

    MLflow makes every local location absolute when it creates an experiment (and has no call to
    change one), which ties the store to the folder it was made in; runs take their location from
    the experiment's when they start, so later runs follow this one.
    """
    from mlflow.store.tracking.dbmodels.models import SqlExperiment
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = client._tracking_client.store  # MLflow's own ORM on its own schema
    if isinstance(store, SqlAlchemyStore):
        with store.ManagedSessionMaker() as session:
            session.query(SqlExperiment).filter(SqlExperiment.experiment_id == int(experiment_id)).update(
                {SqlExperiment.artifact_location: f"mlruns/{experiment_id}"})


def _find_parent(client, experiment_id: str, pid: str):
    found = client.search_runs([experiment_id], filter_string=f"tags.`cm.pipeline_id` = '{pid}'", max_results=1)
    return found[0] if found else None


def _context_tags(tags: dict) -> dict:
    """MLflow's user, source and git commit tags (what `mlflow.start_run` adds), plus ours."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(tags)


def _open_parent(client, experiment_id: str, pid: str, orchestrator: str) -> str:
    """The running parent run of a pipeline: created by its first stage, reopened when resumed."""
    parent = _find_parent(client, experiment_id, pid)
    if parent is None:
        run = client.create_run(experiment_id, run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')} {orchestrator}",
                                tags=_context_tags({"cm.pipeline_id": pid, "cm.orchestrator": orchestrator,
                                                    "cm.stage": "pipeline"}))
        return run.info.run_id
    if parent.info.status != "RUNNING":
        client.update_run(parent.info.run_id, status="RUNNING")
    return parent.info.run_id


class StageInterrupted(BaseException):
    """SIGTERM arrived while the stage ran (SLURM's scancel or time limit, Snakemake stopping jobs)."""


class StageRun:
    """The MLflow run of one stage job; every method is a no-op once tracking is off or has failed."""

    def __init__(self, settings: dict, stage: str):
        self.settings, self.stage = settings, stage
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self._client = None
        self.orchestrator = "cli"

    def _write(self, what: str, fn) -> None:
        if self.run_id is None:
            return
        try:
            with _store_lock():
                fn(self._client)
        except Exception as err:
            _warn(what, err)
            self.run_id = None  # one warning per stage, not one per write

    def _start(self, experiment: str, method: str | None, seed: int | None, params: dict) -> None:
        os.environ.pop("MLFLOW_RUN_ID", None)  # an inherited run id would make MLflow resume that run
        tags = {"experiment": experiment, "stage": self.stage, "method": method or "",
                "seed": "" if seed is None else str(seed)}
        if os.environ.get("DVC_STAGE"):
            tags["dvc.stage"] = os.environ["DVC_STAGE"]
        name = " ".join(str(p) for p in (self.stage, experiment, method, None if seed is None else f"seed{seed}") if p)
        try:
            with _store_lock():
                client, exp = _client(self.settings["experiment_name"])
                self._client = client
                pid, self.orchestrator = _pipeline()
                tags["cm.orchestrator"] = self.orchestrator
                if pid:
                    self.parent_id = _open_parent(client, exp.experiment_id, pid, self.orchestrator)
                    tags["mlflow.parentRunId"] = self.parent_id
                self.run_id = client.create_run(exp.experiment_id, run_name=name,
                                                tags=_context_tags(tags)).info.run_id
        except Exception as err:
            _warn(f"start the run of stage {self.stage}", err)
            return
        if params:
            self.log(params=params)

    def log(self, *, params: dict | None = None, metrics: dict | None = None,
            history: list[dict] | None = None, artifacts: list[str | Path] = ()) -> None:
        """Write parameters, final metrics, a metric history ([{'step': s, name: value}]) and files now."""
        pairs = [(k, str(v)[:6000]) for k, v in flatten(params or {}).items()]

        def write(client):
            from mlflow.entities import Metric, Param

            now = int(time.time() * 1000)
            series = [Metric(k, float(v), now, int(row["step"])) for row in history or []
                      for k, v in row.items() if k != "step" and math.isfinite(v)]
            series += [Metric(k, v, now, 0) for k, v in _finite_scalars(metrics or {}).items()]
            for start in range(0, len(pairs), 100):  # MLflow's batch limits: 100 params, 1000 metrics
                client.log_batch(self.run_id, params=[Param(k, v) for k, v in pairs[start:start + 100]])
            for start in range(0, len(series), 1000):
                client.log_batch(self.run_id, metrics=series[start:start + 1000])
            for path in artifacts:
                if Path(path).is_file():
                    client.log_artifact(self.run_id, str(path))

        self._write("log to the run of stage " + self.stage, write)

    def _end(self, status: str) -> None:
        def write(client):
            client.set_terminated(self.run_id, status)
            if self.orchestrator == "dvc" and self.parent_id:  # DVC runs stages one at a time
                client.set_terminated(self.parent_id, status)
                state = _read_state(DVC_STATE)
                if state:
                    _write_state(DVC_STATE, {**state, "status": status})

        self._write(f"end the run of stage {self.stage}", write)


@contextlib.contextmanager
def stage_run(settings: dict, *, stage: str, experiment: str, method: str | None = None,
              seed: int | None = None, params: dict | None = None) -> Iterator[StageRun]:
    """The MLflow run of one stage, from the `with` to its end; `params` are logged at the start.

    An exception ends the run FAILED; Ctrl-C or SIGTERM ends it KILLED (SIGTERM then exits with
    status 143, as the default handler would).
    """
    run = StageRun(settings, stage)
    if settings["enabled"]:
        run._start(experiment, method, seed, params or {})
    handles_sigterm = run.run_id is not None and threading.current_thread() is threading.main_thread()
    if handles_sigterm:
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield run
    except (KeyboardInterrupt, StageInterrupted) as err:
        run._end("KILLED")
        if isinstance(err, StageInterrupted):
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    except BaseException:
        run._end("FAILED")
        raise
    else:
        run._end("FINISHED")
    finally:
        if handles_sigterm:  # None: a handler not set from Python
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _raise_interrupted(signum, frame):
    raise StageInterrupted()
