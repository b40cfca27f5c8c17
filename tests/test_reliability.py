"""Faults, for real and in subprocesses: SIGKILL and resume, atomic outputs, corrupt and malicious
files, concurrent runs."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from cm import io
from tests.conftest import VENV_BIN, copy_project, copy_run, run
from tests.helpers import checkpoint_steps, same_weights, set_budget, start, wait_for

pytestmark = pytest.mark.e2e
TRAIN = "results/digits_lt/train/cm/seed0"


def train_cmd(out_dir, checkpoints):
    return [str(VENV_BIN / "python"), "-m", "cm", "train", "--experiment", "digits_lt", "--method", "cm",
            "--seed", "0", "--manifest", "results/digits_lt/data/manifest.json",
            "--out", f"{out_dir}/model.pt", "--history", f"{out_dir}/history.csv", "--checkpoints", checkpoints]


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("prepared") / "project")
    set_budget(project, steps=60, checkpoint_every=10, keep_checkpoints=2)
    run(["python", "-m", "cm", "prepare-data", "--experiment", "digits_lt",
         "--out", "results/digits_lt/data/manifest.json"], project)
    run(train_cmd("reference", "reference/ckpt"), project)  # the uninterrupted run
    return project


@pytest.fixture
def prepared(prepared_once, tmp_path):
    """The training set and an uninterrupted reference training, made once per module, in a copy
    each test may change."""
    return copy_run(prepared_once, tmp_path / "project")


def test_sigkill_during_training_then_the_same_command_resumes_bit_identically(prepared):
    proc = start(train_cmd(TRAIN, f"{TRAIN}/checkpoints"), prepared)
    wait_for(lambda: checkpoint_steps(prepared / TRAIN) or proc.poll() is not None, what="a checkpoint")
    time.sleep(random.uniform(0.0, 0.4))  # a random step after the checkpoint
    proc.kill()
    proc.wait()
    saved = checkpoint_steps(prepared / TRAIN)
    assert saved and saved[-1] < 60 and not (prepared / TRAIN / "model.pt").exists()
    result = run(train_cmd(TRAIN, f"{TRAIN}/checkpoints"), prepared)
    assert "resuming from" in result.stderr
    assert same_weights(prepared / TRAIN / "model.pt", prepared / "reference" / "model.pt")


@pytest.mark.parametrize("orchestrator", ["snakemake", "dvc"])
def test_a_killed_training_job_resumes_when_the_pipeline_runs_again(prepared, orchestrator):
    target = {"snakemake": ["snakemake", "--cores", "1", f"{TRAIN}/model.pt"],
              "dvc": ["dvc", "repro", "--single-item", "train@digits_lt-cm-0"]}[orchestrator]
    reference = prepared / "reference" / "model.pt"
    if orchestrator == "dvc":  # the training's inputs, as a `dvc repro` of the whole graph would leave them
        run(["dvc", "commit", "--force", "--quiet", "prepare_data@digits_lt"], prepared)
        run(["dvc", "repro", "--quiet", "--single-item", "pretrain@digits_lt"], prepared)
    proc = start(target, prepared)
    wait_for(lambda: checkpoint_steps(prepared / TRAIN) or proc.poll() is not None, what="a checkpoint")
    time.sleep(random.uniform(0.0, 0.4))
    job = [p for p in psutil.Process(proc.pid).children(recursive=True) if "train" in p.cmdline()]
    assert job, "the training job is not running"
    job[0].send_signal(signal.SIGKILL)  # a preempted job: the orchestrator itself survives
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output
    assert not (prepared / TRAIN / "model.pt").exists()
    assert checkpoint_steps(prepared / TRAIN)  # the checkpoints survived the failed job
    again = run(target, prepared)
    log = (prepared / "logs/digits_lt/train/cm/seed0.log").read_text() if orchestrator == "snakemake" else ""
    assert "resuming from" in log + again.stdout + again.stderr
    assert same_weights(prepared / TRAIN / "model.pt", reference)


def test_killed_sampling_resumes_without_regenerating_a_batch(prepared):
    params = yaml.safe_load((prepared / "params.yaml").read_text())
    params["experiments"]["digits_lt"]["sample"].update(per_class=30, batch_size=30, steps=20)
    (prepared / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    merged = "results/merged.pt"
    run(["python", "-m", "cm", "merge", "--experiment", "digits_lt", "--method", "cm", "--seed", "0",
         "--model", "reference/model.pt", "--out", merged], prepared)

    def cmd(out):
        return [str(VENV_BIN / "python"), "-m", "cm", "sample", "--experiment", "digits_lt", "--method", "cm",
                "--seed", "0", "--threads", "1", "--model", merged, "--out", out]

    run(cmd("whole/samples.npz"), prepared)
    proc = start(cmd("split/samples.npz"), prepared)
    wait_for(lambda: len(list((prepared / "split").rglob("batch_*.npz"))) >= 2 or proc.poll() is not None,
             what="two finished batches")
    proc.kill()
    proc.wait()
    done = len(list((prepared / "split").rglob("batch_*.npz")))
    assert 2 <= done < 10 and not (prepared / "split" / "samples.npz").exists()
    result = run(cmd("split/samples.npz"), prepared)
    assert f"'batches_resumed': {done}" in result.stderr or f'"batches_resumed": {done}' in result.stderr
    whole, split = io.load_npz(prepared / "whole/samples.npz"), io.load_npz(prepared / "split/samples.npz")
    assert (whole["labels"] == split["labels"]).all() and (whole["images"] == split["images"]).all()
    assert not (prepared / "split" / "partial").exists()


def test_no_truncated_file_under_a_final_name_after_kills_mid_write(prepared):
    set_budget(prepared, steps=400, checkpoint_every=1, keep_checkpoints=2)  # writes all the time
    for _ in range(4):
        proc = start(train_cmd("atomic", "atomic/ckpt"), prepared)
        wait_for(lambda: checkpoint_steps(prepared / "atomic") or proc.poll() is not None, what="writes")
        time.sleep(random.uniform(0.0, 1.0))
        proc.kill()
        proc.wait()
        for path in (prepared / "atomic").rglob("*.pt"):
            if not path.name.startswith("."):  # temporary names start with a dot
                io.load_torch(path)  # raises on a torn file


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.pt"
    torch.save({"format": "cm.model/1", "state_dict": Payload()}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(io.CorruptFileError, match="model.pt: not a readable checkpoint"):
        io.load_torch(path)
    result = subprocess.run([sys.executable, "-m", "cm", "merge", "--experiment", "digits_lt", "--method", "cm",
                             "--seed", "0", "--model", str(path), "--out", str(tmp_path / "out.pt")],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_a_second_snakemake_in_the_same_folder_is_refused(project):
    target = "results/digits_lt/train/ddpm/seed0/model.pt"  # one job's chain is enough to hold the lock
    first = start(["snakemake", "--cores", "all", target], project)
    wait_for(lambda: any((project / ".snakemake" / "locks").glob("*")) or first.poll() is not None,
             what="the first run's lock")
    second = run(["snakemake", "--cores", "all"], project, check=False)
    assert second.returncode != 0
    assert "another Snakemake run (pid" in second.stdout + second.stderr
    assert "Traceback" not in second.stdout + second.stderr
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    assert io.load_torch(project / target)["step"] == 30  # the first run went on to the end


def test_after_a_killed_snakemake_the_rerun_says_in_one_line_how_to_continue(project):
    target = "results/digits_lt/train/ddpm/seed0/model.pt"
    first = start(["snakemake", "--cores", "1", target], project)
    wait_for(lambda: any((project / ".snakemake" / "locks").glob("*")) or first.poll() is not None,
             what="the run's lock")
    for process in [*psutil.Process(first.pid).children(recursive=True), psutil.Process(first.pid)]:
        process.kill()  # SIGKILL: nothing of Snakemake's own clean-up runs
    first.wait()
    again = run(["snakemake", "--cores", "1", target], project, check=False)
    output = again.stdout + again.stderr
    assert again.returncode != 0 and "Traceback" not in output and "LockException" not in output, output
    assert ("a killed run left Snakemake's lock in .snakemake/locks; no other run is alive in this folder (its run "
            "lock was free), so clearing it is safe: run `snakemake --unlock`, then the same command again") in output
    # The dry run needs no lock; the advice works.
    assert run(["snakemake", "--dry-run", target], project).returncode == 0
    run(["snakemake", "--unlock"], project)
    run(["snakemake", "--cores", "1", target], project)
    assert io.load_torch(project / target)["step"] == 30


def test_a_corrupt_upstream_file_is_named_on_the_console_with_the_command_that_rebuilds_it(snakemake_run, tmp_path):
    project = copy_run(snakemake_run, tmp_path / "project")
    model = project / "results/digits_lt/train/cm/seed0/model.pt"
    model.write_bytes(model.read_bytes()[:1000])  # truncated, with a later time than its outputs
    result = run(["snakemake", "--cores", "1", "results/digits_lt/merged/cm/seed0/model.pt"], project, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert ("merge: error: results/digits_lt/train/cm/seed0/model.pt: not a readable checkpoint" in output
            and "(rebuild it and what depends on it: snakemake --cores all --forcerun "
                "results/digits_lt/train/cm/seed0/model.pt)" in output), output
