"""Reproduction check: every difference between a reproduced and the committed dvc.lock, named;
inputs must agree everywhere, derived entries on the lock's machine kind, and on another kind the
default's metrics within their tolerance."""

from __future__ import annotations

import copy
import subprocess
import sys

import yaml

from cm.lockdiff import (
    CHECKED_METRICS,
    TOLERANCE_SDS,
    compare_locks,
    expected_metrics,
    lock_differences,
    machine_kind,
    metric_differences,
)
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
    assert same.returncode == 0 and same.stderr == ""
    assert same.stdout.splitlines()[0] == ("inputs: 4 parameters and dependencies no stage produces compared, "
                                           "all equal")
    differs = subprocess.run(cmd + [str(tmp_path / "dvc.lock")], cwd=ROOT, capture_output=True, text=True)
    assert differs.returncode == 1
    assert differs.stdout.splitlines()[1] == "derived: 2 outputs and dependencies on them compared, 1 differ"
    assert differs.stderr.splitlines()[0] == ("stage report@digits_lt: output results/digits_lt/report/metrics.json "
                                              "has md5 c2, the committed lock cc")
    # Made on another kind of machine: differing outputs are reported, not failed; inputs still fail.
    (tmp_path / "machine.txt").write_text("x86_64, another CPU, AVX512, torch 2.14.1\n")
    other = subprocess.run(cmd + [str(tmp_path / "dvc.lock"), "--made-on", str(tmp_path / "machine.txt")],
                           cwd=ROOT, capture_output=True, text=True)
    assert other.returncode == 0
    assert "derived: 1 of 2 outputs and dependencies on them differ, as floats may on another CPU" in other.stdout
    new["stages"]["report@digits_lt"]["params"] = {"params.yaml": {"seeds": [1]}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(new))
    inputs = subprocess.run(cmd + [str(tmp_path / "dvc.lock"), "--made-on", str(tmp_path / "machine.txt")],
                            cwd=ROOT, capture_output=True, text=True)
    assert inputs.returncode == 1 and "params.yaml has seeds = [1], the committed lock None" in inputs.stderr


# A lock of three stages: train's output is merge's dependency, and report depends on the folder
# that evaluate fills. Only cm/train.py and the parameters are inputs.
CHAIN = {"schema": "2.0", "stages": {
    "train": {"deps": [{"path": "cm/train.py", "md5": "c1"}],
              "params": {"params.yaml": {"seeds": [0]}},
              "outs": [{"path": "results/x/train/model.pt", "md5": "t1"}]},
    "evaluate": {"deps": [{"path": "results/x/train/model.pt", "md5": "t1"}],
                 "outs": [{"path": "results/x/metrics/ddpm/seed0.json", "md5": "m1"}]},
    "report": {"deps": [{"path": "results/x/metrics", "md5": "d1.dir"}],
               "outs": [{"path": "results/x/report/metrics.json", "md5": "r1"}]},
}}


def _with(lock: dict, stage: str, kind: str, path: str, md5: str) -> dict:
    """A copy of `lock` in which the entry `path` of `stage`'s `kind` has another md5."""
    new = copy.deepcopy(lock)
    for entry in new["stages"][stage][kind]:
        if entry["path"] == path:
            entry["md5"] = md5
    return new


def _another_cpu() -> dict:
    """CHAIN as another CPU reproduces it: every derived hash differs, every input is the same."""
    new = _with(CHAIN, "train", "outs", "results/x/train/model.pt", "t2")
    new = _with(new, "evaluate", "deps", "results/x/train/model.pt", "t2")
    new = _with(new, "evaluate", "outs", "results/x/metrics/ddpm/seed0.json", "m2")
    new = _with(new, "report", "deps", "results/x/metrics", "d2.dir")
    return _with(new, "report", "outs", "results/x/report/metrics.json", "r2")


def test_dependencies_that_a_stage_produces_are_derived_not_inputs():
    comparison = compare_locks(CHAIN, _another_cpu())
    assert (comparison.inputs, comparison.derived) == (2, 5)  # seeds and cm/train.py; 3 outs + 2 deps on them
    assert [d.kind for d in comparison.differences] == ["derived"] * 5
    assert "stage evaluate: dependency (another stage's output) results/x/train/model.pt has md5 t2, the " \
           "committed lock t1" in [d.text for d in comparison.differences]


def test_a_code_dependency_or_a_parameter_is_an_input():
    code = _with(CHAIN, "train", "deps", "cm/train.py", "c2")
    assert [d.kind for d in lock_differences(CHAIN, code)] == ["input"]
    param = copy.deepcopy(CHAIN)
    param["stages"]["train"]["params"]["params.yaml"]["seeds"] = [1]
    assert [d.kind for d in lock_differences(CHAIN, param)] == ["input"]


def _lock_diff(tmp_path, reproduced: dict, *, made_on: str, metrics: dict | None = None):
    (tmp_path / "committed.lock").write_text(yaml.safe_dump(CHAIN))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(reproduced))
    (tmp_path / "machine.txt").write_text(made_on + "\n")
    cmd = [sys.executable, "-m", "cm", "lock-diff", str(tmp_path / "committed.lock"), str(tmp_path / "dvc.lock"),
           "--made-on", str(tmp_path / "machine.txt")]
    if metrics is not None:
        (tmp_path / "expected.json").write_text(yaml.safe_dump(metrics))
        cmd += ["--metrics", str(tmp_path / "expected.json")]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


OTHER_KIND = "x86_64, another CPU, AVX512, torch 2.14.1"


def test_derived_differences_fail_on_the_locks_kind_and_are_reported_on_another(tmp_path):
    other = _lock_diff(tmp_path, _another_cpu(), made_on=OTHER_KIND)
    assert other.returncode == 0, other.stderr
    assert other.stdout.splitlines()[0] == ("inputs: 2 parameters and dependencies no stage produces compared, "
                                            "all equal")
    assert other.stdout.splitlines()[1].startswith("derived: 5 of 5 outputs and dependencies on them differ, as "
                                                   "floats may on another CPU (reported, not failed)")
    same = _lock_diff(tmp_path, _another_cpu(), made_on=machine_kind())
    assert same.returncode == 1
    assert same.stderr.splitlines()[-1].startswith("5 difference(s) from ")


def test_inputs_fail_on_every_kind(tmp_path):
    code = _with(_another_cpu(), "train", "deps", "cm/train.py", "c2")
    param = copy.deepcopy(_another_cpu())
    param["stages"]["train"]["params"]["params.yaml"]["seeds"] = [1]
    for reproduced in (code, param):
        for kind in (OTHER_KIND, machine_kind()):
            result = _lock_diff(tmp_path, reproduced, made_on=kind)
            assert result.returncode == 1, (reproduced, kind)
            assert "inputs: 2 parameters and dependencies no stage produces compared, 1 differ" in result.stdout


def _expected(source: str, value: float, tolerance: float) -> dict:
    return {"source": source, "tolerance": "a stated rule",
            "metrics": {"ddpm": {"fid": {"value": value, "tolerance": tolerance}}}}


def test_metrics_outside_their_tolerance_fail_inside_pass(tmp_path):
    report = tmp_path / "metrics.json"
    report.write_text('{"ddpm": {"fid": 1.30, "fid_std": 0.0, "seeds": 1}}')
    inside = _lock_diff(tmp_path, _another_cpu(), made_on=OTHER_KIND, metrics=_expected(str(report), 1.0, 0.35))
    assert inside.returncode == 0, inside.stderr
    assert f"metrics: 1 of {report} checked against" in inside.stdout
    outside = _lock_diff(tmp_path, _another_cpu(), made_on=OTHER_KIND, metrics=_expected(str(report), 1.0, 0.25))
    assert outside.returncode == 1
    assert "metrics: ddpm fid = 1.3, outside the committed 1 +- 0.25 (a stated rule)" in outside.stderr
    # On the lock's kind the metrics are checked too (they are equal there anyway).
    same_kind = _lock_diff(tmp_path, CHAIN, made_on=machine_kind(), metrics=_expected(str(report), 1.0, 0.25))
    assert same_kind.returncode == 1


def test_a_missing_or_non_finite_metric_fails():
    expected = _expected("report/metrics.json", 1.0, 0.5)
    assert metric_differences(expected, {"ddpm": {"fid": 1.2}}) == []
    assert metric_differences(expected, {"cm": {"fid": 1.2}}) == [
        "metrics: ddpm fid is missing from the reproduced report/metrics.json"]
    assert len(metric_differences(expected, {"ddpm": {"fid": float("nan")}})) == 1


def test_the_tolerance_is_the_pooled_seed_spread_times_the_stated_factor():
    # Two methods, 3 and 5 seeds: pooled variance (2 * 0.3^2 + 4 * 0.6^2) / 6 = 0.27.
    spread = {"ddpm": {"seeds": 3, **{f"{m}_std": 0.3 for m in CHECKED_METRICS}},
              "cm": {"seeds": 5, **{f"{m}_std": 0.6 for m in CHECKED_METRICS}}}
    values = {"ddpm": {m: 1.0 for m in CHECKED_METRICS}, "cm": {m: 2.0 for m in CHECKED_METRICS}}
    expected = expected_metrics(values, spread, source="r/metrics.json", made_on="a machine")
    fid = expected["metrics"]["cm"]["fid"]
    assert fid["value"] == 2.0
    assert abs(fid["tolerance"] - TOLERANCE_SDS * (2 * 0.27) ** 0.5) < 1e-12
    assert set(expected["metrics"]["ddpm"]) == set(CHECKED_METRICS)


def test_a_file_that_is_not_a_lock_is_refused_in_one_line(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "binary.lock").write_bytes(bytes(range(256)))
    (tmp_path / "good.lock").write_text(yaml.safe_dump(CHAIN))
    for bad, says in ((tmp_path, "is a folder, not file (a dvc.lock expected)"),
                      (tmp_path / "list.yaml", "not a dvc.lock (a mapping with 'stages' expected, found list)"),
                      (tmp_path / "binary.lock", "not a dvc.lock")):
        result = subprocess.run([sys.executable, "-m", "cm", "lock-diff", str(tmp_path / "good.lock"), str(bad)],
                                cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: {bad}: ") and says in result.stderr
