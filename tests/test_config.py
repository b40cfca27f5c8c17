"""params.yaml validation: defaults, and one clear message per kind of mistake."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from cm import config as cfg
from cm.method_names import METHOD_NAMES
from tests.conftest import ROOT


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
    # Every key the schema defaults is present in the file, so DVC (which reads the raw file)
    # and the package see the same values.
    assert cfg.check_params(raw, base_dir=ROOT) == params == cfg.check_params(params, base_dir=ROOT)


def test_defaults_are_filled_in(raw):
    exp = raw["experiments"]["digits_lt"]
    del exp["train"]["ema_decay"], exp["evaluate"], raw["tracking"]
    params = cfg.check_params(raw, base_dir=ROOT)
    assert params["experiments"]["digits_lt"]["train"]["ema_decay"] == 0.9999
    assert params["experiments"]["digits_lt"]["evaluate"]["feature_extractor"] == "local"
    assert params["tracking"] == {"enabled": True, "experiment_name": "capacity-manipulation"}


# The catalogue of malformed configurations: (edit, key, value, what is allowed) per case.
MISTAKES = [
    (lambda r: r["experiments"]["digits_lt"]["train"].update(stepz=5),
     "experiments.digits_lt.train.stepz", "did you mean 'steps'", "allowed here: adam, batch_size"),
    (lambda r: r.update(method=["cm"]), "'method'", "did you mean 'methods'", "allowed here"),
    (lambda r: r["experiments"]["digits_lt"]["train"].update(precision="fp16"),
     "experiments.digits_lt.train.precision", "'fp16'", "one of fp32, tf32, bf16"),
    (lambda r: (r["resources"]["train"].update(gpu=2), r["experiments"]["digits_lt"]["train"].update(batch_size=33)),
     "experiments.digits_lt.train.batch_size = 33", "resources.train.gpu = 2", "multiple of it"),
    (lambda r: r["experiments"]["digits_lt"]["train"].update(steps="many"),
     "experiments.digits_lt.train.steps", "'many'", "type integer"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(imbalance_ratio=0.5),
     "experiments.digits_lt.data.imbalance_ratio", "0.5", ">= 1"),
    (lambda r: r["method_params"]["cm"].update(rank_ratio=0.0),
     "method_params.cm.rank_ratio", "0.0", "> 0 and <= 1"),
    (lambda r: r["method_params"]["cm"].update(rank_ratio=1.5),
     "method_params.cm.rank_ratio", "1.5", "> 0 and <= 1"),
    (lambda r: r.update(methods=["ddpm", "cbdn"]), "methods[1]", "'cbdn'", "one of ddpm, cbdm, oc, cm"),
    (lambda r: r.update(methods=["cm+cm"]), "methods[0]", "'cm+cm'", "one of ddpm, cbdm, oc, cm"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(source="mnist"),
     "experiments.digits_lt.data.source", "'mnist'", "one of digits, npz"),
    (lambda r: r.update(run=["digits"]), "run[0]", "'digits'",
     "is not an experiment; defined: capacity_ch16, capacity_ch32"),
    (lambda r: r.update(seeds=[]), "seeds", "[]", "at least 1"),
    (lambda r: r.update(methods=["cm", "cm"]), "methods", "['cm', 'cm']", "without repeated items"),
    (lambda r: r["experiments"]["digits_lt"].update(model="huge"),
     "experiments.digits_lt.model", "'huge'", "one of ddpm_cifar"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(source="npz", path="missing.npz"),
     "experiments.digits_lt.data.path", "'missing.npz'", "not found"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(source="npz", path=None),
     "experiments.digits_lt.data.path", "None", "source npz needs a path"),
    (lambda r: r.update(methods=[]), "methods", "[]", "at least 1"),
    (lambda r: r.update(run=[]), "run", "[]", "at least 1"),
    (lambda r: r.update(seeds=[-1]), "seeds[0]", "-1", ">= 0"),
    (lambda r: r.update(seeds="0"), "seeds", "'0'", "type array"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(hflip="no"),
     "experiments.digits_lt.data.hflip", "'no'", "type boolean"),
    (lambda r: r["experiments"]["digits_lt"]["train"].update(label_drop=1.5),
     "experiments.digits_lt.train.label_drop", "1.5", "<= 1"),
    (lambda r: r["experiments"]["digits_lt"]["train"].update(ema_decay=1.0),
     "experiments.digits_lt.train.ema_decay", "1.0", "< 1"),
    (lambda r: r["experiments"]["digits_lt"]["train"].update(lr=0),
     "experiments.digits_lt.train.lr", "0", "> 0"),
    (lambda r: r["experiments"]["digits_lt"]["sample"].update(sampler="euler"),
     "experiments.digits_lt.sample.sampler", "'euler'", "one of ddim, ddpm"),
    (lambda r: r["experiments"]["digits_lt"]["sample"].update(guidance=-1),
     "experiments.digits_lt.sample.guidance", "-1", ">= 0"),
    (lambda r: r["experiments"]["digits_lt"]["evaluate"].update(feature_extractor="clip"),
     "experiments.digits_lt.evaluate.feature_extractor", "'clip'", "one of local, inception"),
    (lambda r: r.update(device="tpu"), "device", "'tpu'", "one of auto, cpu, cuda"),
    (lambda r: r["tracking"].update(enabled="yes"), "tracking.enabled", "'yes'", "type boolean"),
    (lambda r: r["experiments"].update({"digits-lt": r["experiments"]["digits_lt"]}),
     "experiments", "'digits-lt'", "letters, digits and _"),
    (lambda r: r["method_params"]["cm"].update(**{"lambda": -1}), "method_params.cm.lambda", "-1", ">= 0"),
    (lambda r: r["method_params"]["cm"].update(passes="one"), "method_params.cm.passes", "'one'",
     "one of two, shared_encoder"),
    (lambda r: r["method_params"]["cm"].update(branch_layers="encoder"), "method_params.cm.branch_layers",
     "'encoder'", "one of decoder, all"),
    (lambda r: r["method_params"]["cm"].update(branch_scale=0), "method_params.cm.branch_scale", "0", "> 0"),
    (lambda r: r["method_params"]["cm"].update(passes="shared_encoder", branch_layers="all"),
     "method_params.cm.passes", "'shared_encoder'", "branch_layers: decoder"),
    (lambda r: r.update(theta_g_only=["ddpm"]), "theta_g_only[0]", "'ddpm'", "no low-rank branches to drop"),
    (lambda r: r["method_params"]["cbdm"].update(label_prior="flat"),
     "method_params.cbdm.label_prior", "'flat'", "one of frequency, uniform"),
    (lambda r: r["experiments"]["digits_lt"]["diffusion"].update(beta_start=0.05),
     "experiments.digits_lt.diffusion.beta_start", "0.05", "must be < beta_end"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(imbalance_ratio=500),
     "experiments.digits_lt.data.imbalance_ratio", "500", "without an image: must be <= 174"),
    (lambda r: r["experiments"]["digits_lt"]["sample"].update(per_class=10**10),
     "experiments.digits_lt.sample.per_class", "10000000000", "more than half of this machine's memory"),
    (lambda r: r["experiments"]["digits_lt"].pop("data"), "experiments.digits_lt", "'data'", "required"),
]


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


# Duplicated keys, as (text to replace, replacement, the key named in the error).
DUPLICATES = [
    ("seeds: [0]", "seeds: [0]\nseeds: [1]", "seeds"),
    ("experiments:\n", "experiments:\n  digits_lt: {data: {source: digits}, model: tiny}\n", "digits_lt"),
]


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
    del raw["tracking"]
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
    # Only the seeds entry (DVC's writer puts the blank line that follows it inside the new list).
    assert changed == ["-seeds: [0]                # training / sampling seeds", "-",
                       "+seeds:                    # training / sampling seeds", "+", "+- 1"]


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
    text = (ROOT / "params.yaml").read_text().replace("      lr: 0.0002\n", f"      lr: {written}\n", 1)
    loaded = yaml.safe_load(text)
    assert loaded["experiments"]["digits_lt"]["train"]["lr"] == written  # YAML 1.1: a string
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
