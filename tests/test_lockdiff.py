"""Reproduction check: every difference between a reproduced and the committed dvc.lock, named."""

from __future__ import annotations

import copy
import subprocess
import sys

import yaml

from cm.lockdiff import lock_differences
from tests.conftest import ROOT

LOCK = {"schema": "2.0", "stages": {
    "train@digits_lt-cm-0": {
        "cmd": "python -m cm train ...",
        "deps": [{"path": "cm/train.py", "hash": "md5", "md5": "aa", "size": 1}],
        "params": {"params.yaml": {"experiments.digits_lt.train": {"steps": 1200, "lr": 0.0002},
                                   "resources.train.threads": 1}},
        "outs": [{"path": "results/digits_lt/train/cm/seed0/model.pt", "hash": "md5", "md5": "bb", "size": 2}],
    },
    "report@digits_lt": {"outs": [{"path": "results/digits_lt/report/metrics.json", "md5": "cc"}]},
}}


def test_the_same_lock_has_no_difference():
    assert lock_differences(LOCK, copy.deepcopy(LOCK)) == []


def test_each_difference_names_its_stage_and_what_differs():
    new = copy.deepcopy(LOCK)
    train = new["stages"]["train@digits_lt-cm-0"]
    train["outs"][0]["md5"] = "b2"
    train["params"]["params.yaml"]["resources.train.threads"] = 2
    train["params"]["params.yaml"]["experiments.digits_lt.train"]["steps"] = 1000
    train["deps"][0]["md5"] = "a2"
    del new["stages"]["report@digits_lt"]
    new["stages"]["evaluate@digits_lt-cm-1"] = {}
    assert [d.text for d in lock_differences(LOCK, new)] == [
        "stage evaluate@digits_lt-cm-1: run but not in the committed lock",
        "stage report@digits_lt: in the committed lock but not run (is it in params.yaml's run, methods and seeds?)",
        "stage train@digits_lt-cm-0: params.yaml has experiments.digits_lt.train.steps = 1000, the committed lock "
        "1200: restore it (git checkout params.yaml) to reproduce",
        "stage train@digits_lt-cm-0: params.yaml has resources.train.threads = 2, the committed lock 1: restore it "
        "(git checkout params.yaml) to reproduce",
        "stage train@digits_lt-cm-0: dependency cm/train.py has md5 a2, the committed lock aa",
        "stage train@digits_lt-cm-0: output results/digits_lt/train/cm/seed0/model.pt has md5 b2, the committed "
        "lock bb",
    ]


def test_the_cli_exits_1_with_the_differences(tmp_path):
    new = copy.deepcopy(LOCK)
    new["stages"]["report@digits_lt"]["outs"][0]["md5"] = "c2"
    for name, lock in (("committed.lock", LOCK), ("dvc.lock", new)):
        (tmp_path / name).write_text(yaml.safe_dump(lock))
    cmd = [sys.executable, "-m", "cm", "lock-diff", str(tmp_path / "committed.lock")]
    same = subprocess.run(cmd + [str(tmp_path / "committed.lock")], cwd=ROOT, capture_output=True, text=True)
    assert same.returncode == 0 and same.stdout + same.stderr == ""
    differs = subprocess.run(cmd + [str(tmp_path / "dvc.lock")], cwd=ROOT, capture_output=True, text=True)
    assert differs.returncode == 1 and differs.stdout == ""
    assert differs.stderr.splitlines()[0] == ("stage report@digits_lt: output results/digits_lt/report/metrics.json "
                                              "has md5 c2, the committed lock cc")
    # Made on another kind of machine: differing outputs are reported, not failed; inputs still fail.
    (tmp_path / "machine.txt").write_text("x86_64, another CPU, AVX512, torch 2.14.1\n")
    other = subprocess.run(cmd + [str(tmp_path / "dvc.lock"), "--made-on", str(tmp_path / "machine.txt")],
                           cwd=ROOT, capture_output=True, text=True)
    assert other.returncode == 0 and "1 output(s) differ, as floats may on another CPU" in other.stderr
    new["stages"]["report@digits_lt"]["params"] = {"params.yaml": {"seeds": [1]}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(new))
    inputs = subprocess.run(cmd + [str(tmp_path / "dvc.lock"), "--made-on", str(tmp_path / "machine.txt")],
                            cwd=ROOT, capture_output=True, text=True)
    assert inputs.returncode == 1 and "params.yaml has seeds = [1], the committed lock None" in inputs.stderr
