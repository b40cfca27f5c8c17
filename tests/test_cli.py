"""The command line: help on every option, thread counts from params.yaml, Ctrl-C in one line."""

from __future__ import annotations

import argparse
import signal

import pytest

from cm import cli
from cm import config as cfg
from cm.threads import stage_threads
from tests.conftest import ROOT, VENV_BIN, run
from tests.helpers import checkpoint_steps, set_budget, start, wait_for


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help():
    parser = cli.build_parser()
    subs = subcommands(parser)
    assert len(subs) == 17, sorted(subs)
    missing = []
    listed = {a.dest: a.help for a in next(a for a in parser._actions
                                           if isinstance(a, argparse._SubParsersAction))._choices_actions}
    missing += [f"{name} (in the list of stages)" for name in subs if not listed.get(name)]
    for name, sub in subs.items():
        for action in sub._actions:
            if not action.help or action.help == argparse.SUPPRESS or not action.help.strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help: {missing}"


def test_the_thread_count_comes_from_params_yaml_and_never_from_the_machine(caplog):
    params = cfg.load_params(ROOT / "params.yaml")
    params["resources"].update(train={**params["resources"]["train"], "threads": 3},
                               default={**params["resources"]["default"], "threads": 5})
    parser = cli.build_parser()
    common = ["--experiment", "digits_lt", "--method", "cm", "--seed", "0", "--manifest", "m", "--out", "o",
              "--history", "h", "--checkpoints", "c"]
    assert stage_threads(parser.parse_args(["train", *common]), params) == 3
    assert stage_threads(parser.parse_args(["merge", "--experiment", "digits_lt", "--method", "cm", "--seed",
                                                "0", "--model", "m", "--out", "o"]), params) == 5
    # Data preparation computes no floats that a thread count could change: no warning.
    assert stage_threads(parser.parse_args(["prepare-data", "--experiment", "digits_lt", "--out", "o",
                                                "--threads", "2"]), params) == 2
    assert not caplog.records
    assert stage_threads(parser.parse_args(["train", *common, "--threads", "2"]), params) == 2  # overrides
    [record] = caplog.records
    assert record.levelname == "WARNING" and "\n" not in record.getMessage()
    assert record.getMessage().startswith("--threads 2 differs from params.yaml's resources.train.threads = 3")
    with pytest.raises(cfg.ConfigError, match=r"^--threads = 0 is not allowed: must be an integer >= 1$"):
        stage_threads(parser.parse_args(["train", *common, "--threads", "0"]), params)


def test_interrupt_messages_name_the_job():
    parser = cli.build_parser()
    train = parser.parse_args(["train", "--experiment", "digits_lt", "--method", "cm+oc", "--seed", "2",
                               "--manifest", "m", "--out", "o", "--history", "h", "--checkpoints", "c"])
    assert cli._interrupted(train) == "interrupted: train digits_lt cm+oc seed 2; run the same command again to resume"
    prepare = parser.parse_args(["prepare-data", "--experiment", "digits_lt", "--out", "o"])
    assert cli._interrupted(prepare) == ("interrupted: prepare-data digits_lt; run the same command again to redo "
                                         "it (nothing half-written was kept)")


@pytest.mark.e2e
def test_ctrl_c_in_a_running_stage_is_one_line_and_status_130_and_the_same_command_resumes(project):
    set_budget(project, steps=60, checkpoint_every=5)
    run(["python", "-m", "cm", "prepare-data", "--experiment", "digits_lt",
         "--out", "results/digits_lt/data/manifest.json"], project)
    out = "results/digits_lt/train/cm/seed0"
    cmd = [str(VENV_BIN / "python"), "-m", "cm", "train", "--experiment", "digits_lt", "--method", "cm", "--seed",
           "0", "--manifest", "results/digits_lt/data/manifest.json", "--out", f"{out}/model.pt",
           "--history", f"{out}/history.csv", "--checkpoints", f"{out}/checkpoints"]
    proc = start(cmd, project)
    wait_for(lambda: checkpoint_steps(project / out) or proc.poll() is not None, what="a checkpoint")
    assert proc.poll() is None, "the stage ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert output.strip().splitlines()[-1] == ("interrupted: train digits_lt cm seed 0; "
                                               "run the same command again to resume")
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert not (project / out / "model.pt").exists()
    again = run(cmd, project)
    assert "resuming from" in again.stderr and (project / out / "model.pt").is_file()
