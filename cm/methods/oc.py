"""Oriented Calibration (OC; Zhang et al., ICLR 2024), "T2H" (tail-to-head) in its released code.

The regression target is recalibrated with knowledge from more frequent classes (docs/methods.md, oc).
With sigma_t^2 = 1/abar_t - 1, sample i picks a partner j from its own batch with

    P(j | i) ∝ exp(-||x0_i + sigma_t eps_i - x0_j||^2 / (2 sigma_t^2))      (sigma_t of sample i)

keeps it only if N_{y_j} >= N_{y_i} (else j = i), and regresses onto

    eps'_i = (x_t,i - sqrt(abar_t) x0_j) / sqrt(1 - abar_t) = eps_i + (x0_i - x0_j) / sigma_t.

The partner pool is the batch, so batch size is part of the method (under torchrun, the global
batch: partners are chosen among the rows of every rank). The choice and the target
carry no gradient. As in the released code the target is recalibrated on every step,
conditional or not, and the gate always uses the true labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cm import distributed
from cm.diffusion import GaussianDiffusion
from cm.methods.base import LossOutput, Method, noised_batch, per_sample_sq


def _sigma(t: torch.Tensor, alphas_bar: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt(1/abar_t - 1) in float64, (N,)."""
    return (1.0 / alphas_bar.to(t.device, torch.float64)[t] - 1.0).sqrt()


@torch.no_grad()
def t2h_partner_log_probs(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                          alphas_bar: torch.Tensor) -> torch.Tensor:
    """log P(j | i) before the class gate, (N, N), rows normalised (logsumexp) in float64.

    Expanding ||x0_i + s eps_i - x0_j||^2 = ||x0_i - x0_j||^2 + 2 s eps_i.(x0_i - x0_j) + s^2 ||eps_i||^2,
    the last term does not depend on j and cancels in the normalisation; dropping it avoids
    subtracting numbers of size s^2 D (s^2 ~ 2.5e4 at t = T-1) from one another.
    """
    x = x0.flatten(1).double()                                   # (N, D)
    e = eps.flatten(1).double()                                  # (N, D)
    s = _sigma(t, alphas_bar)                                    # (N,)
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)  # ||x0_i - x0_j||^2, (N, N)
    d2.fill_diagonal_(0.0)
    cross = (e * x).sum(1)[:, None] - e @ x.T                    # eps_i . (x0_i - x0_j), (N, N)
    logits = -d2 / (2.0 * s[:, None] ** 2) - cross / s[:, None]
    return logits - torch.logsumexp(logits, dim=1, keepdim=True)


@torch.no_grad()
def t2h_partners(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 class_counts, alphas_bar: torch.Tensor, *, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Each sample's partner index j, (N,) long: drawn from `t2h_partner_log_probs` with the torch
    RNG (torch.multinomial), then gated tail-to-head: kept only if N_{y_j} >= N_{y_i}, else i."""
    probs = t2h_partner_log_probs(x0, eps, t, alphas_bar).exp()             # (N, N)
    j = torch.multinomial(probs, 1, generator=generator).squeeze(1)          # (N,)
    counts = torch.as_tensor(class_counts, device=y.device)
    keep = counts[y[j]] >= counts[y]  # a partner may only come from an equally or more frequent class
    return torch.where(keep, j, torch.arange(len(y), device=y.device))


@torch.no_grad()
def oc_target(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, j: torch.Tensor,
              alphas_bar: torch.Tensor) -> torch.Tensor:
    """eps'_i = (x_t,i - sqrt(abar_t) x0_j) / sqrt(1 - abar_t), written as eps_i + (x0_i - x0_j) / sigma_t
    (the same number, exactly eps_i when j = i). (N, C, H, W), no gradient."""
    s = _sigma(t, alphas_bar).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return eps + (x0 - x0[j]) / s


class OC(Method):
    """L = mean ||eps_theta(x_t, t, y) - eps'||^2 with the T2H target eps'."""

    name = "oc"

    def __init__(self, diffusion: GaussianDiffusion, label_drop: float, class_counts):
        self.diffusion = diffusion
        self.label_drop = label_drop
        self.class_counts = torch.as_tensor(class_counts)  # (C,)

    def __call__(self, net, x0: torch.Tensor, y: torch.Tensor) -> LossOutput:
        t, eps, x_t, cond = noised_batch(self.diffusion, x0, y, self.label_drop)
        abar = self.diffusion.alphas_bar_on(y.device)
        if self.class_counts.device != y.device:  # moved once, not copied every step
            self.class_counts = self.class_counts.to(y.device)
        # The global batch (identity in one process): partners come from every rank's rows.
        x0_all, eps_all, t_all, y_all = (distributed.gather(v) for v in (x0, eps, t, y))
        j = t2h_partners(x0_all, eps_all, t_all, y_all, self.class_counts, abar)   # (N_global,)
        target = oc_target(x0_all, eps_all, t_all, j, abar)[distributed.local_rows(len(j))]
        pred = net(x_t, t, cond)
        loss = F.mse_loss(pred, target)
        moved = (j != torch.arange(len(j), device=j.device)).float().mean()
        return LossOutput(loss, x_t, t, cond, pred, {"loss_base": loss.detach(), "oc_moved": moved},
                          per_sample_sq(pred.detach(), target))
