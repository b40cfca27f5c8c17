"""MLflow tracking: runs grouped under a pipeline parent, a real server, and failures as warnings."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest

from cm import tracking

SETTINGS = {"enabled": True, "experiment_name": "tracking-test"}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", tracking.PIPELINE_ENV, "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def runs(uri):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[SETTINGS["experiment_name"]], output_format="list")


def test_stage_runs_join_one_parent_per_pipeline(in_tmp, monkeypatch):
    monkeypatch.setenv(tracking.PIPELINE_ENV, "pipeline-a")
    (in_tmp / "grid.png").write_bytes(b"\x89PNG")
    first = tracking.log_stage(SETTINGS, stage="train", experiment="e", method="cm", seed=1,
                               params={"train": {"lr": 0.1}}, metrics={"fid": 2.5, "nan": float("nan")},
                               history=[{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.25}],
                               artifacts=[in_tmp / "grid.png"])
    second = tracking.log_stage(SETTINGS, stage="merge", experiment="e", method="cm", seed=1)
    monkeypatch.setenv(tracking.PIPELINE_ENV, "pipeline-b")
    third = tracking.log_stage(SETTINGS, stage="merge", experiment="e", method="cm", seed=1)

    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    by_id = {r.info.run_id: r for r in runs(uri)}
    parent_of = {i: by_id[i].data.tags["mlflow.parentRunId"] for i in (first, second, third)}
    assert parent_of[first] == parent_of[second] != parent_of[third]
    assert set(parent_of.values()) <= set(by_id)
    run = by_id[first]
    assert {k: run.data.tags[k] for k in ("experiment", "stage", "method", "seed")} == \
        {"experiment": "e", "stage": "train", "method": "cm", "seed": "1"}
    assert run.data.params == {"train.lr": "0.1"}
    assert run.data.metrics["fid"] == 2.5 and "nan" not in run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(first, "loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.5), (20, 0.25)]
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(first)] == ["grid.png"]


def test_disabled_tracking_writes_nothing(in_tmp):
    assert tracking.log_stage({**SETTINGS, "enabled": False}, stage="train", experiment="e") is None
    assert not (in_tmp / "mlflow.db").exists()


def test_tracking_failure_is_a_warning(in_tmp, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with caplog.at_level(logging.WARNING):
        assert tracking.log_stage(SETTINGS, stage="train", experiment="e") is None
    assert "MLflow tracking failed" in caplog.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_tracking_server_named_by_the_environment(in_tmp, monkeypatch):
    port = _free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{in_tmp / 'server.db'}",
         "--default-artifact-root", str(in_tmp / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not start within 60 s"
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        run_id = tracking.log_stage(SETTINGS, stage="sample", experiment="e", metrics={"num_images": 4})
        assert run_id is not None
        assert [r.info.run_id for r in runs(url)] == [run_id]
        assert not (in_tmp / "mlflow.db").exists()  # nothing went to the local default store
    finally:
        server.terminate()
        server.wait(timeout=30)
