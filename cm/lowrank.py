"""Low-rank reserved capacity for the U-Net decoder (CM's capacity reservation).

Every decoder 3x3 convolution with weight ``W_g`` is re-parameterised as
``W = W_g + delta_W`` where ``delta_W`` is a low-rank product ``s * B @ A`` (loralib
ConvLoRA factorisation; the released code has s = 1 and branches in the decoder only).
``W_g`` carries general / majority knowledge and the branch is the capacity reserved
for minority classes. Disabling the branches gives the ``theta_g`` model; merging
them gives a plain U-Net of the original size, so inference costs nothing extra.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class LowRankConv2d(nn.Module):
    """A ``nn.Conv2d`` plus a rank-``r`` weight branch ``delta_W = (B @ A).view(out, in, k, k)``.

    ``A`` is (r*k, in*k) and ``B`` is (out*k, r*k), as in loralib's ConvLoRA, so
    ``B @ A`` viewed as an (out*k, in*k) matrix has rank at most ``r*k``. ``B``
    starts at zero, so wrapping does not change the function.
    """

    def __init__(self, base: nn.Conv2d, rank: int, scale: float = 1.0):
        super().__init__()
        if base.groups != 1:
            raise ValueError(f"LowRankConv2d supports groups=1 only, got groups={base.groups}")
        kh, kw = base.kernel_size
        if kh != kw:
            raise ValueError(f"LowRankConv2d needs a square kernel, got {base.kernel_size}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.scale = rank, scale
        self.enabled = True
        k, w = kh, base.weight
        self.A = nn.Parameter(w.new_empty(rank * k, base.in_channels * k))
        self.B = nn.Parameter(w.new_zeros(base.out_channels * k, rank * k))
        nn.init.kaiming_normal_(self.A, a=math.sqrt(5))  # as released (loralib draws it uniform)

    def delta_weight(self) -> torch.Tensor:
        """The branch's weight update, shaped like ``base.weight`` (out, in, k, k)."""
        return self.scale * (self.B @ self.A).view(self.base.weight.shape)

    def merged_weight(self) -> torch.Tensor:
        """``W_g + delta_W`` (the weight the forward pass uses when enabled)."""
        return self.base.weight + self.delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.merged_weight() if self.enabled else self.base.weight
        # One convolution with the summed weight; _conv_forward honours padding_mode.
        return self.base._conv_forward(x, weight, self.base.bias)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, enabled={self.enabled}"


def rank_for(in_ch: int, out_ch: int, rank_ratio: float) -> int:
    """Branch rank ``max(1, int(rank_ratio * min(in_ch, out_ch)))``; ratio must lie in (0, 1]."""
    if not 0 < rank_ratio <= 1:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
    return max(1, int(rank_ratio * min(in_ch, out_ch)))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    # setattr on an existing child keeps its slot, so state-dict key order is preserved.
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


LAYERS = ("decoder", "all")  # where branches go: the released decoder only, or every 3x3 conv


def add_lowrank_branches(model: nn.Module, rank_ratio: float, *, scale: float = 1.0,
                         layers: str = "decoder") -> list[str]:
    """Wrap 3x3 convs in LowRankConv2d, in place: those of ``model.upblocks`` (``layers="decoder"``,
    as released: the decoder ResBlocks' ``conv1``/``conv2`` and the upsample convs) or every 3x3
    conv of the U-Net (``"all"``). 1x1 shortcuts and attention projections are left alone.
    Returns the qualified names of the wrapped convs.
    """
    if layers not in LAYERS:
        raise ValueError(f"layers = {layers!r} is not allowed: one of {', '.join(LAYERS)}")
    root, prefix = (model.upblocks, "upblocks.") if layers == "decoder" else (model, "")
    targets = [(prefix + name, m) for name, m in root.named_modules()
               if type(m) is nn.Conv2d and m.kernel_size == (3, 3)]
    for name, conv in targets:
        r = rank_for(conv.in_channels, conv.out_channels, rank_ratio)
        _set_submodule(model, name, LowRankConv2d(conv, r, scale))
    return [name for name, _ in targets]


def branches(model: nn.Module) -> Iterator[LowRankConv2d]:
    """All LowRankConv2d modules of ``model``."""
    return (m for m in model.modules() if isinstance(m, LowRankConv2d))


@contextmanager
def branches_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run ``model`` with base weights only (the theta_g model)."""
    mods = list(branches(model))
    saved = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, state in zip(mods, saved):
            m.enabled = state


class LowRankBranches:
    """CM's reserved capacity when training from scratch: low-rank branches on 3x3 convs
    (`prepare`), all switched off for theta_g (`disabled`). The LoRA fine-tuning counterpart is
    cm/finetune's ExpertAdapters."""

    def __init__(self, rank_ratio: float, *, scale: float = 1.0, layers: str = "decoder"):
        self.rank_ratio, self.scale, self.layers = rank_ratio, scale, layers
        self.decoder_only = layers == "decoder"  # what CM's shared-encoder pass needs

    def prepare(self, net: nn.Module) -> None:
        add_lowrank_branches(net, self.rank_ratio, scale=self.scale, layers=self.layers)

    def disabled(self, net: nn.Module):
        return branches_disabled(net)


def lowrank_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The reserved-capacity parameters (every branch's A and B)."""
    return [p for m in branches(model) for p in (m.A, m.B)]


@torch.no_grad()
def merged_model(model: nn.Module, drop_branches: bool = False) -> nn.Module:
    """A copy of ``model`` with each LowRankConv2d replaced by a plain conv.

    The conv's weight is ``W_g + B @ A``, or ``W_g`` alone when ``drop_branches``.
    The input model is not modified.
    """
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, LowRankConv2d):
            conv = m.base
            if not drop_branches:
                conv.weight.copy_(m.merged_weight())
            _set_submodule(out, name, conv)
    return out


def merge_lowrank(model: nn.Module, drop_branches: bool = False) -> dict[str, torch.Tensor]:
    """State dict of the plain (unwrapped) U-Net equivalent to ``model``.

    Keys and shapes match a model built without branches (``...conv1.weight``,
    no ``A``/``B``). ``drop_branches=True`` gives the theta_g-only weights.
    """
    return merged_model(model, drop_branches).state_dict()
