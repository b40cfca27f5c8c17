"""params.yaml validation: defaults, and one clear message per kind of mistake."""

from __future__ import annotations

import copy

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


@pytest.mark.parametrize("edit, key, value, allowed", [
    (lambda r: r["experiments"]["digits_lt"]["train"].update(stepz=5),
     "experiments.digits_lt.train.stepz", "did you mean 'steps'", "allowed here: batch_size"),
    (lambda r: r.update(method=["cm"]), "'method'", "did you mean 'methods'", "allowed here"),
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
    (lambda r: r.update(run=["digits"]), "run[0]", "'digits'", "defined: digits_lt"),
    (lambda r: r.update(seeds=[]), "seeds", "[]", "at least 1"),
    (lambda r: r.update(methods=["cm", "cm"]), "methods", "['cm', 'cm']", "without repeated items"),
    (lambda r: r["experiments"]["digits_lt"].update(model="huge"),
     "experiments.digits_lt.model", "'huge'", "one of ddpm_cifar"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(source="npz", path="missing.npz"),
     "experiments.digits_lt.data.path", "'missing.npz'", "file not found"),
])
def test_mistakes_name_key_value_and_what_is_allowed(raw, edit, key, value, allowed):
    edit(raw)
    message = error_of(raw)
    assert message.startswith("params.yaml: ")
    assert key in message and value in message and allowed in message
    assert "\n" not in message


def test_duplicated_keys_are_refused(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("seeds: [0]", "seeds: [0]\nseeds: [1]")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(cfg.ConfigError, match=r"duplicated key 'seeds'"):
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
