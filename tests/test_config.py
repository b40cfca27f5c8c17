"""params.yaml validation: experiments completed from `defaults`, and one clear message per kind of mistake."""

from __future__ import annotations

import copy
import difflib
import re
import subprocess
import sys

import pytest
import yaml

from cm import config as cfg
from cm.method_names import METHOD_NAMES
from tests.conftest import ROOT
from tests.helpers import DUPLICATES, MISTAKES


@pytest.fixture
def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def error_of(raw) -> str:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.check_params(raw, base_dir=ROOT)
    return str(info.value)


def test_shipped_params_are_valid_and_complete(raw):
    params = cfg.load_params(ROOT / "params.yaml")
    assert params["run"] == ["digits_lt"]
    assert params["methods"] == ["ddpm", "cm"]
    # Completing a completed configuration changes nothing, and the file keeps `defaults` for DVC.
    assert cfg.check_params(raw, base_dir=ROOT) == params == cfg.check_params(params, base_dir=ROOT)
    assert params["defaults"] == raw["defaults"]


def test_an_experiment_takes_every_value_it_does_not_state_from_defaults(raw):
    params = cfg.check_params(raw, base_dir=ROOT)
    defaults, stated = raw["defaults"], raw["experiments"]
    for name, experiment in params["experiments"].items():
        for block in ("data", "diffusion", "probe", "train", "sample", "evaluate"):
            for key, value in experiment[block].items():
                own = stated[name][block]
                if key not in own:
                    assert value == defaults[block][key], (name, block, key)
                elif not isinstance(value, dict):
                    assert value == own[key], (name, block, key)
    # A nested mapping merges key by key: the CPU CIFAR run states two of feature_net's values.
    feature_net = params["experiments"]["cifar10lt_ir100_cpu"]["evaluate"]["feature_net"]
    assert feature_net == {**defaults["evaluate"]["feature_net"], "steps": 300, "test_fraction": 0.1}
    # A fine-tuning's pretraining: the defaults' data and train with its changes; lora completed.
    finetune = params["experiments"]["digits_ft_lt"]["finetune"]
    assert finetune["pretrain"]["data"] == {**defaults["data"], "imbalance_ratio": 1, "hflip": False}
    assert finetune["pretrain"]["train"] == defaults["train"]
    assert finetune["lora"] == {**defaults["finetune"]["lora"], "rank": 4}
    assert params["experiments"]["digits_lt"]["finetune"] is None


def test_a_changed_default_reaches_exactly_the_experiments_that_do_not_state_it(raw):
    raw["defaults"]["train"]["ema_decay"] = 0.5
    params = cfg.check_params(raw, base_dir=ROOT)
    decays = {name: e["train"]["ema_decay"] for name, e in params["experiments"].items()}
    states = {name for name, e in raw["experiments"].items() if "ema_decay" in e["train"]}
    assert states and len(states) < len(decays)
    assert {name for name, decay in decays.items() if decay == 0.5} == set(decays) - states


def test_an_experiment_without_a_block_or_defaults_without_a_key_is_refused_in_one_line(raw):
    broken = copy.deepcopy(raw)
    del broken["experiments"]["capacity_ch8"]["probe"]
    assert error_of(broken) == ("params.yaml: experiments.capacity_ch8: 'probe' is a required property (every "
                                "experiment names each block; {} keeps the defaults, and DVC tracks each block by "
                                "its key)")
    del raw["defaults"]["train"]["ema_decay"]
    message = error_of(raw)
    assert message == "params.yaml: defaults.train: 'ema_decay' is a required property"


@pytest.mark.parametrize("edit, key, value, allowed", MISTAKES)
def test_mistakes_name_key_value_and_what_is_allowed(raw, edit, key, value, allowed):
    edit(raw)
    message = error_of(raw)
    assert message.startswith("params.yaml: ")
    assert key in message and value in message and allowed in message
    assert "\n" not in message


@pytest.mark.parametrize("edit, key, value, allowed", MISTAKES)
def test_each_mistake_ends_the_cli_in_one_line(tmp_path, raw, edit, key, value, allowed):
    edit(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "cm", "check", "--params", str(tmp_path / "params.yaml")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and key in line and value in line and allowed in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


@pytest.mark.parametrize("old, new, key", DUPLICATES)
def test_duplicated_keys_and_experiment_names_are_refused(tmp_path, old, new, key):
    text = (ROOT / "params.yaml").read_text().replace(old, new, 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(cfg.ConfigError, match=rf"duplicated key '{key}' \(line \d+\)"):
        cfg.load_params(tmp_path / "params.yaml")


def test_yaml_is_parsed_safely(tmp_path):
    (tmp_path / "params.yaml").write_text("run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML"):
        cfg.load_params(tmp_path / "params.yaml")


def test_schema_method_names_are_the_registry():
    assert cfg.schema()["properties"]["methods"]["items"]["enum"] == list(METHOD_NAMES)


def test_input_is_not_modified(raw):
    before = copy.deepcopy(raw)
    raw["experiments"]["digits_lt"]["train"] = {"steps": 7}
    kept = copy.deepcopy(raw)
    cfg.check_params(raw, base_dir=ROOT)
    assert raw == kept and before != kept


def test_dvc_rewrites_only_the_value_it_sets(tmp_path):
    """`dvc exp run -S` round-trips params.yaml through DVC's YAML writer: the shipped layout must
    survive it, so that one set value changes only its own lines."""
    import difflib
    import shutil

    from dvc.utils.serialize import modify_yaml

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    with modify_yaml(tmp_path / "params.yaml") as params:
        params["seeds"] = [1]
    before, after = (ROOT / "params.yaml").read_text().splitlines(), (tmp_path / "params.yaml").read_text().splitlines()
    changed = [line for line in difflib.unified_diff(before, after, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ["-- 0", "+- 1"]  # only the seeds entry


def _leaves(node, path=()):
    """(path, value) of every scalar in a parsed params mapping, lists included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        yield path, node
        return
    for key, value in items:
        yield from _leaves(value, (*path, key))


def _set(node, path, value):
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def test_every_integer_setting_written_as_an_integral_float_becomes_the_integer(raw):
    """JSON Schema counts 240.0 as an integer; a stage cannot (range(240.0), a rank of 4.0). Every
    integer of the completed configuration, written as a float, reaches the stages as the int."""
    params = cfg.check_params(raw, base_dir=ROOT)
    integers = [(path, value) for path, value in _leaves(params) if type(value) is int]
    assert len(integers) > 100  # every experiment's steps, batch sizes, widths, seeds, threads, ...
    floated = copy.deepcopy(params)
    for path, value in integers:
        _set(floated, path, float(value))
    checked = cfg.check_params(floated, base_dir=ROOT)
    number_keys = []
    for path, value in integers:
        got = checked
        for part in path:
            got = got[part]
        assert got == value, path
        if type(got) is not int:
            number_keys.append(path)
    # The floats kept are those of number keys (imbalance_ratio, ...), which take 10.5 as well.
    assert len(number_keys) < len(integers) / 2
    for path in number_keys:
        fractional = copy.deepcopy(params)
        _set(fractional, path, 10.5)
        cfg.check_params(fractional, base_dir=ROOT)


def test_a_fractional_float_for_an_integer_is_refused_naming_the_key(raw):
    raw["experiments"]["digits_lt"]["train"]["steps"] = 240.5
    assert error_of(raw) == ("params.yaml: experiments.digits_lt.train.steps = 240.5 is not allowed: must be "
                             "type integer")


@pytest.mark.parametrize("written, value", [("1e-4", 1e-4), ("2E-3", 2e-3), ("5e-5", 5e-5)])
def test_scientific_notation_that_yaml_reads_as_a_string_is_a_number(raw, written, value):
    text = (ROOT / "params.yaml").read_text().replace("    lr: 0.0002\n", f"    lr: {written}\n", 1)
    loaded = yaml.safe_load(text)
    assert loaded["defaults"]["train"]["lr"] == written  # YAML 1.1: a string
    assert cfg.check_params(loaded, base_dir=ROOT)["experiments"]["digits_lt"]["train"]["lr"] == value
    loaded["experiments"]["digits_lt"]["train"]["lr"] = "1e-4x"
    assert "train.lr = '1e-4x' is not allowed: must be type number" in error_of(loaded)


def test_finetune_with_both_starting_points_says_give_one_of_them(raw):
    raw["experiments"]["digits_lt"]["finetune"] = {"pretrain": {"data": {"source": "digits"}},
                                                   "diffusers": {"path": "sd15"}}
    assert error_of(raw) == "params.yaml: experiments.digits_lt.finetune: give pretrain or diffusers, not both"
    raw["experiments"]["digits_lt"]["finetune"] = 5
    assert error_of(raw).endswith("finetune = 5 is not allowed: must be a mapping with pretrain or a mapping "
                                  "with diffusers")


def test_lora_cm_with_the_shared_encoder_pass_is_refused_when_params_are_read(raw):
    raw["method_params"]["cm"]["passes"] = "shared_encoder"
    raw.update(methods=["lora", "lora+cm"], run=["digits_ft_lt"])
    assert error_of(raw) == (
        "params.yaml: methods[1] = 'lora+cm' is not allowed with method_params.cm.passes = 'shared_encoder': "
        "its expert adapter sits in the encoder too, which that pass shares between h_full and h_g; use passes: two")


def test_an_odd_width_is_refused_when_params_are_read(raw):
    """The base width is also the sinusoidal timestep embedding's, which needs an even width: an odd
    one would pass the check and fail in the first stage that builds the network."""
    raw["experiments"]["digits_lt"]["model"] = {"preset": "small", "ch": 7}
    assert error_of(raw) == "params.yaml: experiments.digits_lt.model.ch = 7 is not allowed: must be a multiple of 2"
    import torch

    from cm.models import build_unet

    net = build_unet({"preset": "small", "ch": 7}, num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="must be even"):
        net(torch.zeros(1, 1, 8, 8), torch.tensor([1]), torch.tensor([0]))


def test_a_lora_rank_larger_than_the_targeted_layers_allow_is_refused(raw):
    """The smallest targeted layer of the fine-tuning experiment's small U-Net is a 3x3 conv with 32
    output channels (ch 32): B A there has rank at most 32."""
    raw.update(run=["digits_ft_lt"], methods=["lora", "lora+cm"])
    lora = raw["experiments"]["digits_ft_lt"]["finetune"]["lora"]
    lora["rank"] = 32
    cfg.check_params(raw, base_dir=ROOT)
    lora["rank"] = 33
    assert error_of(raw) == (
        "params.yaml: experiments.digits_ft_lt.finetune.lora.rank = 33 is not allowed: must be at most 32, the "
        "largest rank the targeted layer 'downblocks.0.conv1' can use (min of its output and input sizes)")


def test_dvc_exp_run_set_rewrites_only_the_value_it_sets(tmp_path):
    """`-S` on a nested key an experiment states, and with `+` on one it takes from defaults."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shipped = (ROOT / "params.yaml").read_text()
    path.write_text(shipped)
    apply_overrides(path, ["experiments.digits_ft_lt.train.steps=300", "+experiments.digits_lt.sample.steps=20"])
    changed = [line for line in difflib.unified_diff(shipped.splitlines(), path.read_text().splitlines(),
                                                     lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ["-    sample: {}", "+    sample:", "+      steps: 20",
                       "-    train: {steps: 600, lr: 0.001}", "+    train: {steps: 300, lr: 0.001}"]
    params = cfg.load_params(path)
    assert params["experiments"]["digits_ft_lt"]["train"]["steps"] == 300
    assert params["experiments"]["digits_lt"]["sample"] == {**params["defaults"]["sample"], "steps": 20}
    path.write_text(shipped)
    apply_overrides(path, ["seeds=[0,1]", "theta_g_only=[cm]", "defaults.train.steps=5"])
    assert len(path.read_text().splitlines()) == len(shipped.splitlines()) + 2  # a line per new item


def check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cm", "check", *args], cwd=ROOT, capture_output=True, text=True)


def test_check_show_prints_an_experiments_complete_settings():
    result = check("--show", "digits_ft_lt")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown == {"digits_ft_lt": cfg.load_params(ROOT / "params.yaml")["experiments"]["digits_ft_lt"]}
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    train = shown["digits_ft_lt"]["train"]
    assert train["steps"] == 600 and train["ema_decay"] == raw["defaults"]["train"]["ema_decay"]


def test_check_show_with_an_unknown_experiment_lists_the_experiments_in_one_line():
    result = check("--show", "digits")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    names = sorted(yaml.safe_load((ROOT / "params.yaml").read_text())["experiments"])
    assert re.fullmatch(r"error: experiment 'digits' is not defined in params\.yaml; defined: .*", line)
    assert line.endswith(", ".join(names))
