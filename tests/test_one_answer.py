"""One answer: `snakemake --cores all`, `snakemake --cores 1` and `dvc repro` compute the same bits.

Every stage computes with params.yaml's resources.<entry>.threads whoever runs it. The thread
counts here are 2, so Snakemake's `--cores 1` grants fewer than asked and `dvc repro` grants
nothing at all; with thread counts taken from the scheduler or from os.cpu_count(), training
would give other weights (the test shows that it does) and every number downstream would differ.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml

from cm import io
from tests.conftest import copy_run, run
from tests.helpers import EXP, assert_same_numbers, numbers, outputs

pytestmark = pytest.mark.e2e
METRICS = f"{EXP}/metrics/cm/seed0.json"


def shrink(project):
    """One method, no tracking (seconds per job), and two threads for every stage."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["methods"] = ["cm"]
    params["tracking"]["enabled"] = False
    exp = params["experiments"]["digits_lt"]
    exp["train"].update(steps=10, checkpoint_every=10)
    exp["evaluate"]["feature_net"].update(steps=30)
    for entry in params["resources"].values():
        entry["threads"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=ci@localhost", "-c", "user.name=ci"]
    run(git + ["commit", "-qam", "shrink"], project)


def test_snakemake_at_any_core_count_and_dvc_repro_give_the_same_bits(project, tmp_path):
    shrink(project)
    copies = {"cores_all": project, "cores_1": tmp_path / "cores_1", "dvc": tmp_path / "dvc"}
    for name in ("cores_1", "dvc"):
        copy_run(project, copies[name])
    commands = {"cores_all": ["snakemake", "--cores", "all", METRICS],
                "cores_1": ["snakemake", "--cores", "1", METRICS],
                "dvc": ["dvc", "repro", "--quiet", "evaluate@digits_lt-cm-0"]}
    # At once, in three folders: the test's time is that of the slowest. Six threads share the
    # cores, so OpenMP's waiting threads sleep rather than spin (a third less CPU; same numbers).
    with ThreadPoolExecutor(len(commands)) as pool:
        list(pool.map(lambda name: run(commands[name], copies[name], env={"OMP_WAIT_POLICY": "passive"}),
                      commands))

    reference = numbers(project)
    assert len(reference) == 3, sorted(reference)  # cm's metrics, images and labels
    assert np.bincount(reference["samples/cm/seed0/samples.npz labels"]).tolist() == [12] * 10  # balanced
    assert 0 < reference["metrics/cm/seed0.json"]["fid"] < 1e4  # a real run
    files = outputs(project)
    # manifest, evaluator (2), reference (2), pretrain (2: the from-scratch record, its empty history),
    # train (model and history), merged, samples, metrics, features
    assert len(files) == 13, sorted(files)
    for name in ("cores_1", "dvc"):
        assert_same_numbers(reference, numbers(copies[name]), name)
        assert outputs(copies[name]) == files, name  # every output, byte for byte
    # The lock records the thread count the results were computed with.
    lock = yaml.safe_load((copies["dvc"] / "dvc.lock").read_text())
    assert lock["stages"]["train@digits_lt-cm-0"]["params"]["params.yaml"]["resources.train.threads"] == 2

    # A stage run by hand with another count says so in one line, and its numbers do differ: the
    # comparison above would have caught orchestrators computing with different counts.
    result = run(["python", "-m", "cm", "train", "--experiment", "digits_lt", "--method", "cm", "--seed", "0",
                  "--manifest", f"{EXP}/data/manifest.json", "--out", "other/model.pt", "--history",
                  "other/history.csv", "--checkpoints", "other/checkpoints", "--threads", "1"], project)
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.stderr
    assert ("--threads 1 differs from params.yaml's resources.train.threads = 2, which Snakemake, DVC and "
            "dvc.lock use" in warnings[0]) and "drop --threads" in warnings[0]
    ours, theirs = io.load_torch(project / "other/model.pt"), io.load_torch(project / EXP / "train/cm/seed0/model.pt")
    assert any(not np.array_equal(ours["ema"][k].numpy(), theirs["ema"][k].numpy()) for k in ours["ema"])
