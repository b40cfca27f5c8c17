"""Shared fixtures: small settings, and a temporary copy of the project for end-to-end runs."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train.npz"
VENV_BIN = Path(sys.executable).parent
# Variables of the calling shell that would point a test's runs at someone else's stores.
_ISOLATED = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "CM_PIPELINE_ID", "DVC_STAGE")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests are timed on 2 shared cores: one torch thread each keeps them fast and repeatable."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def singular_relu_features():
    """Two feature sets with dead ReLU units and fewer rows than dims, as for a rare class:
    singular covariances on both sides."""
    import numpy as np

    rng = np.random.default_rng(1)
    a, b = np.zeros((30, 64)), np.zeros((40, 64))
    a[:, :48] = np.maximum(rng.normal(size=(30, 48)), 0)
    b[:, :48] = np.maximum(rng.normal(size=(40, 48)) + 0.3, 0)
    return a, b


def tiny_budgets(params: dict, experiment: str = "digits_lt") -> dict:
    """Shrink an experiment to seconds: the pipeline's wiring is what end-to-end tests check."""
    exp = params["experiments"][experiment]
    exp["model"] = "tiny"
    exp["diffusion"]["timesteps"] = 100
    exp["train"].update(steps=30, checkpoint_every=10, log_every=10, warmup_steps=5, batch_size=32)
    exp["sample"].update(per_class=12, steps=5, batch_size=60)
    exp["evaluate"].setdefault("feature_net", {}).update(steps=60)
    exp["evaluate"].update(kid_subsets=5)
    return params


def run(cmd: list[str] | str, cwd: Path, *, check: bool = True, timeout: int = 600,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command of the project's environment (its venv's bin first on PATH)."""
    inherited = {k: v for k, v in os.environ.items() if k not in _ISOLATED}
    full_env = {**inherited, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
                "DVC_NO_ANALYTICS": "1", "CM_PROGRESS": "0", **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                            timeout=timeout, shell=isinstance(cmd, str))
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def copy_project(dest: Path) -> Path:
    """A git-initialised copy of the project's tracked files at `dest`, tiny budgets in params.yaml."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_budgets(params), sort_keys=False))
    git = ["git", "-c", "user.email=ci@localhost", "-c", "user.name=ci"]
    run(["git", "init", "-q"], dest)
    run(git + ["add", "-A"], dest)
    run(git + ["commit", "-qm", "copy"], dest)
    return dest


@pytest.fixture
def project(tmp_path) -> Path:
    """A fresh copy of the project for one test (see `copy_project`)."""
    return copy_project(tmp_path / "project")


@pytest.fixture(scope="module")
def shared_project(tmp_path_factory) -> Path:
    """One copy of the project for a module's tests that leave it as they found it."""
    return copy_project(tmp_path_factory.mktemp("shared") / "project")


def copy_run(source: Path, dest: Path) -> Path:
    """A copy of a finished run (its files, git and DVC state, Snakemake's records, file times kept):
    seconds, where running the pipeline again takes minutes. For tests that change what they get."""
    shutil.copytree(source, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def snakemake_run(tmp_path_factory) -> Path:
    """The default pipeline at tiny budgets, run once per test session by `snakemake --cores all`
    (every stage, both methods, MLflow tracking, DVC registration). Tests only read it, or take a
    `copy_run` of it to change. Under pytest-xdist the workers share one run: the first to need it
    makes it under a file lock in the session's common temporary folder, the others wait for it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # popen-gw<N>/ of each worker sits in the session's folder
    project, done = root / "snakemake_run" / "project", root / "snakemake_run" / "done"
    with open(root / "snakemake_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(project.parent, ignore_errors=True)
            project.parent.mkdir(parents=True)
            copy_project(project)
            run(["snakemake", "--cores", "all"], project)
            done.touch()
    return project
