"""Training objectives against independent computations on fixed small tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cm.diffusion import GaussianDiffusion
from cm.lowrank import LowRankConv2d, branches
from cm.methods import build_method
from cm.methods.cm import signed_class_weights
from cm.models import build_unet
from tests.helpers import CIFAR10_LT_100, batch

CM_PARAMS = {"rank_ratio": 0.25, "w_con": 1.0, "w_div": 0.2, "lambda": 1.0}


def make(name, counts=(8, 4, 2, 1), params=None, label_drop=0.0):
    diffusion = GaussianDiffusion(100)
    method = build_method(name, diffusion=diffusion, train={"label_drop": label_drop},
                          params=params if params is not None else (CM_PARAMS if name == "cm" else {}),
                          class_counts=list(counts))
    net = build_unet("tiny", num_classes=len(counts), in_channels=1, image_size=8)
    method.prepare(net)
    return method, net, diffusion


def test_ddpm_loss_is_eps_mse_with_the_same_draws():
    method, net, d = make("ddpm")
    x0, y = batch()
    torch.manual_seed(5)
    out = method(net, x0, y)
    torch.manual_seed(5)  # replay the same draws: t, eps, the label-drop coin, then the forward pass
    t = torch.randint(0, 100, (len(x0),))
    eps = torch.randn_like(x0)
    torch.rand(())
    abar = d.alphas_bar[t].float().view(-1, 1, 1, 1)
    expected = F.mse_loss(net(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t, y), eps)
    torch.testing.assert_close(out.loss, expected)


def test_label_drop_is_whole_batch():
    seen = []
    method, net, _ = make("ddpm", label_drop=1.0)
    net.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[2] if len(args) > 2 else kwargs.get("y")),
                                  with_kwargs=True)
    method(net, *batch())
    assert seen == [None]
    method, net, _ = make("ddpm", label_drop=0.0)
    out = method(net, *batch())
    assert out.cond is not None and out.cond.tolist() == batch()[1].tolist()


def test_signed_weights_match_the_formula():
    counts = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    p, q = counts / 15, (1 / counts) / (1 / counts).sum()
    expected = 4 * (1.0 * p - 0.2 * q)
    torch.testing.assert_close(signed_class_weights([8, 4, 2, 1], 1.0, 0.2), expected)


def test_on_cifar10_lt_only_the_three_rarest_classes_are_pushed_to_the_branch():
    weights = signed_class_weights(CIFAR10_LT_100, w_con=1.0, w_div=0.2)
    assert [c for c, w in enumerate(weights) if w < 0] == [7, 8, 9]


def test_weights_cancel_on_balanced_data_with_equal_terms():
    assert torch.count_nonzero(signed_class_weights([5] * 10, 0.7, 0.7)) == 0


def test_cm_adds_branches_to_the_decoder_only():
    _, net, _ = make("cm")
    names = [n for n, m in net.named_modules() if isinstance(m, LowRankConv2d)]
    assert names and all(n.startswith("upblocks.") for n in names)


def test_cm_loss_is_base_plus_lambda_times_signed_gap():
    method, net, d = make("cm", params={**CM_PARAMS, "lambda": 0.5})
    for m in branches(net):  # make the branch non-silent so the two passes differ
        torch.nn.init.normal_(m.B, std=0.05)
    net.eval()  # no dropout in the tiny preset anyway; keeps the replay exact
    x0, y = batch()
    torch.manual_seed(7)
    out = method(net, x0, y)

    torch.manual_seed(7)
    t = torch.randint(0, 100, (len(x0),))
    eps = torch.randn_like(x0)
    torch.rand(())
    abar = d.alphas_bar[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    h_full = net(x_t, t, y)
    for m in branches(net):
        m.enabled = False
    h_g = net(x_t, t, y)
    for m in branches(net):
        m.enabled = True
    gap = ((h_full - h_g) ** 2).mean(dim=(1, 2, 3))
    weight = signed_class_weights([8, 4, 2, 1], 1.0, 0.2).float()[y]
    expected = F.mse_loss(h_full, eps) + 0.5 * (weight * gap).mean()
    assert gap.min() > 0
    torch.testing.assert_close(out.loss, expected)


def test_cm_gradients_reach_both_the_branch_and_the_general_weights():
    method, net, _ = make("cm")
    for m in branches(net):
        torch.nn.init.normal_(m.B, std=0.05)
    method(net, *batch()).loss.backward()
    branch = next(iter(branches(net)))
    assert branch.A.grad.abs().sum() > 0 and branch.B.grad.abs().sum() > 0
    assert branch.base.weight.grad.abs().sum() > 0


def test_unknown_method():
    with pytest.raises(ValueError, match="method = 'cm\\+cm' is not allowed"):
        make("cm+cm")
