"""The method registry: names, how parameters combine, CM stacked on every base objective."""

from __future__ import annotations

import math
import re

import pytest
import torch

import cm.config as cfg
from cm.diffusion import GaussianDiffusion
from cm.lowrank import LowRankConv2d, branches
from cm.method_names import CM_VARIANTS, evaluated_methods
from cm.methods import (
    MERGE_ONLY,
    METHOD_NAMES,
    PARAM_DEFAULTS,
    build_method,
    param_sections,
    resolve_params,
)
from cm.methods.cm import CapacityManipulation, signed_class_weights
from cm.models import build_unet
from tests.conftest import ROOT
from tests.helpers import CIFAR10_LT_100

BASES = ("ddpm", "cbdm", "oc")
ALL = {"cm": {"rank_ratio": 0.25, "w_con": 1.0, "w_div": 0.2, "lambda": 0.5},
       "cbdm": {"tau": 0.5, "gamma": 0.1, "label_prior": "uniform"}, "ddpm": {}, "oc": {}}


def make(name, counts=(8, 4, 2, 1), all_params=ALL, params=None):
    diffusion = GaussianDiffusion(100)
    method = build_method(name, diffusion=diffusion, train={"label_drop": 0.0, "batch_size": 6},
                          params=params if params is not None else all_params.get(name, {}),
                          class_counts=list(counts), all_params=all_params)
    torch.manual_seed(0)
    net = build_unet("tiny", num_classes=len(counts), in_channels=1, image_size=8)
    method.prepare(net)
    for m in branches(net):  # a non-silent branch, so theta_g and theta_g+e differ
        torch.nn.init.normal_(m.B, std=0.05)
    return method, net


def batch(n=6, classes=4):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.arange(n) % classes


def test_names_are_stable_and_complete():
    assert METHOD_NAMES[:7] == ("ddpm", "cbdm", "oc", "cm", "cm+ddpm", "cm+cbdm", "cm+oc")
    for variant in ("lowrank_only", "cm_no_con", "cm_no_div"):
        assert {variant, *(f"{variant}+{b}" for b in BASES)} <= set(METHOD_NAMES)
    assert METHOD_NAMES[-3:] == ("lora", "lora+oc", "lora+cm")  # fine-tuning
    assert len(METHOD_NAMES) == len(set(METHOD_NAMES)) == 22
    assert MERGE_ONLY["cm_gonly"] == "cm" and set(MERGE_ONLY.values()) <= set(METHOD_NAMES)
    # Exactly the methods with reserved capacity (low-rank branches, or lora+cm's expert adapter)
    # have a theta_g-only model.
    assert sorted(MERGE_ONLY.values()) == sorted(
        [m for m in METHOD_NAMES if m.split("+")[0] in CM_VARIANTS] + ["lora+cm"])
    assert evaluated_methods({"methods": ["ddpm", "cm", "cm+oc"], "theta_g_only": ["cm+oc", "cm"]}) == [
        "ddpm", "cm", "cm+oc", "cm+oc_gonly", "cm_gonly"]
    assert not set(MERGE_ONLY) & set(METHOD_NAMES)


@pytest.mark.parametrize("name", [m for m in METHOD_NAMES if not m.startswith("lora")])
def test_every_name_builds_and_trains_one_step(name):
    method, net = make(name)
    assert method.name == name
    has_branches = name not in BASES
    assert (method.rank_ratio is not None) == has_branches
    assert any(isinstance(m, LowRankConv2d) for m in net.modules()) == has_branches
    out = method(net, *batch())
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and out.pred.shape == (6, 1, 8, 8)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("name", ["cm+cm", "cm+foo", "foo", "cm+", "+ddpm", "cbdm+oc", "oc+cm", "CM"])
def test_invalid_names(name):
    with pytest.raises(ValueError, match=re.escape(f"method = {name!r} is not allowed: one of ddpm, cbdm, oc, cm, "
                                                   "cm+ddpm, cm+cbdm, cm+oc, lowrank_only,")):
        make(name)


def test_merge_only_names_are_not_training_methods():
    with pytest.raises(ValueError, match="'cm_gonly' is not a training method: .* 'cm' with its branches dropped"):
        make("cm_gonly")


def test_parameters_combine():
    # A CM variant reads method_params.cm and method_params.<base>; the variant's fix wins.
    assert param_sections("cm+cbdm") == ("cm", "cbdm") and param_sections("cm") == ("cm", "ddpm")
    assert param_sections("oc") == ("oc",)
    assert resolve_params("cm_no_con+cbdm", ALL) == {
        "rank_ratio": 0.25, "w_con": 0.0, "w_div": 0.2, "lambda": 0.5, "passes": "two", "branch_scale": 1.0,
        "branch_layers": "decoder",
        "base": {"tau": 0.5, "gamma": 0.1, "label_prior": "uniform"}}
    assert resolve_params("cbdm", {}) == PARAM_DEFAULTS["cbdm"]
    assert resolve_params("lowrank_only", {})["lambda"] == 0.0
    method, _ = make("cm+cbdm")
    assert (method.lam, method.rank_ratio, method.base.gamma, method.base.tau) == (0.5, 0.25, 0.1, 0.5)
    assert (make("cm_no_div+oc")[0].w_div, make("cm_no_con")[0].w_con) == (0.0, 0.0)
    # Without all_params, the method's own section may carry CM keys and a `base` sub-dict.
    own = {"rank_ratio": 0.5, "lambda": 2.0, "base": {"gamma": 0.75}}
    method, _ = make("cm+cbdm", all_params=None, params=own)
    got = (method.lam, method.rank_ratio, method.w_div, method.base.gamma, method.base.tau)
    assert got == (2.0, 0.5, 0.2, 0.75, 1.0)
    # The signature of the single-method call still works as before.
    method, _ = make("cm", all_params=None, params=ALL["cm"])
    assert method.lam == 0.5 and type(method.base).__name__ == "DDPM"


def test_bad_parameters():
    with pytest.raises(ValueError, match="parameter 'gama' of method_params.cbdm is not allowed: "
                                         "one of tau, gamma, label_prior"):
        make("cm+cbdm", all_params={**ALL, "cbdm": {"gama": 1.0}})
    with pytest.raises(ValueError, match="parameter 'tau' of method_params.oc is not allowed: one of \\(none\\)"):
        make("oc", all_params={"oc": {"tau": 1.0}})
    with pytest.raises(ValueError, match="w_con = 1.0 is not allowed: cm_no_con fixes w_con = 0.0"):
        make("cm_no_con", params={"w_con": 1.0})


def test_defaults_agree_with_the_shipped_params():
    """A method built without a configuration (a test, a benchmark) gets params.yaml's values."""
    shipped = cfg.load_params(ROOT / "params.yaml")["method_params"]
    for section, defaults in PARAM_DEFAULTS.items():
        for key, value in defaults.items():
            if section in shipped:
                assert shipped[section][key] == value, (section, key)


def test_on_cifar10_lt_only_the_three_rarest_classes_are_pushed_to_the_branch():
    weights = signed_class_weights(CIFAR10_LT_100, w_con=1.0, w_div=0.2)
    assert [c for c, w in enumerate(weights) if w < 0] == [7, 8, 9]
    method, _ = make("cm+oc", counts=CIFAR10_LT_100)
    assert [c for c, w in enumerate(method.class_weight) if w < 0] == [7, 8, 9]


@pytest.mark.parametrize("base", BASES)
def test_cm_is_base_plus_lambda_signed_gap_and_vanishes_on_balanced_data(base):
    for counts, w_div in (((8, 4, 2, 1), 0.2), ((5, 5, 5, 5), 1.0)):
        all_params = {**ALL, "cm": {**ALL["cm"], "w_con": 1.0, "w_div": w_div}}
        method, net = make(f"cm+{base}", counts=counts, all_params=all_params)
        x0, y = batch()
        torch.manual_seed(9)
        out = method(net, x0, y)
        torch.manual_seed(9)  # the base's draws come first, so replaying the base alone matches
        ref = method.base(net, x0, y)
        for m in branches(net):
            m.enabled = False
        h_g = net(out.x_t, out.t, out.cond)
        for m in branches(net):
            m.enabled = True
        gap = ((ref.pred - h_g) ** 2).mean(dim=(1, 2, 3))
        assert gap.min() > 0
        l_cm = (signed_class_weights(counts, 1.0, w_div).float()[y] * gap).mean()
        torch.testing.assert_close(out.loss, ref.loss + 0.5 * l_cm)
        if len(set(counts)) == 1:
            assert out.stats["loss_cm"] == 0.0
            torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)


def test_lowrank_only_is_the_base_with_branches_and_one_pass():
    method, net = make("lowrank_only")
    assert isinstance(method, CapacityManipulation) and method.lam == 0.0
    calls = []
    net.register_forward_pre_hook(lambda *_: calls.append(1))
    x0, y = batch()
    torch.manual_seed(2)
    out = method(net, x0, y)
    torch.manual_seed(2)
    torch.testing.assert_close(out.loss, method.base(net, x0, y).loss, rtol=0, atol=0)
    assert calls == [1, 1] and "loss_cm" not in out.stats  # one pass each for the method and the replay


@pytest.mark.parametrize("name", ["lora", "lora+oc", "lora+cm"])
def test_lora_methods_train_only_their_adapters(name):
    pytest.importorskip("peft")
    lora = {"rank": 2, "alpha": None, "target_modules": None}
    with pytest.raises(ValueError, match="needs a finetune section"):
        make(name)
    method = build_method(name, diffusion=GaussianDiffusion(100), train={"label_drop": 0.0, "batch_size": 6},
                          class_counts=[8, 4, 2, 1], all_params=ALL, lora=lora)
    net = build_unet("tiny", num_classes=4, in_channels=1, image_size=8)
    method.prepare(net)
    adapters = {"general", "expert"} if name == "lora+cm" else {"general"}
    assert sorted(method.lora["adapters"]) == sorted(adapters) and method.rank_ratio is None
    method(net, *batch()).loss.backward()
    trained = {n for n, p in net.named_parameters() if p.grad is not None}
    assert trained and all(".lora_" in n for n in trained)  # W_f gets no gradient
    assert {n.split(".")[-2] for n in trained} == adapters
