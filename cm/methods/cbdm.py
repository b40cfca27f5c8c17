"""Class-Balancing Diffusion Models (CBDM; Qin et al., CVPR 2023).

On conditional steps the prediction for the true label y is regularised toward the prediction
for a label y' drawn from a label prior, with a time-dependent weight w_t = tau * t / T
(docs/methods.md, cbdm: the training objective with its regularisation and commitment terms):

    L = L_DDPM + mean_i w_i ( D(h_i, sg h'_i) + gamma D(sg h_i, h'_i) ),
    h = eps(x_t, t, y),  h' = eps(x_t, t, y'),  D(a, b) = mean over pixels (a - b)^2.

The mean is per element, then weighted per sample: every sample has the same number of
elements, so this equals the released code's `(w_t * mse(..., reduction="none")).mean()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cm import distributed
from cm.diffusion import GaussianDiffusion
from cm.methods.base import LossOutput, Method, cat_rows, noised_batch, per_sample_sq

LABEL_PRIORS = ("frequency", "uniform")


def label_distribution(class_counts, kind: str) -> torch.Tensor:
    """The distribution y' is drawn from: training frequencies N_y / sum_c N_c, or uniform. (C,)"""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if kind == "frequency":
        return counts / counts.sum()
    if kind == "uniform":  # the released code's fine-tuning mode
        return torch.full_like(counts, 1.0 / len(counts))
    raise ValueError(f"label_prior = {kind!r} is not allowed: one of {', '.join(LABEL_PRIORS)}")


class CBDM(Method):
    """L = L_DDPM + mean(w_t D(h, sg h')) + gamma mean(w_t D(sg h, h')) on conditional steps;
    plain DDPM on unconditional ones (the released code regularises only when labels are given)."""

    name = "cbdm"

    def __init__(self, diffusion: GaussianDiffusion, label_drop: float, class_counts, *,
                 tau: float = 1.0, gamma: float = 0.25, label_prior: str = "frequency"):
        if tau < 0 or gamma < 0:
            raise ValueError(f"cbdm: tau and gamma must be >= 0, got tau={tau}, gamma={gamma}")
        self.diffusion = diffusion
        self.label_drop = label_drop
        self.tau, self.gamma = float(tau), float(gamma)
        self.prior = label_distribution(class_counts, label_prior)  # (C,), float64

    def terms(self, h: torch.Tensor, h_bal: torch.Tensor, eps: torch.Tensor, t: torch.Tensor):
        """(L_DDPM, L_reg, L_com): eps MSE, the regulariser (gradient into h only) and the
        commitment term (gradient into h' only; it enters the loss times gamma)."""
        w = self.tau * t.to(h.dtype) / self.diffusion.timesteps       # w_t, (N,)
        l_ddpm = F.mse_loss(h, eps)
        l_reg = (w * per_sample_sq(h, h_bal.detach())).mean()          # pulls eps(y) toward eps(y')
        l_com = (w * per_sample_sq(h.detach(), h_bal)).mean()          # pulls eps(y') toward eps(y)
        return l_ddpm, l_reg, l_com

    def __call__(self, net, x0: torch.Tensor, y: torch.Tensor) -> LossOutput:
        t, eps, x_t, cond = noised_batch(self.diffusion, x0, y, self.label_drop)
        if cond is None:
            pred = net(x_t, t, None)
            loss = F.mse_loss(pred, eps)
            return LossOutput(loss, x_t, t, None, pred, {"loss_base": loss.detach()},
                              per_sample_sq(pred.detach(), eps))
        # y' ~ prior with the torch RNG, so checkpointed RNG state reproduces the run.
        if self.prior.device != y.device:  # moved once, not copied every step
            self.prior = self.prior.to(y.device)
        y_bal = distributed.draw(lambda m: torch.multinomial(self.prior, m, replacement=True), len(y))  # (N,)
        # One batched pass for y and y'. GroupNorm, attention and dropout act per sample, so this
        # is two passes in one; h and h' are separate slices, so each stop-gradient stays exact.
        h, h_bal = net(cat_rows(x_t, x_t), cat_rows(t, t), cat_rows(cond, y_bal)).chunk(2)
        l_ddpm, l_reg, l_com = self.terms(h, h_bal, eps, t)
        loss = l_ddpm + l_reg + self.gamma * l_com
        return LossOutput(loss, x_t, t, cond, h, {"loss_base": l_ddpm.detach(), "loss_cbdm_reg": l_reg.detach(),
                                                  "loss_cbdm_com": l_com.detach()}, per_sample_sq(h.detach(), eps))
