"""The DDPM baseline: eps-prediction MSE with whole-batch label drop for guidance."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cm.diffusion import GaussianDiffusion
from cm.methods.base import LossOutput, Method, noised_batch, per_sample_sq


class DDPM(Method):
    """L = mean ||eps_theta(x_t, t, y) - eps||^2 (Ho et al. 2020, Eq. 14)."""

    name = "ddpm"

    def __init__(self, diffusion: GaussianDiffusion, label_drop: float):
        self.diffusion = diffusion
        self.label_drop = label_drop

    def __call__(self, net, x0: torch.Tensor, y: torch.Tensor) -> LossOutput:
        # Classifier-free guidance training: the *whole batch* goes unconditional with prob p.
        t, eps, x_t, cond = noised_batch(self.diffusion, x0, y, self.label_drop)
        pred = net(x_t, t, cond)
        loss = F.mse_loss(pred, eps)
        return LossOutput(loss, x_t, t, cond, pred, {"loss_base": loss.detach()}, per_sample_sq(pred.detach(), eps))
