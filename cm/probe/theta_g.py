"""The theta_g probe (the paper's Table 7 model): each class's loss for a CM network with its reserved
capacity on and off, which shows how much each class leans on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cm.diffusion import GaussianDiffusion
from cm.lowrank import branches, branches_disabled
from cm.probe.scoring import check_images_and_labels, compare_class_losses, per_image_losses


def theta_g_probe(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  diffusion: GaussianDiffusion, *, draws: int, seed: int, batch_size: int,
                  class_counts: Sequence[int] | None = None, theta_g_net: nn.Module | None = None) -> dict:
    """Table 7's theta_g model per class: each class's loss for a CM network with its low-rank branches on
    (`loss_full`) and off (`loss_theta_g`), on identical draws. The dict is `compare_class_losses`'s plus
    `branches` (how many convs have one), `draws` and `seed`. ValueError for a network without branches.
    theta_g_net: the theta_g model as a network of its own (a fine-tuning merged without its `expert`
    adapter, beside `net` merged with it); `branches` is then None."""
    check_images_and_labels(net, images, labels, num_classes)
    count = None if theta_g_net is not None else sum(1 for _ in branches(net))
    if count == 0:
        raise ValueError(f"this {type(net).__name__} has no low-rank branches: the theta_g probe needs a "
                         f"CM variant's network (built with its rank_ratio)")
    scored = dict(diffusion=diffusion, draws=draws, seed=seed, batch_size=batch_size)
    full_losses = per_image_losses(net, images, labels, **scored)
    if theta_g_net is not None:
        theta_g_losses = per_image_losses(theta_g_net, images, labels, **scored)
    else:
        with branches_disabled(net):
            theta_g_losses = per_image_losses(net, images, labels, **scored)
    result = compare_class_losses(full_losses, theta_g_losses, labels, num_classes, names=("full", "theta_g"),
                                  class_counts=class_counts)
    return {**result, "branches": count, "draws": draws, "seed": seed}
