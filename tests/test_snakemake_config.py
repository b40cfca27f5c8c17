"""Every configuration mistake stops the real Snakemake at parse time: one clear message, no
traceback, nothing written (a project copy, no pipeline run)."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import ROOT, run
from tests.helpers import DUPLICATES, MISTAKES

pytestmark = pytest.mark.e2e


# Every mistake of the CLI's catalogue (tests/test_config.py), and these that need the pipeline's
# selection, must stop Snakemake at parse time: (edit, what the message says).
SNAKEMAKE_MISTAKES = [(edit, (key, value, allowed)) for edit, key, value, allowed in MISTAKES] + [
    (lambda p: p.update(theta_g_only=["cm+oc"]),
     ("theta_g_only[0] = 'cm+oc' is not allowed: must be one of methods",)),
    (lambda p: p.update(run=["cifar"]), ("run[0] = 'cifar' is not an experiment",)),
    (lambda p: p["experiments"]["digits_lt"].update(trian={}), ("unknown key 'experiments.digits_lt.trian'",)),
]


def stops_before_any_job(project, params_text: str, expected: tuple[str, ...]) -> str:
    """`snakemake --cores all` on `params_text` fails with every `expected` text, no traceback, and
    writes nothing (an earlier result stays as it was); the project's params.yaml is restored.
    Returns what Snakemake printed."""
    params_file = project / "params.yaml"
    sentinel = project / "results" / "digits_lt" / "data" / "manifest.json"
    sentinel.parent.mkdir(parents=True, exist_ok=True)
    sentinel.write_text("{}")
    good = params_file.read_text()
    params_file.write_text(params_text)
    try:
        result = run(["snakemake", "--cores", "all"], project, check=False)
    finally:
        params_file.write_text(good)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and all(text in output for text in expected), output
    assert "Traceback" not in output
    assert sorted(p.name for p in (project / "results").rglob("*")) == ["data", "digits_lt", "manifest.json"]
    assert sentinel.read_text() == "{}" and not (project / "logs").exists()
    return output


# YAML syntax errors in the seeds entry of the shipped file: a tab, and a list left open. Each
# message names the file, the line and column where parsing stopped ({line}: the tab's), and the problem.
YAML_ERRORS = [("seeds:\n\t- 0\n", r"line {line}, column 1: not valid YAML: found character '\\t'"),
               ("seeds: [0\n", r"line \d+, column \d+: not valid YAML: expected ',' or ']'")]


@pytest.mark.parametrize("seeds_entry, says", YAML_ERRORS)
def test_a_yaml_syntax_error_names_file_line_and_column_under_snakemake_and_the_cli(shared_project, seeds_entry,
                                                                                      says):
    lines = (ROOT / "params.yaml").read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("seeds:"))
    assert lines[at + 1] == "- 0\n"  # the shipped entry: `seeds:` and its one item
    text = "".join(lines[:at] + [seeds_entry] + lines[at + 2:])
    says = says.format(line=at + 2)
    output = stops_before_any_job(shared_project, text, ())
    assert re.search("params.yaml, " + says, output), output
    (shared_project / "broken.yaml").write_text(text)
    check = run(["python", "-m", "cm", "check", "--params", "broken.yaml"], shared_project, check=False)
    assert check.returncode == 2 and check.stderr.count("\n") == 1, check.stderr
    assert re.match("error: broken.yaml, " + says, check.stderr), check.stderr


@pytest.mark.parametrize("edit, expected", SNAKEMAKE_MISTAKES)
def test_bad_configuration_stops_snakemake_before_any_job(shared_project, edit, expected):
    params = yaml.safe_load((shared_project / "params.yaml").read_text())
    edit(params)
    stops_before_any_job(shared_project, yaml.safe_dump(params, sort_keys=False), expected)


@pytest.mark.parametrize("old, new, key", DUPLICATES)
def test_duplicated_key_stops_snakemake_before_any_job(shared_project, old, new, key):
    shipped = (ROOT / "params.yaml").read_text()  # its own formatting: the cases edit its text
    text = shipped.replace(old, new, 1)
    assert text != shipped
    stops_before_any_job(shared_project, text, ("params.yaml: duplicated key", f"'{key}'"))


def test_a_negative_seed_on_the_command_line_is_named_with_its_range(shared_project):
    result = run(["snakemake", "--cores", "all", "--config", "seeds=[-1]"], shared_project, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    assert "seeds[0] = -1 is not allowed: must be a number >= 0" in output, output
