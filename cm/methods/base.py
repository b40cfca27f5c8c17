"""What every training objective shares: the per-batch result and the method interface."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LossOutput:
    """One batch's loss and what a wrapping objective (CM) needs to add its own term."""

    loss: torch.Tensor              # scalar to minimise
    x_t: torch.Tensor               # (N, C, H, W) noised images
    t: torch.Tensor                 # (N,) timesteps
    cond: torch.Tensor | None       # labels given to the network (None: whole batch dropped)
    pred: torch.Tensor              # (N, C, H, W) the network's eps prediction on x_t
    stats: dict[str, float] = field(default_factory=dict)


class Method:
    """A training objective: optionally reshapes the network, then maps a batch to a loss."""

    name = "base"
    rank_ratio: float | None = None  # set by objectives that reserve low-rank capacity,
    branch_scale: float = 1.0        # with the scaling of B A
    branch_layers: str = "decoder"   # and the convs that get a branch (cm/lowrank.py)

    def prepare(self, net: nn.Module) -> None:
        """Modify the freshly built network before training (default: nothing)."""

    def __call__(self, net: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> LossOutput:
        raise NotImplementedError


def noised_batch(diffusion, x0: torch.Tensor, y: torch.Tensor, label_drop: float):
    """The draws of every eps-prediction objective, in DDPM's order: t, eps, the label-drop coin.

    Returns (t, eps, x_t, cond); cond is None when the whole batch goes unconditional (prob.
    `label_drop`). Keeping the order fixed lets tests replay a method's randomness.
    """
    t = diffusion.sample_timesteps(len(x0), x0.device)          # (N,)
    eps = torch.randn_like(x0)                                  # (N, C, H, W)
    x_t = diffusion.q_sample(x0, t, eps)                        # (N, C, H, W)
    cond = None if torch.rand(()).item() < label_drop else y
    return t, eps, x_t, cond
