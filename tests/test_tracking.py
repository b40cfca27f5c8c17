"""MLflow tracking through MLflow's own client on real stores: runs that span their stage, one parent
per pipeline that a rerun continues, artifacts that survive moving the project, a real
`mlflow server`, its UI in a real browser, and failures as one warning."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import matplotlib.image
import mlflow
import pytest

from cm import tracking

SETTINGS = {"enabled": True, "experiment_name": "tracking-test"}
PNG = b"\x89PNG\r\n\x1a\n fake"
ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", tracking.PIPELINE_ENV, "DVC_STAGE")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def client(uri=None):
    return mlflow.MlflowClient(uri or tracking.tracking_uri())


def runs(uri=None, experiment=SETTINGS["experiment_name"]):
    c = client(uri)
    return {r.info.run_id: r for r in c.search_runs([c.get_experiment_by_name(experiment).experiment_id])}


def test_a_stage_run_spans_its_stage_and_joins_its_pipeline(in_tmp, monkeypatch):
    monkeypatch.setenv(tracking.PIPELINE_ENV, "pipeline-a")
    (in_tmp / "grid.png").write_bytes(PNG)
    with tracking.stage_run(SETTINGS, stage="train", experiment="e", method="cm", seed=1,
                            params={"train": {"lr": 0.1}}) as run:
        live = client().get_run(run.run_id)  # visible while the stage works, parameters included
        time.sleep(0.5)
        run.log(metrics={"fid": 2.5, "nan": float("nan")},
                history=[{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.25}],
                artifacts=[in_tmp / "grid.png", in_tmp / "missing.png"])
    first = run.run_id
    with tracking.stage_run(SETTINGS, stage="merge", experiment="e", method="cm", seed=1) as run:
        pass
    second = run.run_id
    monkeypatch.setenv(tracking.PIPELINE_ENV, "pipeline-b")
    with tracking.stage_run(SETTINGS, stage="merge", experiment="e", method="cm", seed=1) as run:
        pass
    third = run.run_id

    assert live.info.status == "RUNNING" and live.info.end_time is None and live.data.params == {"train.lr": "0.1"}
    by_id = runs()
    parent_of = {i: by_id[i].data.tags["mlflow.parentRunId"] for i in (first, second, third)}
    assert parent_of[first] == parent_of[second] != parent_of[third]
    for parent in set(parent_of.values()):
        assert by_id[parent].data.tags["cm.stage"] == "pipeline" and by_id[parent].info.status == "RUNNING"
    run = by_id[first]
    assert run.info.status == "FINISHED" and run.info.run_name == "train e cm seed1"
    assert run.info.end_time - run.info.start_time >= 500  # the stage's real duration
    assert {k: run.data.tags[k] for k in ("experiment", "stage", "method", "seed", "cm.orchestrator")} == \
        {"experiment": "e", "stage": "train", "method": "cm", "seed": "1", "cm.orchestrator": "snakemake"}
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.params == {"train.lr": "0.1"}
    assert run.data.metrics["fid"] == 2.5 and "nan" not in run.data.metrics
    history = client().get_metric_history(first, "loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.5), (20, 0.25)]
    assert [a.path for a in client().list_artifacts(first)] == ["grid.png"]
    # A model-training experiment (MLflow's UI otherwise takes it for a GenAI one), artifacts
    # relative to the project folder.
    exp = client().get_experiment_by_name(SETTINGS["experiment_name"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == f"mlruns/{exp.experiment_id}"
    assert run.info.artifact_uri == f"mlruns/{exp.experiment_id}/{first}/artifacts"
    assert (in_tmp / run.info.artifact_uri / "grid.png").read_bytes() == PNG


def test_a_failed_stage_is_failed_and_an_interrupted_one_killed(in_tmp):
    with pytest.raises(ValueError, match="boom"):
        with tracking.stage_run(SETTINGS, stage="sample", experiment="e", method="cm", seed=0) as failed:
            raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run(SETTINGS, stage="sample", experiment="e", method="cm", seed=1) as stopped:
            raise KeyboardInterrupt
    statuses = {i: r.info.status for i, r in runs().items()}
    assert statuses == {failed.run_id: "FAILED", stopped.run_id: "KILLED"}
    assert all("mlflow.parentRunId" not in r.data.tags for r in runs().values())  # not run by a pipeline


def test_sigterm_ends_the_run_killed_and_the_process_as_sigterm_would(in_tmp):
    # What SLURM's scancel or time limit, or Snakemake stopping its jobs, sends.
    code = ("import time; from cm import tracking\n"
            f"with tracking.stage_run({SETTINGS!r}, stage='train', experiment='e'):\n"
            "    print('started', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "started\n", proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    [run] = runs().values()
    assert run.info.status == "KILLED" and run.info.end_time is not None


def test_a_snakemake_rerun_continues_the_parent_until_an_invocation_succeeds(in_tmp, monkeypatch):
    def invocation(stage, ok=True):
        monkeypatch.delenv(tracking.PIPELINE_ENV, raising=False)  # a new `snakemake` process
        pid = tracking.begin_pipeline()  # onstart
        with tracking.stage_run(SETTINGS, stage=stage, experiment="e") as run:
            pass
        hint = tracking.end_pipeline(SETTINGS, ok=ok)  # onsuccess / onerror
        return pid, run.run_id, hint

    failed = invocation("train", ok=False)
    resumed = invocation("sample")
    fresh = invocation("train")
    assert failed[0] == resumed[0] != fresh[0]
    by_id = runs()
    parent = {i: by_id[i].data.tags["mlflow.parentRunId"] for i in (failed[1], resumed[1], fresh[1])}
    assert parent[failed[1]] == parent[resumed[1]] != parent[fresh[1]]
    assert by_id[parent[failed[1]]].info.status == by_id[parent[fresh[1]]].info.status == "FINISHED"
    assert by_id[parent[failed[1]]].data.tags["cm.pipeline_id"] == failed[0]
    assert json.loads((in_tmp / tracking.SNAKEMAKE_STATE).read_text()) == {"pipeline_id": fresh[0], "finished": True}
    exp = client().get_experiment_by_name(SETTINGS["experiment_name"]).experiment_id
    assert fresh[2] == ("MLflow: run `mlflow ui --backend-store-uri sqlite:///mlflow.db` here, then open "
                        f"http://127.0.0.1:5000/#/experiments/{exp}/runs?{tracking.UI_QUERY}")


def test_a_pipeline_name_set_by_the_user_is_kept(in_tmp, monkeypatch):
    monkeypatch.setenv(tracking.PIPELINE_ENV, "mine")
    assert tracking.begin_pipeline() == "mine"
    assert not (in_tmp / tracking.SNAKEMAKE_STATE).exists()


def test_a_dvc_rerun_continues_the_parent_until_its_last_stage_finishes(in_tmp):
    # A stand-in for `dvc repro`: a process named dvc whose child runs stages with $DVC_STAGE set.
    dvc = in_tmp / "bin" / "dvc"
    dvc.parent.mkdir()
    dvc.write_text('#!/bin/sh\n"$@"\n')
    dvc.chmod(0o755)
    code = ("import sys; from cm import tracking\n"
            "for stage in sys.argv[1:]:\n"
            "    try:\n"
            f"        with tracking.stage_run({SETTINGS!r}, stage=stage.strip('!'), experiment='e'):\n"
            "            assert not stage.endswith('!'), 'failed'\n"
            "    except AssertionError:\n"
            "        break\n")

    def repro(*stages):
        subprocess.run([str(dvc), sys.executable, "-c", code, *stages], check=True,
                       env={**os.environ, "DVC_STAGE": "stage"}, capture_output=True)
        return json.loads((in_tmp / tracking.DVC_STATE).read_text())

    first = repro("prepare", "train!")  # the second stage fails
    second = repro("train")  # continues the first invocation
    third = repro("prepare")  # the previous one finished: a new pipeline
    assert first["pipeline_id"] == second["pipeline_id"] != third["pipeline_id"]
    assert [first["status"], second["status"], third["status"]] == ["FAILED", "FINISHED", "FINISHED"]
    by_id = runs()
    stages = sorted((r.data.tags["stage"], r.info.status, r.data.tags["mlflow.parentRunId"])
                    for r in by_id.values() if "stage" in r.data.tags)
    parents = {r.data.tags["cm.pipeline_id"]: i for i, r in by_id.items() if "cm.pipeline_id" in r.data.tags}
    old, new = parents[first["pipeline_id"]], parents[third["pipeline_id"]]
    assert stages == sorted([("prepare", "FINISHED", old), ("train", "FAILED", old), ("train", "FINISHED", old),
                             ("prepare", "FINISHED", new)])
    assert {r.data.tags["cm.orchestrator"] for r in by_id.values()} == {"dvc"}
    assert by_id[old].info.status == by_id[new].info.status == "FINISHED"


def test_disabled_tracking_writes_nothing(in_tmp):
    with tracking.stage_run({**SETTINGS, "enabled": False}, stage="train", experiment="e") as run:
        run.log(metrics={"fid": 1.0})
    assert run.run_id is None
    assert sorted(p.name for p in in_tmp.iterdir()) == []


def test_a_store_that_cannot_be_written_is_one_warning(in_tmp, monkeypatch, caplog):
    (in_tmp / "file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{in_tmp / 'file' / 'mlflow.db'}")
    done = []
    with caplog.at_level(logging.WARNING):
        with tracking.stage_run(SETTINGS, stage="train", experiment="e") as run:
            run.log(metrics={"fid": 1.0})
            done.append(True)
    assert done and run.run_id is None
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    message = record.getMessage()
    assert message.startswith("MLflow: could not start the run of stage train in sqlite:///") and "\n" not in message
    assert "tracking.enabled: false" in message


# --- A moved project, served by a real `mlflow server`, read in a real browser ---------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A project tracked in one folder, moved to another, and `mlflow server` started in the new one."""
    root = tmp_path_factory.mktemp("served")
    first, moved = root / "first", root / "moved"
    first.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(first)
        for var in ENV:
            mp.delenv(var, raising=False)
        mp.setenv(tracking.PIPELINE_ENV, "pipeline-ui")
        (first / "grid.png").write_bytes(PNG)
        with tracking.stage_run(SETTINGS, stage="train", experiment="digits", method="cm", seed=0) as train:
            train.log(metrics={"loss": 0.1}, artifacts=["grid.png"])
        with tracking.stage_run(SETTINGS, stage="sample", experiment="digits", method="cm", seed=0) as sample:
            sample.log(metrics={"num_images": 120})
    shutil.move(first, moved)
    port = _free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", "sqlite:///mlflow.db"],
        cwd=moved, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start within 90 s"
                time.sleep(0.5)
        yield {"folder": moved, "url": url, "train": train.run_id, "sample": sample.run_id}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_moved_project_keeps_its_artifacts(served, tmp_path, monkeypatch):
    monkeypatch.chdir(served["folder"])
    assert not (served["folder"].parent / "first").exists()
    for uri in ("sqlite:///mlflow.db", served["url"]):  # MLflow's client on the file, and through the server
        path = client(uri).download_artifacts(served["train"], "grid.png", str(tmp_path))
        assert open(path, "rb").read() == PNG
        os.remove(path)


def test_a_server_named_by_the_environment(served, in_tmp, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["url"])
    with tracking.stage_run({**SETTINGS, "experiment_name": "server-test"}, stage="sample", experiment="e") as run:
        run.log(metrics={"num_images": 4})
    assert run.run_id is not None
    assert list(runs(served["url"], "server-test")) == [run.run_id]
    assert not (in_tmp / "mlflow.db").exists()  # nothing went to the local default store


def test_the_runs_page_in_a_browser(served, tmp_path, monkeypatch):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (as root: apt-get install -y chromium, or .ci/install-chromium.sh)")
    experiment = client(served["url"]).get_experiment_by_name(SETTINGS["experiment_name"]).experiment_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["url"])
    link = tracking.ui_hint(experiment).split()[-1]  # what a finished pipeline prints
    assert link == f"{served['url']}/#/experiments/{experiment}/runs?{tracking.UI_QUERY}"
    shot = tmp_path / "runs.png"
    page = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,900",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", f"--screenshot={shot}",
         "--dump-dom", link], capture_output=True, text=True, timeout=180)
    dom = page.stdout
    for name in ("train digits cm seed0", "sample digits cm seed0", "pipeline "):
        assert name in dom, f"{name!r} not on the runs page ({len(dom)} characters of DOM)"
    assert "Sort: Run Name" in dom  # the runs table, one row per run
    assert "Model registry" in dom  # in the UI's model-training view (its GenAI view has no registry)
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1400)
    assert (pixels.std(axis=-1) > 0.05).mean() > 0.001 and (pixels.mean(axis=-1) < 0.5).mean() > 0.005, \
        "the screenshot is blank"
