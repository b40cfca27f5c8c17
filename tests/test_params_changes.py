"""A changed default reruns what it changes, under Snakemake and DVC alike (docs/running.md)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import copy_run, run

pytestmark = pytest.mark.e2e


def dvc_outputs_of_changed_stages(project) -> set[str]:
    """The outputs of every stage `dvc status` names for a changed parameter."""
    from dvc.repo import Repo

    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    changed = {name for name, entries in status.items()
               for entry in entries if isinstance(entry, dict)
               for path in entry.get("changed deps", {}) if path.endswith("params.yaml")}
    with Repo(str(project)) as repo:
        return {out.def_path for stage in repo.index.stages if stage.name in changed for out in stage.outs}


def snakemake_plan(project) -> tuple[set[str], set[str]]:
    """The rules of the jobs Snakemake's dry run would rerun, and of those whose own params changed
    (a job whose input is rerun too states that reason only)."""
    result = run(["snakemake", "--dry-run", "--rerun-triggers", "params"], project)
    blocks = re.split(r"\n(?:local)?rule ", result.stdout + result.stderr)[1:]
    planned = {block.split(":", 1)[0] for block in blocks} - {"report", "register_dvc", "all"}
    changed = {block.split(":", 1)[0] for block in blocks
               if re.search(r"^    reason: .*Params have changed", block, re.M)}
    return planned, changed


def stages_whose_values_change(project, dotted, value) -> set[str]:
    """Independently of either orchestrator: the stages whose settings, as cm/pipeline.py lists them
    and as the stages get them, differ after the edit."""
    from cm import config as cfg
    from cm.pipeline import PARAMS, stage_params

    raw = yaml.safe_load((project / "params.yaml").read_text())
    before = cfg.check_params(raw, base_dir=project)
    set_value(raw, dotted, value)
    after = cfg.check_params(raw, base_dir=project)
    return {stage for stage in PARAMS for method in before["methods"]
            if stage_params(before, stage, experiment="digits_lt", method=method)
            != stage_params(after, stage, experiment="digits_lt", method=method)}


def rule_of(path: str) -> str:
    """The stage that writes a results/<experiment>/<stage folder>/... path."""
    folder = path.split("/")[2]
    return {"data": "prepare_data", "evaluator": "train_evaluator", "reference": "reference_features",
            "merged": "merge", "samples": "sample", "features": "evaluate", "metrics": "evaluate",
            "history": "train"}.get(folder, folder)


def set_value(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        params = params[key]
    params[last] = value


def edited(project, dotted: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    set_value(params, dotted, value)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize(("default", "value", "stages", "dvc_also"), [
    # Read by sampling only: both orchestrators name the sample jobs and nothing else.
    ("defaults.sample.guidance", 2.0, {"sample"}, set()),
    ("defaults.probe.draws", 2, {"probe"}, set()),
    ("defaults.evaluate.prdc_k", 3, {"reference_features", "evaluate"}, set()),
    # The data block: its readers; DVC also names pretrain and train, which track the defaults'
    # data block for a fine-tuning's pretraining (docs/running.md).
    ("defaults.data.imbalance_ratio", 5, {"prepare_data", "train_evaluator", "reference_features", "evaluate"},
     {"pretrain", "train"}),
    # A key the experiment states: its values do not change, so Snakemake reruns nothing; DVC sees
    # the defaults' block change.
    ("defaults.data.hflip", False, set(),
     {"prepare_data", "train_evaluator", "reference_features", "evaluate", "pretrain", "train"}),
])
def test_a_changed_default_reruns_the_stages_whose_values_it_changes(snakemake_run, tmp_path, default, value,
                                                                    stages, dvc_also):
    project = copy_run(snakemake_run, tmp_path / "project")
    assert dvc_outputs_of_changed_stages(project) == set() and snakemake_plan(project) == (set(), set())
    assert stages_whose_values_change(project, default, value) == stages
    edited(project, default, value)
    planned, params_changed = snakemake_plan(project)
    # Snakemake reruns the stages whose values changed (their own reason, or an input rerun first),
    # and what depends on them; no job for a value that did not change.
    assert params_changed <= stages <= planned
    if not stages:
        assert planned == set()
    assert {rule_of(path) for path in dvc_outputs_of_changed_stages(project)} == stages | dvc_also
