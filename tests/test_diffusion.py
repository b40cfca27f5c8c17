"""The diffusion process against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from cm.diffusion import GaussianDiffusion
from cm.models import NULL_LABEL


def test_schedule_and_forward_process():
    d = GaussianDiffusion(1000, 1e-4, 0.02)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert d.alphas_bar[0].item() == pytest.approx(1 - 1e-4)
    assert d.alphas_bar[-1].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-9)
    x0, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 500, 999])
    abar = d.alphas_bar[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, eps), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)


def test_stable_diffusions_schedule_matches_diffusers():
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    ours = GaussianDiffusion(1000, 0.00085, 0.012, schedule="scaled_linear")
    theirs = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(ours.alphas_bar.float(), theirs, rtol=1e-5, atol=1e-7)
    betas = [(0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * i / 999) ** 2 for i in range(1000)]
    assert ours.alphas_bar[-1].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-9)
    with pytest.raises(ValueError, match="'cosine' is not allowed: one of linear, scaled_linear"):
        GaussianDiffusion(schedule="cosine")


class Oracle(torch.nn.Module):
    """The exact noise predictor for data that is one point x* per class (class c: x* = c - 1)."""

    def __init__(self, d):
        super().__init__()
        self.d = d
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append(None if y is None else y.clone())
        target = (y.float() - 1).view(-1, 1, 1, 1).expand_as(x)
        abar = self.d.alphas_bar[t].float().view(-1, 1, 1, 1)
        return (x - abar.sqrt() * target) / (1 - abar).sqrt()


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("ddim", 7), ("ddpm", 1000)])
def test_samplers_recover_the_data_point_with_an_exact_model(sampler, steps):
    d = GaussianDiffusion(1000)
    y = torch.tensor([0, 1, 2, 1])
    x = d.sample(Oracle(d), y, (4, 1, 3, 3), sampler=sampler, steps=steps, guidance=0.0,
                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, (y.float() - 1).view(-1, 1, 1, 1).expand_as(x), atol=1e-4, rtol=0)


def test_guidance_runs_both_halves_in_one_pass_and_combines_them():
    calls = []

    def net(x, t, y):
        calls.append(y.clone())
        return torch.where((y >= 0).view(-1, 1), torch.ones_like(x), torch.zeros_like(x)) * 2.0

    x, t, y = torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3])
    eps = GaussianDiffusion.guided_eps(net, x, t, y, guidance=1.5)
    assert len(calls) == 1 and calls[0].tolist() == [1, 2, 3, NULL_LABEL, NULL_LABEL, NULL_LABEL]
    torch.testing.assert_close(eps, torch.full_like(x, 2.0 + 1.5 * (2.0 - 0.0)))


def test_unknown_sampler():
    with pytest.raises(ValueError, match="sampler = 'euler'"):
        GaussianDiffusion(10).sample(None, torch.zeros(1, dtype=torch.long), (1, 1, 2, 2),
                                     sampler="euler", steps=1, guidance=0)
