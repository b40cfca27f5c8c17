"""Snakemake and DVC declare the same stages: same commands, outputs, inputs and parameters."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from cm import config as cfg
from cm.cli import build_parser
from cm.pipeline import CODE, dvc_param_keys, dvc_stage_names
from cm.threads import stage_threads
from tests.conftest import run

ONLY_SNAKEMAKE = {"all", "register_dvc"}  # the target rule, and the rule that records outputs in DVC


def snakemake_jobs(project):
    """{shell command: {rule, outputs, inputs}} from Snakemake's dry run of the whole workflow."""
    out = run(["snakemake", "--dry-run", "--printshellcmds", "--forceall"], project).stdout
    jobs = {}
    for block in re.split(r"\n(?:local)?rule ", out)[1:]:
        rule = block.split(":", 1)[0]
        fields = dict(re.findall(r"^    (input|output): (.*)$", block, re.M))
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        if rule in ONLY_SNAKEMAKE or shell is None:
            continue
        # Snakemake adds its log redirection and the report's selection (which --config may
        # change); DVC runs the bare command, whose report reads params.yaml's. Neither passes a
        # thread count: the stage reads params.yaml's.
        cmd = " ".join(re.sub(r" > \S+ 2>&1| --methods( [\w+]+)+ --seeds( \d+)+ --baseline \S+", "",
                              shell.group(1)).split())
        jobs[cmd] = {"rule": rule, "outputs": set(fields["output"].split(", ")),
                     "inputs": set(fields.get("input", "").split(", ")) - {""}}
    return jobs


def dvc_stages(project):
    """{command: {name, outs, deps, params}} from DVC's resolved pipeline."""
    from dvc.repo import Repo

    stages = {}
    with Repo(str(project)) as repo:
        for stage in repo.index.stages:
            deps = [d.def_path for d in stage.deps if not d.def_path.endswith("params.yaml")]
            params = [p for d in stage.deps if d.def_path.endswith("params.yaml") for p in d.params]
            stages[" ".join(stage.cmd.split())] = {"name": stage.name, "outs": {o.def_path for o in stage.outs},
                                                   "deps": deps, "params": sorted(params)}
    return stages


def covered(path, deps):
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize(("seeds", "theta_g_only"), [([0], []), ([0, 1], ["cm"])])
def test_snakemake_and_dvc_run_the_same_commands_on_the_same_paths(project, seeds, theta_g_only):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["seeds"], params["theta_g_only"] = seeds, theta_g_only  # both orchestrators read params.yaml
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    jobs, stages = snakemake_jobs(project), dvc_stages(project)
    assert set(jobs) == set(stages), set(jobs) ^ set(stages)
    for cmd, job in jobs.items():
        stage = stages[cmd]
        stage_name, _, instance = stage["name"].partition("@")
        rule = stage_name.removesuffix("_gonly")  # DVC's theta_g-only stages are Snakemake's rules
        assert job["rule"] == rule
        assert job["outputs"] == stage["outs"], cmd
        # Every Snakemake input is a DVC dependency (or inside one), and vice versa.
        assert all(covered(path, stage["deps"]) for path in job["inputs"]), cmd
        assert all(any(covered(path, [dep]) for path in job["inputs"]) for dep in stage["deps"]), cmd
        assert sorted(CODE[rule]) == sorted(d for d in stage["deps"] if d.startswith("cm/"))
        experiment, method = instance.split("-")[0], (instance.split("-") + [None])[1]
        expected = dvc_param_keys(rule, experiment=experiment, method=method)
        if rule == "train":  # DVC depends on all of method_params (see dvc.yaml), a superset
            assert "method_params" in stage["params"]
            expected = [k for k in expected if not k.startswith("method_params.")] + ["method_params"]
        assert stage["params"] == sorted(expected), stage["name"]
    # Per experiment: 5 shared stages (prepare_data, pretrain, train_evaluator, reference_features, report),
    # train/merge/sample/evaluate/probe per method and seed, and merge/sample/evaluate per theta_g-only
    # model and seed; register_dvc commits exactly DVC's names.
    assert len(stages) == 5 + (5 * len(params["methods"]) + 3 * len(theta_g_only)) * len(seeds)
    assert sorted(dvc_stage_names(params, "digits_lt")) == sorted(s["name"] for s in stages.values())


def test_snakemake_lint_is_clean(project):
    result = run(["snakemake", "--lint"], project, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


def test_the_report_follows_a_config_selection(project):
    """`--config` may change which runs Snakemake makes; the report must show exactly those."""
    out = run(["snakemake", "--dry-run", "--printshellcmds", "--forceall", "--config", "methods=[cbdm,cm+oc]",
               "seeds=[0,2]", "theta_g_only=[cm+oc]"], project).stdout
    report = next(line for line in out.splitlines() if "python -m cm report" in line)
    assert "--methods cbdm cm+oc cm+oc_gonly --seeds 0 2 --baseline cbdm" in report
    assert "train/cm+oc/seed2/model.pt" in out and "train/cm+oc_gonly" not in out


def test_snakemake_schedules_each_stage_with_the_thread_count_it_computes_with(project):
    """One place: params.yaml's resources. Snakemake's `threads` for a job and the count its command
    computes with (the same command DVC runs, without --threads) come from the same entry."""
    counts = {"default": 5, "train": 3, "sample": 2, "evaluate": 4}
    params = yaml.safe_load((project / "params.yaml").read_text())
    for entry, threads in counts.items():
        params["resources"][entry]["threads"] = threads
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    expected = {"prepare_data": 5, "pretrain": 3, "train_evaluator": 4, "reference_features": 4, "train": 3, "merge": 5,
                "sample": 2, "evaluate": 4, "probe": 4, "report": 5}
    out = run(["snakemake", "--dry-run", "--printshellcmds", "--forceall", "--cores", "8"], project).stdout
    loaded, parser, seen = cfg.load_params(project / "params.yaml"), build_parser(), set()
    for block in re.split(r"\n(?:local)?rule ", out)[1:]:
        rule = block.split(":", 1)[0]
        if rule in ONLY_SNAKEMAKE:
            continue
        scheduled = re.search(r"^    threads: (\d+)$", block, re.M)  # shown when above 1
        shell = re.search(r"^Shell command: python -m cm (.*?) > \S+ 2>&1$", block, re.M).group(1)
        computed = stage_threads(parser.parse_args(shlex.split(shell)), loaded)
        assert (int(scheduled.group(1)) if scheduled else 1) == computed == expected[rule], rule
        seen.add(rule)
    assert seen == set(expected)
