"""CM's fast mode (method_params.cm.passes = shared_encoder) against the faithful two-pass mode and
against an independent computation, on small fixed tensors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml

from cm import config as cfg
from cm.diffusion import GaussianDiffusion
from cm.lowrank import branches, branches_disabled
from cm.method_names import METHOD_NAMES, parse_method
from cm.methods import PARAM_DEFAULTS, build_method, resolve_params
from cm.methods.base import LossOutput, Method
from cm.methods.cm import signed_class_weights
from cm.methods.passes import PASSES, SharedEncoder
from cm.models import build_unet
from tests.conftest import ROOT
from tests.helpers import batch, randomize

COUNTS = [8, 4, 2, 1]
T = 100
# CM with low-rank branches in the decoder (lora+cm's adapters sit in the encoder too: no shared pass).
CM_NAMES = [name for name in METHOD_NAMES if parse_method(name).variant is not None and not parse_method(name).lora]


def make(name, passes, preset="tiny", label_drop=0.0, dtype=torch.float64, lam=0.5):
    """A CM variant in one mode and its network with silent-free branches: the 1e-5 init undone and
    B random, so h_full != h_g and every gradient is of order one."""
    own = {"passes": passes} if parse_method(name).variant != "cm" else {"passes": passes, "lambda": lam}
    method = build_method(name, diffusion=GaussianDiffusion(T), train={"label_drop": label_drop},
                          params=own, class_counts=COUNTS)
    net = build_unet(preset, num_classes=len(COUNTS), in_channels=1, image_size=8)
    method.prepare(net)
    randomize(net, seed=0)
    for m in branches(net):
        torch.nn.init.normal_(m.B, std=0.05)
    return method, net.to(dtype).train()


def loss_and_grads(method, net, x0, y, seed=11):
    torch.manual_seed(seed)
    out = method(net, x0, y)
    net.zero_grad(set_to_none=True)
    out.loss.backward()
    return out, {name: p.grad for name, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("label_drop", [0.0, 1.0], ids=["conditional", "unconditional"])
@pytest.mark.parametrize("name", CM_NAMES)
def test_without_dropout_shared_encoder_equals_two_passes(name, label_drop):
    # The tiny preset has dropout 0, so the encoder computes the same thing in both passes: the
    # fast mode must give the same loss and the same gradients as the released recipe.
    two, net = make(name, "two", label_drop=label_drop)
    fast, _ = make(name, "shared_encoder", label_drop=label_drop)
    x0, y = batch()
    x0 = x0.double()
    out_two, grads_two = loss_and_grads(two, copy.deepcopy(net), x0, y)
    out_fast, grads_fast = loss_and_grads(fast, copy.deepcopy(net), x0, y)
    torch.testing.assert_close(out_fast.loss, out_two.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out_fast.pred, out_two.pred, rtol=1e-12, atol=1e-14)
    unused = {"label_emb.weight"} if label_drop else set()  # the whole batch went unconditional
    assert grads_fast.keys() == grads_two.keys() == {n for n, _ in net.named_parameters()} - unused
    for key, grad in grads_two.items():
        torch.testing.assert_close(grads_fast[key], grad, rtol=1e-10, atol=1e-13, msg=key)
    if two.lam:
        assert out_two.stats["gap"] > 0 and out_fast.stats.keys() == out_two.stats.keys()


def test_shared_encoder_loss_is_the_formula_with_one_encoder_pass():
    # An independent computation of the fast mode, with dropout (preset small, train mode): one
    # encoder pass, its encoding decoded with branches on (h_full) and off (h_g), in that order.
    method, net = make("cm", "shared_encoder", preset="small", dtype=torch.float32)
    x0, y = batch()
    torch.manual_seed(7)
    out = method(net, x0, y)

    torch.manual_seed(7)  # replay: t, eps, the label-drop coin, then the network's dropout masks
    t = torch.randint(0, T, (len(x0),))
    eps = torch.randn_like(x0)
    torch.rand(())
    abar = GaussianDiffusion(T).alphas_bar[t].float().view(-1, 1, 1, 1)
    enc = net.encode(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t, y)
    h_full = net.decode(enc)
    with branches_disabled(net):
        h_g = net.decode(enc)
    gap = (h_full - h_g).pow(2).mean(dim=(1, 2, 3))                      # D_i
    l_cm = (signed_class_weights(COUNTS, 1.0, 0.2).float()[y] * gap).mean()  # L_CM
    torch.testing.assert_close(out.loss, F.mse_loss(h_full, eps) + 0.5 * l_cm)
    assert gap.min() > 0


@pytest.mark.parametrize(("name", "encodes"), [("cm", {"two": 2, "shared_encoder": 1}),
                                               ("cm+cbdm", {"two": 2, "shared_encoder": 1}),
                                               ("lowrank_only", {"two": 1, "shared_encoder": 1})])
def test_the_encoder_runs_once_per_step_in_fast_mode(name, encodes):
    for passes, expected in encodes.items():
        method, net = make(name, passes, dtype=torch.float32)
        calls = {"head": 0, "tail": 0}
        net.head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
        net.tail.register_forward_hook(lambda *a: calls.__setitem__("tail", calls["tail"] + 1))
        method(net, *batch())
        # CBDM batches its y and y' predictions into one call; lambda = 0 spares the theta_g pass.
        assert calls == {"head": expected, "tail": 1 if name == "lowrank_only" else 2}, passes


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_decode_of_encode_is_forward(preset):
    net = randomize(build_unet(preset, num_classes=4, in_channels=1, image_size=8)).eval()
    x0, y = batch()
    t = torch.tensor([0, 5, 50, 99, 7, 3])
    enc = net.encode(x0, t, y)
    assert torch.equal(net.decode(enc), net(x0, t, y))
    assert torch.equal(net.decode(enc), net.decode(enc))  # decoding leaves the encoding intact
    torch.testing.assert_close(net.decode(enc.rows(4)), net(x0[:4], t[:4], y[:4]))


def test_the_encoder_does_not_see_the_branches():
    # The premise of the fast mode: every branch sits in the decoder.
    _, net = make("cm", "two", dtype=torch.float32)
    net.eval()
    x0, y = batch()
    t = torch.arange(len(y)) * 10
    full = net.encode(x0, t, y)
    with branches_disabled(net):
        general = net.encode(x0, t, y)
        h_g = net.decode(full)
    assert all(torch.equal(a, b) for a, b in zip(full.skips, general.skips)) and torch.equal(full.h, general.h)
    assert not torch.equal(net.decode(full), h_g)


def test_default_is_the_released_two_passes():
    schema = cfg.schema()["properties"]["method_params"]["properties"]["cm"]["properties"]["passes"]
    assert schema["enum"] == list(PASSES) and schema["description"]
    assert PARAM_DEFAULTS["cm"]["passes"] == "two"
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["method_params"]["cm"]["passes"] == "two"
    assert all(resolve_params(name, {})["passes"] == "two" for name in CM_NAMES)
    method = build_method("cm+oc", diffusion=GaussianDiffusion(T), train={"label_drop": 0.1}, class_counts=COUNTS)
    assert method.passes == "two"


def test_a_bad_value_is_a_clear_error():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["method_params"]["cm"]["passes"] = "one"
    with pytest.raises(cfg.ConfigError, match="method_params.cm.passes = 'one' is not allowed: "
                                              "must be one of two, shared_encoder"):
        cfg.check_params(raw, base_dir=ROOT)
    with pytest.raises(ValueError, match="passes = 'one' is not allowed: one of two, shared_encoder"):
        build_method("cm+cbdm", diffusion=GaussianDiffusion(T), train={"label_drop": 0.1},
                     params={"passes": "one"}, class_counts=COUNTS)


class _OtherInputs(Method):
    """A base whose last network call is not on its reported x_t: the fast mode must refuse it."""

    def __call__(self, net, x0, y):
        t = torch.zeros(len(x0), dtype=torch.long)
        pred = net(x0 + 1.0, t, y)
        return LossOutput(pred.pow(2).mean(), x0, t, y, pred)


def test_shared_encoder_refuses_a_base_that_called_the_network_on_other_inputs():
    _, net = make("cm", "two", dtype=torch.float32)
    shared = SharedEncoder(net)
    out = _OtherInputs()(shared, *batch())
    with pytest.raises(RuntimeError, match="lead with the \\(x_t, t, cond\\)"):
        shared.theta_g(out.x_t, out.t, out.cond)
