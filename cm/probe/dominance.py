"""Gradient dominance (Thm. 2.1 measured): for each parameter matrix, whether the full-batch gradient
points more along the majority (many) classes' gradient or along the minority (few) classes' one;
reported per tensor and as the share of majority-dominated matrices per U-Net block and, for CM
models, per part (W_g vs the branch factors B, A), with the graded margin cos_many - cos_few beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cm.diffusion import GaussianDiffusion
from cm.lowrank import LowRankConv2d
from cm.probe.scoring import check_images_and_labels, check_positive, evaluating, model_num_classes, per_sample_mse

BLOCKS = {"head": "encoder", "downblocks": "encoder", "time_mlp": "encoder", "label_emb": "encoder",
          "middleblocks": "middle", "upblocks": "decoder", "tail": "decoder"}
"""U-Net block of a parameter, by the first component of its name (anything else: "other")."""


def noised_probe_batches(num_images: int, image_shape: Sequence[int], diffusion: GaussianDiffusion, *,
                         batches: int, batch_size: int, seed: int
                         ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`batches` draws of (indices, t, eps) from a torch.Generator seeded with `seed`: per batch,
    min(batch_size, num_images) distinct images uniform from the training set as it is (imbalanced, as
    training sees it), then their timesteps and noise."""
    check_positive(batches=batches, batch_size=batch_size)
    gen = torch.Generator().manual_seed(seed)
    size = min(batch_size, num_images)
    drawn = []
    for _ in range(batches):
        index = torch.randperm(num_images, generator=gen)[:size]
        t = torch.randint(0, diffusion.timesteps, (size,), generator=gen)
        eps = torch.randn((size, *image_shape), generator=gen)
        drawn.append((index, t, eps))
    return drawn


def parameter_matrices(net: nn.Module) -> list[tuple[str, nn.Parameter, str, str]]:
    """(name, parameter, block, part) of every trainable parameter with dim >= 2: conv and linear weights,
    the label embedding, and a CM network's branch factors. `block` is encoder / middle / decoder (see
    `BLOCKS`, "other" for a network that is not the U-Net); `part` is "BA" for a branch's A or B and
    "W_g" for the rest (every parameter outside the branches belongs to theta_g)."""
    factors = {id(p) for m in net.modules() if isinstance(m, LowRankConv2d) for p in (m.A, m.B)}
    return [(name, p, BLOCKS.get(name.split(".")[0], "other"), "BA" if id(p) in factors else "W_g")
            for name, p in net.named_parameters() if p.dim() >= 2 and p.requires_grad]


def _check_splits(splits: dict, labels: torch.Tensor, num_classes: int | None) -> tuple[list[int], list[int]]:
    """The many and few class lists of a manifest's `splits`, or ValueError naming what is wrong."""
    groups = {}
    for group in ("many", "few"):
        classes = [int(c) for c in splits.get(group) or []]
        if not classes:
            raise ValueError(f"splits[{group!r}] is empty: gradient dominance needs classes in both many and few")
        bad = [c for c in classes if c < 0 or (num_classes is not None and c >= num_classes)]
        if bad:
            raise ValueError(f"splits[{group!r}] names classes {bad}, not among the model's {num_classes} classes")
        if not torch.isin(labels, torch.tensor(classes)).any():
            raise ValueError(f"splits[{group!r}] = {classes}: no image of these classes in the data")
        groups[group] = classes
    overlap = sorted(set(groups["many"]) & set(groups["few"]))
    if overlap:
        raise ValueError(f"classes {overlap} are in both splits['many'] and splits['few']")
    return groups["many"], groups["few"]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """cos(a, b) in float64; None when either is zero (no direction)."""
    norms = a.norm() * b.norm()
    return (torch.dot(a.flatten(), b.flatten()) / norms).item() if norms > 0 else None


def _margin(cos_many: float | None, cos_few: float | None) -> float | None:
    """cos_many - cos_few; None when either cosine is."""
    return None if cos_many is None or cos_few is None else cos_many - cos_few


def _mean_defined(values: list[float | None]) -> float | None:
    """Mean of the values that are not None; None when none is."""
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _majority_share(rows: list[dict], batch_margins: list[list[float | None]]) -> dict:
    """Of these tensors: how many, how many have a defined direction, how many the majority dominates, and
    the fraction of the defined ones it dominates (None when none is defined); the mean margin over the
    defined ones, and the std over batches (ddof=1) of the same mean taken on each batch's own margins
    (`batch_margins[b][i]`: batch b, the matrix of rows[i]), None with fewer than 2 batches where it is defined."""
    defined = sum(row["dominated_by"] is not None for row in rows)
    dominated = sum(row["dominated_by"] == "many" for row in rows)
    per_batch = [_mean_defined(batch) for batch in batch_margins]
    per_batch = [m for m in per_batch if m is not None]
    return {"tensors": len(rows), "defined": defined, "majority_dominated": dominated,
            "fraction": dominated / defined if defined else None,
            "margin": _mean_defined([row["margin"] for row in rows]), "margin_batches": len(per_batch),
            "margin_batch_std": float(np.std(per_batch, ddof=1)) if len(per_batch) > 1 else None}


def _majority_share_by(rows: list[dict], key: str, batch_margins: list[list[float | None]]) -> dict:
    """`_majority_share` per value of `key` (block or part), in order of first appearance."""
    shares = {}
    for value in dict.fromkeys(row[key] for row in rows):
        mine = [i for i, row in enumerate(rows) if row[key] == value]
        shares[value] = _majority_share([rows[i] for i in mine], [[batch[i] for i in mine] for batch in batch_margins])
    return shares


def gradient_dominance(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, splits: dict,
                       diffusion: GaussianDiffusion, *, batches: int, batch_size: int, seed: int) -> dict:
    """Thm. 2.1 measured: which class group the full-batch gradient of each parameter matrix follows.

    On `batches` seeded noised batches (`noised_probe_batches`: images uniform from the training set as
    it is, so each group's share of a batch is its share of the training distribution, the setting of
    the theorem), with per-sample losses l_i and batch size N, the gradients per matrix W (see
    `parameter_matrices`) of

        G_all  = grad (1/N) sum_i l_i,   G_many = grad (1/N) sum_{i in many} l_i,   G_few = likewise,

    summed over the batches. G_all = G_many + G_medium + G_few is the update direction that training
    takes (up to the optimiser's scaling). W is majority-dominated when cos(G_all, G_many) > cos(G_all,
    G_few): the step that lowers the whole batch's loss points closer to the step that lowers the
    majority's loss than to the one the minority needs. With no medium group this is exactly
    |G_many| > |G_few|, since cos(a + b, a) - cos(a + b, b) has the sign of |a| - |b|; each group's
    summed gradient grows with its sample count, so the majority's gradient wins the direction of more
    and more matrices as the imbalance grows. The theorem states that share grows with the imbalance;
    the fractions reported here are its measured counterpart for one model and data set.

    The share is a count of signs: once every matrix leans to the majority it sits at 1 and cannot move.
    The graded measure is the margin, cos(G_all, G_many) - cos(G_all, G_few), in [-2, 2]: positive when the
    majority leads, 0 at a tie, growing with how far it leads. In the setting of the theorem (G_many and
    G_few orthogonal, no medium group, so G_all = G_many + G_few) with |G_many| / |G_few| = rho,

        margin = (rho - 1) / sqrt(rho^2 + 1),

    0 for balanced groups, rising continuously towards 1 as rho grows (1/sqrt(5) at rho = 2, 0.90 at
    rho = 10). Per block, per part and overall it is the mean margin over the defined matrices. Its
    spread, `margin_batch_std`, is the std over batches (ddof=1) of the same mean computed on each batch's
    own gradients G_all_b, G_many_b, G_few_b (a batch without an image of a group has no margin); None
    with fewer than 2 such batches. The margin itself is on the summed gradients, like the cosines.

    Eval mode (no dropout): the gradients are functions of the draws alone. Three backward passes per
    batch through one forward graph. A matrix whose G_all, G_many or G_few is zero (a branch A while its
    B is still zero) has no direction: its cosines and `dominated_by` are None and it is left out of the
    fractions and the margins.

    Returns `tensors` (per matrix: name, block, part, numel, norm_all, norm_many, norm_few, cos_many,
    cos_few, margin, dominated_by = "many" | "few" | "tie" | None), `by_block` and `by_part` (per block /
    part: tensors, defined, majority_dominated, fraction, margin, margin_batches (batches with a defined
    margin), margin_batch_std), `overall` (the same over all matrices), `samples` (images per group over
    all batches), `batches`, `batch_size`, `seed`.
    """
    known_classes = model_num_classes(net)
    check_images_and_labels(net, images, labels)
    labels = labels.cpu()  # group masks and batch indices live on the CPU, like the draws
    many, few = _check_splits(splits, labels, known_classes)
    is_many, is_few = torch.isin(labels, torch.tensor(many)), torch.isin(labels, torch.tensor(few))
    drawn = noised_probe_batches(len(images), images.shape[1:], diffusion, batches=batches,
                                 batch_size=batch_size, seed=seed)
    samples = {"many": sum(int(is_many[idx].sum()) for idx, _, _ in drawn),
               "few": sum(int(is_few[idx].sum()) for idx, _, _ in drawn)}
    samples["medium"] = sum(len(idx) for idx, _, _ in drawn) - samples["many"] - samples["few"]
    for group in ("many", "few"):
        if samples[group] == 0:
            raise ValueError(f"the probe batches hold no image of the {group} classes {splits[group]}: "
                             f"raise batches or batch_size (now {batches} x {batch_size})")

    matrices = parameter_matrices(net)
    if not matrices:
        raise ValueError(f"this {type(net).__name__} has no trainable parameter with dim >= 2")
    params = [p for _, p, _, _ in matrices]
    sums = {group: [torch.zeros_like(p, dtype=torch.float64) for p in params] for group in ("all", "many", "few")}
    batch_margins = []  # [batch][matrix]: the margin on that batch's own gradients
    device, dtype = params[0].device, params[0].dtype
    with evaluating(net), torch.enable_grad():
        for index, t, eps in drawn:
            eps, t = eps.to(device, dtype), t.to(device)
            x_t = diffusion.q_sample(images[index].to(device, dtype), t, eps)
            losses = per_sample_mse(net(x_t, t, labels[index].to(device)), eps)
            in_group = {"all": torch.ones(len(index), dtype=torch.bool), "many": is_many[index], "few": is_few[index]}
            active = [group for group in ("all", "many", "few") if in_group[group].any()]
            # This batch's gradients per group (zero for a group it has no image of: no direction).
            batch = {group: [torch.zeros_like(p, dtype=torch.float64) for p in params] for group in sums}
            for k, group in enumerate(active):
                # (1/N) sum over the group's samples: the group's share of the batch's mean loss.
                objective = (losses * in_group[group].to(device, losses.dtype)).sum() / len(index)
                grads = torch.autograd.grad(objective, params, retain_graph=k < len(active) - 1, allow_unused=True)
                for total, grad in zip(batch[group], grads):
                    if grad is not None:
                        total += grad.double()
            batch_margins.append([_margin(_cosine(g_all, g_many), _cosine(g_all, g_few))
                                  for g_all, g_many, g_few in zip(batch["all"], batch["many"], batch["few"])])
            for group, grads in batch.items():
                for total, grad in zip(sums[group], grads):
                    total += grad

    rows = []
    for (name, p, block, part), g_all, g_many, g_few in zip(matrices, sums["all"], sums["many"], sums["few"]):
        cos_many, cos_few = _cosine(g_all, g_many), _cosine(g_all, g_few)
        if cos_many is None or cos_few is None:
            dominated_by = None
        else:
            dominated_by = "many" if cos_many > cos_few else "few" if cos_few > cos_many else "tie"
        rows.append({"name": name, "block": block, "part": part, "numel": p.numel(),
                     "norm_all": g_all.norm().item(), "norm_many": g_many.norm().item(),
                     "norm_few": g_few.norm().item(), "cos_many": cos_many, "cos_few": cos_few,
                     "margin": _margin(cos_many, cos_few), "dominated_by": dominated_by})
    return {"tensors": rows, "by_block": _majority_share_by(rows, "block", batch_margins),
            "by_part": _majority_share_by(rows, "part", batch_margins), "overall": _majority_share(rows, batch_margins),
            "samples": samples, "batches": batches, "batch_size": batch_size, "seed": seed}
