"""What every training objective shares: the per-batch result and the method interface."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cm import distributed


@dataclass
class LossOutput:
    """One batch's loss and what a wrapping objective (CM) needs to add its own term."""

    loss: torch.Tensor              # scalar to minimise
    x_t: torch.Tensor               # (N, C, H, W) noised images
    t: torch.Tensor                 # (N,) timesteps
    cond: torch.Tensor | None       # labels given to the network (None: whole batch dropped)
    pred: torch.Tensor              # (N, C, H, W) the network's eps prediction on x_t
    # Scalars to log, kept on the device (detached): the loop reads them once per log step.
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    # The base objective's regression loss per sample (N,), detached: the per-class training loss.
    per_sample: torch.Tensor | None = None


class Method:
    """A training objective: optionally reshapes the network, then maps a batch to a loss."""

    name = "base"
    rank_ratio: float | None = None  # set by objectives that reserve low-rank capacity,
    branch_scale: float = 1.0        # with the scaling of B A
    branch_layers: str = "decoder"   # and the convs that get a branch (cm/lowrank.py)
    lora: dict | None = None         # set by fine-tuning objectives: LoRA settings and adapter names

    def prepare(self, net: nn.Module) -> None:
        """Modify the freshly built network before training (default: nothing)."""

    def __call__(self, net: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> LossOutput:
        raise NotImplementedError


def cat_rows(first: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    """torch.cat along the batch that remembers its leading part (`leading_part`), so a wrapper of
    the network (CM's shared encoder) knows which rows are `first` from structure, not values."""
    out = torch.cat([first, *rest])
    out._cm_leading = first
    return out


def leading_part(x: torch.Tensor) -> torch.Tensor | None:
    """The tensor that `cat_rows` put first in x, or None."""
    return getattr(x, "_cm_leading", None)


def per_sample_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over pixels of (a - b)^2: (N, C, H, W) x 2 -> (N,)."""
    return (a - b).pow(2).flatten(1).mean(1)


def noised_batch(diffusion, x0: torch.Tensor, y: torch.Tensor, label_drop: float):
    """The draws of every eps-prediction objective, in DDPM's order: t, eps, the label-drop coin.

    Returns (t, eps, x_t, cond); cond is None when the whole batch goes unconditional (prob.
    `label_drop`). Keeping the order fixed lets tests replay a method's randomness. Under torchrun
    t and eps are this rank's rows of draws for the global batch (cm/distributed.py).
    """
    n, shape = len(x0), x0.shape[1:]
    t = distributed.draw(lambda m: diffusion.sample_timesteps(m, x0.device), n)                      # (N,)
    eps = distributed.draw(lambda m: torch.randn((m, *shape), dtype=x0.dtype, device=x0.device), n)  # (N, C, H, W)
    x_t = diffusion.q_sample(x0, t, eps)                        # (N, C, H, W)
    # The coin comes from the CPU generator: reading it never waits for an accelerator.
    cond = None if torch.rand(()).item() < label_drop else y
    return t, eps, x_t, cond
