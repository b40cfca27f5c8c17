"""How every probe scores a network: the checks on its inputs, eval mode, and each class's
eps-prediction loss on seeded draws, compared between two networks on identical draws.

Losses use fixed timesteps and noise drawn from a seeded torch.Generator, so two networks compared
are scored on identical draws (a paired comparison).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from cm.data.profiles import head_to_tail
from cm.diffusion import GaussianDiffusion

NOISE_BLOCK = 256
"""Images whose noise is drawn in one call: the draws depend on the seed and the image order, not the batch size."""


def model_num_classes(net: nn.Module) -> int | None:
    """The classes a network was built for: its `num_classes`, else its label embedding's size; None if
    neither is known (a network the probes cannot check labels against)."""
    declared = getattr(net, "num_classes", None)
    if declared is not None:
        return int(declared)
    embedding = getattr(net, "label_emb", None)
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def check_images_and_labels(net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                            num_classes: int | None = None) -> None:
    """ValueError, in one line, for inputs the probes cannot score against `net`."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (N, C, H, W) tensor, "
                         f"got {images.dtype} of shape {tuple(images.shape)}")
    if labels.dim() != 1 or labels.is_floating_point() or len(labels) != len(images):
        raise ValueError(f"labels must be an integer (N,) tensor with N = {len(images)} images, "
                         f"got {labels.dtype} of shape {tuple(labels.shape)}")
    if len(images) == 0:
        raise ValueError("no images to probe: images and labels are empty")
    known = model_num_classes(net)
    if num_classes is not None and known is not None and num_classes > known:
        raise ValueError(f"num_classes = {num_classes} exceeds the model's {known} classes")
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"labels include {low}: class indices start at 0 (the probes score conditional passes)")
    for limit, whose in ((known, "model"), (num_classes, "data")):
        if limit is not None and high >= limit:
            raise ValueError(f"labels include {high}, outside the {whose}'s {limit} classes 0..{limit - 1}")


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} = {value!r} is not allowed: a positive integer")


@contextmanager
def evaluating(net: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout: the loss is a deterministic function of the draws), restored afterwards."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def per_sample_mse(pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """mean over pixels of (pred - eps)^2 per sample: the training loss's terms (cm/methods/ddpm.py)."""
    return (pred - eps).pow(2).flatten(1).mean(dim=1)


@torch.no_grad()
def per_image_losses(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, diffusion: GaussianDiffusion,
                     *, draws: int, seed: int, batch_size: int) -> torch.Tensor:
    """The eps-prediction MSE of every image under `draws` noisings: float64 (N, draws), on the CPU.

    Draw j of image i is t_ij ~ U{0..T-1} and eps_ij ~ N(0, I) from a torch.Generator seeded with `seed`
    (all t first, then eps in blocks of NOISE_BLOCK images), so they depend on the seed and the images'
    order only: two networks scored with the same seed see identical draws, whatever `batch_size`.
    Conditional on the true label; the network runs in eval mode without gradients.
    """
    check_images_and_labels(net, images, labels)
    check_positive(draws=draws, batch_size=batch_size)
    param = next(net.parameters())
    device, dtype = param.device, param.dtype
    n, shape = len(images), tuple(images.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(0, diffusion.timesteps, (n, draws), generator=gen)
    losses = torch.empty(n, draws, dtype=torch.float64)
    with evaluating(net):
        for start in range(0, n, NOISE_BLOCK):
            stop = min(start + NOISE_BLOCK, n)
            eps = torch.randn((stop - start, draws, *shape), generator=gen).flatten(0, 1)   # (pairs, C, H, W)
            # One row per (image, draw) pair, image-major, so row k of the block is image k // draws.
            x0 = images[start:stop].repeat_interleave(draws, dim=0)
            y = labels[start:stop].repeat_interleave(draws)
            t = timesteps[start:stop].flatten()
            block_losses = []
            for b in range(0, len(t), batch_size):
                rows = slice(b, b + batch_size)
                eps_b = eps[rows].to(device, dtype)
                t_b = t[rows].to(device)
                x_t = diffusion.q_sample(x0[rows].to(device, dtype), t_b, eps_b)
                pred = net(x_t, t_b, y[rows].to(device))
                block_losses.append(per_sample_mse(pred.double(), eps_b.double()).cpu())
            losses[start:stop] = torch.cat(block_losses).view(stop - start, draws)
    return losses


def compare_class_losses(reference: torch.Tensor, modified: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         *, names: tuple[str, str], class_counts: Sequence[int] | None = None) -> dict:
    """Per class c, the mean loss of two networks on the same (image, draw) pairs and the relative change
    R_c = (L_modified - L_reference) / L_reference.

    Standard error of R_c (delta method for a ratio of paired means): with the class's m = n_c * draws
    pairs k, loss l_k of the reference and paired difference d_k = l'_k - l_k, R = mean(d) / mean(l) and

        se(R) = sqrt( sum_k (d_k - R l_k)^2 / (m (m - 1)) ) / mean(l).

    The pairs are treated as i.i.d. draws from the class (image uniform, then t and eps). For the fixed
    probe images, whose only randomness is the draws, that is stratified sampling by image, whose variance
    is no larger: the estimate errs on the safe side, by the between-image spread (tests: about equal to
    the spread over seeds). Pairing cancels the noise common to both networks, so se is small.

    Returns lists in class-index order (None for a class without images, and for se with m < 2):
    `loss_<reference>`, `loss_<modified>`, `relative_change`, `relative_change_se`, `num_images`,
    `class_counts` (training counts; default: counts of `labels`) and `head_to_tail` (classes by
    training count, largest first).
    """
    if reference.shape != modified.shape or reference.shape[0] != len(labels):
        raise ValueError(f"loss tables must both be (N, draws) with N = {len(labels)}: "
                         f"got {tuple(reference.shape)} and {tuple(modified.shape)}")
    labels = labels.cpu()
    if class_counts is None:
        class_counts = np.bincount(labels.numpy(), minlength=num_classes).tolist()
    class_counts = [int(c) for c in class_counts]
    if len(class_counts) != num_classes:
        raise ValueError(f"class_counts has {len(class_counts)} entries for num_classes = {num_classes}")
    ref_name, mod_name = names
    table = {f"loss_{ref_name}": [], f"loss_{mod_name}": [], "relative_change": [], "relative_change_se": [],
             "num_images": []}
    for c in range(num_classes):
        rows = labels == c
        ref, mod = reference[rows].flatten().double(), modified[rows].flatten().double()
        table["num_images"].append(int(rows.sum()))
        if len(ref) == 0:
            for key in (f"loss_{ref_name}", f"loss_{mod_name}", "relative_change", "relative_change_se"):
                table[key].append(None)
            continue
        mean_ref, mean_mod = ref.mean().item(), mod.mean().item()
        change = (mean_mod - mean_ref) / mean_ref if mean_ref > 0 else None
        se = None
        if change is not None and len(ref) > 1:
            residual = (mod - ref) - change * ref
            se = math.sqrt(residual.pow(2).sum().item() / (len(ref) * (len(ref) - 1))) / mean_ref
        table[f"loss_{ref_name}"].append(mean_ref)
        table[f"loss_{mod_name}"].append(mean_mod)
        table["relative_change"].append(change)
        table["relative_change_se"].append(se)
    return {**table, "class_counts": class_counts, "head_to_tail": head_to_tail(class_counts)}
