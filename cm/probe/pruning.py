"""The pruning probe (the paper's Fig. 1b): zero the smallest-magnitude weights and compare every
class's eps-prediction loss before and after. Tail classes, which the majority-dominated training
leaves with little dedicated capacity, lose the most.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cm.diffusion import GaussianDiffusion
from cm.probe.scoring import check_images_and_labels, compare_class_losses, per_image_losses

SCOPES = ("conv_linear", "all")
"""Which weights `prune_smallest` ranks: conv/linear `.weight`s (for CM: W_g, never B or A), or every parameter."""


@dataclass(frozen=True)
class PruneInfo:
    """What `prune_smallest` did: elements with |w| up to `threshold` were zeroed, `zeroed` of `considered`."""

    scope: str
    fraction: float
    threshold: float          # the largest |w| set to zero (0.0 when round(fraction * considered) is 0)
    zeroed: int               # exactly round(fraction * considered)
    considered: int           # elements of the weights the scope selects
    tensors: tuple[str, ...]  # the selected parameters' names

    def as_dict(self) -> dict:
        return {**asdict(self), "tensors": list(self.tensors)}


def prunable_weights(net: nn.Module, scope: str = "conv_linear") -> list[tuple[str, nn.Parameter]]:
    """The parameters `prune_smallest` ranks under `scope` (see `SCOPES`), each once, in module order."""
    if scope not in SCOPES:
        raise ValueError(f"scope = {scope!r} is not allowed: one of {', '.join(SCOPES)}")
    if scope == "all":
        return list(net.named_parameters())
    # A LowRankConv2d's base is a plain nn.Conv2d (W_g); its A and B belong to the wrapper, so they
    # are not selected: the probe prunes the general weights, as the plain model's are pruned.
    selected, seen = [], set()
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            selected.append((f"{name}.weight" if name else "weight", module.weight))
    return selected


@torch.no_grad()
def prune_smallest(net: nn.Module, fraction: float, scope: str = "conv_linear") -> PruneInfo:
    """Zero, in place, the round(fraction * n) elements of smallest |w| among the n elements of the weights
    `scope` selects, ranked globally (one threshold for all tensors, as in magnitude pruning of Fig. 1b).
    Ties at the threshold are broken by position, so exactly that many elements are zeroed."""
    if not (isinstance(fraction, numbers.Real) and 0 < fraction < 1):
        raise ValueError(f"fraction = {fraction!r} is not allowed: a number strictly between 0 and 1")
    weights = prunable_weights(net, scope)
    considered = sum(w.numel() for _, w in weights)
    if considered == 0:
        raise ValueError(f"scope = {scope!r} selects no weights of this {type(net).__name__}: "
                         f"try another of {', '.join(SCOPES)}")
    count = round(fraction * considered)
    threshold = 0.0
    if count:
        magnitudes = torch.cat([w.detach().abs().flatten().double().cpu() for _, w in weights])
        # A stable sort makes the choice among equal magnitudes reproducible.
        smallest = torch.sort(magnitudes, stable=True).indices[:count]
        threshold = magnitudes[smallest[-1]].item()
        mask = torch.zeros(considered, dtype=torch.bool)
        mask[smallest] = True
        start = 0
        for _, weight in weights:
            part = mask[start:start + weight.numel()].view(weight.shape).to(weight.device)
            weight.masked_fill_(part, 0.0)
            start += weight.numel()
    return PruneInfo(scope, float(fraction), threshold, count, considered, tuple(name for name, _ in weights))


def pruning_probe(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  diffusion: GaussianDiffusion, *, fraction: float, scope: str = "conv_linear", draws: int,
                  seed: int, batch_size: int, class_counts: Sequence[int] | None = None) -> dict:
    """Fig. 1b: each class's loss for `net` (`loss_raw`) and for a copy with the smallest `fraction` of its
    weights zeroed (`loss_pruned`, see `prune_smallest`), on identical draws; `net` is left unchanged.
    The dict is `compare_class_losses`'s plus `prune` (PruneInfo as a dict), `draws` and `seed`."""
    check_images_and_labels(net, images, labels, num_classes)
    pruned = copy.deepcopy(net)
    info = prune_smallest(pruned, fraction, scope)
    scored = dict(diffusion=diffusion, draws=draws, seed=seed, batch_size=batch_size)
    raw_losses = per_image_losses(net, images, labels, **scored)
    pruned_losses = per_image_losses(pruned, images, labels, **scored)
    result = compare_class_losses(raw_losses, pruned_losses, labels, num_classes, names=("raw", "pruned"),
                                  class_counts=class_counts)
    return {**result, "prune": info.as_dict(), "draws": draws, "seed": seed}
