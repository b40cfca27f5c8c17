"""OC / T2H (Zhang et al., ICLR 2024): partner probabilities, the class gate and the target."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cm.diffusion import GaussianDiffusion
from cm.methods import build_method
from cm.methods.oc import oc_target, t2h_partner_log_probs, t2h_partners
from cm.models import build_unet

T = 100
# A short schedule of our own: sigma_t^2 = 1/abar - 1 = 0.25, 1, 4, so the draws are not degenerate.
ABAR = torch.tensor([0.8, 0.5, 0.2], dtype=torch.float64)


def numpy_probs(x0, eps, t, abar):
    """P(j | i) ∝ exp(-||x0_i + s_i eps_i - x0_j||^2 / (2 s_i^2)), straight from the definition."""
    x, e = x0.reshape(len(x0), -1).numpy().astype(np.float64), eps.reshape(len(x0), -1).numpy().astype(np.float64)
    s2 = 1.0 / abar.numpy()[t.numpy()] - 1.0
    a = x + np.sqrt(s2)[:, None] * e
    logits = -((a[:, None, :] - x[None, :, :]) ** 2).sum(-1) / (2 * s2[:, None])
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def gated(p, y, counts):
    """The gate applied to a probability matrix: mass on a rarer class's sample goes back to i."""
    g = p.copy()
    for i in range(len(p)):
        for j in range(len(p)):
            if j != i and counts[y[j]] < counts[y[i]]:
                g[i, i] += g[i, j]
                g[i, j] = 0.0
    return g


def fixed(n, dim=4, seed=2, scale=0.6):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, 1, 2, dim // 2, generator=gen),
            torch.randn(n, 1, 2, dim // 2, generator=gen))


def test_partner_probabilities_match_numpy():
    x0, eps = fixed(5)
    t = torch.tensor([0, 1, 2, 1, 0])
    got = t2h_partner_log_probs(x0, eps, t, ABAR).exp()
    np.testing.assert_allclose(got.numpy(), numpy_probs(x0, eps, t, ABAR), rtol=1e-10, atol=1e-12)
    # On the real schedule the extremes stay finite: near-one-hot at t = 0, near-flat at t = T-1.
    abar = GaussianDiffusion(1000).alphas_bar
    x0, eps = fixed(5, dim=64, scale=1.0)
    p = t2h_partner_log_probs(x0, eps, torch.tensor([0, 0, 999, 999, 500]), abar).exp()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(1), torch.ones(5, dtype=torch.float64))
    assert p[0, 0] > 0.999 and p[2].max() < 0.5
    np.testing.assert_allclose(p.numpy(), numpy_probs(x0, eps, torch.tensor([0, 0, 999, 999, 500]), abar),
                               rtol=1e-6, atol=1e-12)


def test_draw_frequencies_match_the_gated_probabilities():
    x0, eps = fixed(3, seed=5, scale=0.4)
    t = torch.tensor([1, 2, 2])
    counts = [10, 5, 1]
    for y in (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0])):
        expected = gated(numpy_probs(x0, eps, t, ABAR), y.tolist(), counts)
        gen = torch.Generator().manual_seed(0)
        trials = 10000
        hits = np.zeros((3, 3))
        for _ in range(trials):
            j = t2h_partners(x0, eps, t, y, counts, ABAR, generator=gen)
            hits[np.arange(3), j.numpy()] += 1
        if y.tolist() == [0, 0, 0]:  # ungated: every partner is plausible, none is sure
            assert 0.02 < expected.min() and expected.max() < 0.9
        np.testing.assert_allclose(hits / trials, expected, atol=0.02)  # ~4 binomial std


def test_a_partner_from_a_rarer_class_is_replaced_by_itself():
    # Sample 0's noisy point x0_0 + s eps_0 sits exactly on x0_1: ungated, it picks j = 1 surely.
    x0 = torch.tensor([[0.0, 0.0], [2.0, 2.0]]).view(2, 1, 1, 2)
    t = torch.tensor([0, 0])
    s = (1 / ABAR[0] - 1).sqrt().item()
    eps = torch.stack([(x0[1] - x0[0]) / s, torch.zeros(1, 1, 2)])
    assert t2h_partner_log_probs(x0, eps, t, ABAR).exp()[0, 1] > 1 - 1e-6
    counts = [100, 1]
    assert t2h_partners(x0, eps, t, torch.tensor([1, 0]), counts, ABAR)[0] == 1  # tail -> head: kept
    assert t2h_partners(x0, eps, t, torch.tensor([0, 1]), counts, ABAR)[0] == 0  # head -> tail: refused
    assert t2h_partners(x0, eps, t, torch.tensor([0, 0]), counts, ABAR)[0] == 1  # same class: kept


def test_target():
    x0, eps = fixed(4)
    t = torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(oc_target(x0, eps, t, torch.arange(4), ABAR), eps, rtol=0, atol=0)
    j = torch.tensor([1, 1, 0, 2])
    abar = ABAR[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    torch.testing.assert_close(oc_target(x0, eps, t, j, ABAR), (x_t - abar.sqrt() * x0[j]) / (1 - abar).sqrt())


def make(label_drop=0.0):
    diffusion = GaussianDiffusion(T)
    method = build_method("oc", diffusion=diffusion, train={"label_drop": label_drop, "batch_size": 6},
                          params={}, class_counts=[8, 4, 2, 1])
    torch.manual_seed(0)
    net = build_unet("tiny", num_classes=4, in_channels=1, image_size=8)
    method.prepare(net)
    return method, net, diffusion


def test_loss_with_replayed_draws_and_no_gradient_through_the_target():
    method, net, d = make()
    gen = torch.Generator().manual_seed(1)
    # Nearby images, so that partners other than i are actually drawn.
    x0 = (torch.randn(1, 1, 8, 8, generator=gen) + 0.05 * torch.randn(6, 1, 8, 8, generator=gen)).requires_grad_()
    y = torch.tensor([0, 3, 1, 2, 3, 1])
    torch.manual_seed(11)
    out = method(net, x0, y)
    got = torch.autograd.grad(out.loss, [x0, *net.parameters()])

    torch.manual_seed(11)  # replay: t, eps, the label-drop coin, the partner draw, the forward pass
    t = torch.randint(0, T, (6,))
    eps = torch.randn_like(x0)
    torch.rand(())
    j = t2h_partners(x0.detach(), eps, t, y, [8, 4, 2, 1], d.alphas_bar)
    abar = d.alphas_bar[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    target = ((x_t - abar.sqrt() * x0[j]) / (1 - abar).sqrt()).detach()   # a constant for autograd
    expected = F.mse_loss(net(x_t, t, y), target)
    torch.testing.assert_close(out.loss, expected)
    assert out.stats["oc_moved"] == (j != torch.arange(6)).float().mean().item() > 0
    want = torch.autograd.grad(expected, [x0, *net.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert not oc_target(x0, eps, t, j, d.alphas_bar).requires_grad


def test_label_drop_keeps_the_recalibrated_target():
    method, net, _ = make(label_drop=1.0)
    out = method(net, fixed(6, dim=64)[0].view(6, 1, 8, 8), torch.arange(6) % 4)
    assert out.cond is None and "oc_moved" in out.stats
