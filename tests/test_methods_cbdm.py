"""CBDM (Qin et al., CVPR 2023) against an independent computation with replayed draws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cm.diffusion import GaussianDiffusion
from cm.methods import build_method
from cm.methods.cbdm import label_distribution
from cm.models import build_unet
from tests.helpers import batch

COUNTS = [8, 4, 2, 1]
T = 100


def make(params=None, label_drop=0.0, counts=COUNTS, name="cbdm"):
    diffusion = GaussianDiffusion(T)
    method = build_method(name, diffusion=diffusion, train={"label_drop": label_drop},
                          params=params or {}, class_counts=list(counts))
    torch.manual_seed(0)
    net = build_unet("tiny", num_classes=len(counts), in_channels=1, image_size=8)
    method.prepare(net)
    return method, net, diffusion


def replay_draws(d, x0, prior):
    """The method's draws in order: t, eps, the label-drop coin, y' ~ prior."""
    t = torch.randint(0, T, (len(x0),))
    eps = torch.randn_like(x0)
    torch.rand(())
    y_bal = torch.multinomial(prior, len(x0), replacement=True)
    abar = d.alphas_bar[t].float().view(-1, 1, 1, 1)
    return t, eps, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, y_bal


@pytest.mark.parametrize("prior", ["frequency", "uniform"])
def test_loss_matches_the_formula_with_replayed_draws(prior):
    tau, gamma = 0.7, 0.25
    method, net, d = make({"tau": tau, "gamma": gamma, "label_prior": prior})
    x0, y = batch()
    torch.manual_seed(3)
    out = method(net, x0, y)

    torch.manual_seed(3)
    p = torch.tensor(COUNTS, dtype=torch.float64)
    p = p / p.sum() if prior == "frequency" else torch.full((4,), 0.25, dtype=torch.float64)
    t, eps, x_t, y_bal = replay_draws(d, x0, p)
    with torch.no_grad():  # two separate passes: the method batches them into one
        h, h_bal = net(x_t, t, y), net(x_t, t, y_bal)
    w = tau * t.float() / T
    sq = ((h - h_bal) ** 2).mean(dim=(1, 2, 3))
    expected = F.mse_loss(h, eps) + (w * sq).mean() + gamma * (w * sq).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.pred, h)
    assert out.cond is y and out.stats["loss_cbdm_reg"] > 0


def test_label_priors():
    torch.testing.assert_close(label_distribution(COUNTS, "frequency"),
                               torch.tensor([8, 4, 2, 1], dtype=torch.float64) / 15)
    torch.testing.assert_close(label_distribution(COUNTS, "uniform"), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="label_prior = 'balanced' is not allowed: one of frequency, uniform"):
        make({"label_prior": "balanced"})


def test_unconditional_steps_are_plain_ddpm():
    cbdm, net, _ = make(label_drop=1.0)
    ddpm = build_method("ddpm", diffusion=GaussianDiffusion(T), train={"label_drop": 1.0}, params={},
                        class_counts=COUNTS)
    x0, y = batch()
    torch.manual_seed(4)
    out = cbdm(net, x0, y)
    torch.manual_seed(4)
    ref = ddpm(net, x0, y)
    assert out.cond is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    assert set(out.stats) == {"loss_base"}


def test_each_term_sends_gradient_only_where_the_stop_gradients_allow():
    method, *_ = make()
    h = torch.randn(3, 1, 4, 4, requires_grad=True)
    h_bal = torch.randn(3, 1, 4, 4, requires_grad=True)
    eps, t = torch.randn(3, 1, 4, 4), torch.tensor([10, 50, 99])
    l_ddpm, l_reg, l_com = method.terms(h, h_bal, eps, t)
    for term, flows_into in ((l_ddpm, "h"), (l_reg, "h"), (l_com, "h_bal")):
        g_h, g_bal = torch.autograd.grad(term, [h, h_bal], allow_unused=True, retain_graph=True)
        assert (g_h is not None) == (flows_into == "h")
        assert (g_bal is not None) == (flows_into == "h_bal")
    # The regulariser's gradient is w_t * 2 (h - h') / (N * pixels), the commitment's its mirror.
    w = (t.float() / T).view(-1, 1, 1, 1)
    g_reg = torch.autograd.grad(l_reg, h)[0]
    torch.testing.assert_close(g_reg, w * 2 * (h - h_bal).detach() / h.numel())
    g_com = torch.autograd.grad(l_com, h_bal)[0]
    torch.testing.assert_close(g_com, w * 2 * (h_bal - h).detach() / h.numel())


class PerClassScale(nn.Module):
    """Toy eps-network x_t * a[y]: each class owns one parameter, so gradients show who got what."""

    def __init__(self, classes):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(0.5, 1.5, classes))
        self.labels = []

    def forward(self, x, t, y=None):
        self.labels.append(y)
        return x * (self.a[y].view(-1, 1, 1, 1) if y is not None else 1.0)


@pytest.mark.parametrize("gamma", [0.0, 0.25])
def test_gradients_per_class_through_the_whole_loss(gamma):
    # Labels y are all class 0; the prior almost never draws class 0, so y' is class 1.
    counts = [1, 10**9]
    method, _, d = make({"gamma": gamma}, counts=counts)
    net = PerClassScale(2)
    x0, y = torch.randn(5, 1, 4, 4), torch.zeros(5, dtype=torch.long)
    torch.manual_seed(6)
    method(net, x0, y).loss.backward()
    assert net.labels[0].tolist() == [0] * 5 + [1] * 5  # one batched pass: y then y'
    got = net.a.grad.clone()

    torch.manual_seed(6)
    t, eps, x_t, _ = replay_draws(d, x0, label_distribution(counts, "frequency"))
    a0, a1 = (torch.tensor(v, requires_grad=True) for v in net.a.detach().tolist())
    h, h_bal = x_t * a0, x_t * a1
    w = (t.float() / T).view(-1, 1, 1, 1)
    to_h = F.mse_loss(h, eps) + (w * (h - h_bal.detach()) ** 2).mean()       # L_DDPM + L_reg
    to_bal = gamma * (w * (h.detach() - h_bal) ** 2).mean()                   # gamma L_com
    torch.testing.assert_close(got[0], torch.autograd.grad(to_h, a0)[0])
    if gamma == 0:
        assert got[1] == 0  # y' receives nothing: the regulariser stops its gradient
    else:
        torch.testing.assert_close(got[1], torch.autograd.grad(to_bal, a1)[0])
        assert got[1] != 0
