"""Capacity probes: how much of a trained U-Net's capacity each class relies on, and which classes steer it.

Two measurements from Capacity Manipulation (Hong et al., ICLR 2026):

* Pruning probe (the paper's Fig. 1b). Zero the smallest-magnitude weights and compare every class's
  eps-prediction loss before and after: tail classes, which the majority-dominated training leaves
  with little dedicated capacity, lose the most. `theta_g_probe` runs the same comparison for a CM
  model with its reserved low-rank branches off (theta_g only, the model of Table 7), which shows
  how much each class leans on the reserved capacity.
* Gradient dominance (Thm. 2.1 measured). For each parameter matrix, whether the full-batch gradient
  points more along the majority (many) classes' gradient or along the minority (few) classes' one;
  reported per tensor and as the share of majority-dominated matrices per U-Net block and, for CM
  models, per part (W_g vs the branch factors B, A).

Everything here is a pure function of a network, images in the model's range and seeds; results are
plain JSON-able dicts (lists in class-index order). Losses use fixed timesteps and noise drawn from
a seeded torch.Generator, so two networks compared are scored on identical draws (paired comparison).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cm.data.images import scale, to_nchw
from cm.data.profiles import head_to_tail
from cm.diffusion import GaussianDiffusion
from cm.lowrank import LowRankConv2d, branches, branches_disabled
from cm.merge import build_network, has_reserved_capacity, load_checkpoint

SCOPES = ("conv_linear", "all")
"""Which weights `prune_smallest` ranks: conv/linear `.weight`s (for CM: W_g, never B or A), or every parameter."""

NOISE_BLOCK = 256
"""Images whose noise is drawn in one call: the draws depend on the seed and the image order, not the batch size."""

BLOCKS = {"head": "encoder", "downblocks": "encoder", "time_mlp": "encoder", "label_emb": "encoder",
          "middleblocks": "middle", "upblocks": "decoder", "tail": "decoder"}
"""U-Net block of a parameter, by the first component of its name (anything else: "other")."""

CHECKPOINT_WEIGHTS = ("ema", "state_dict")


# ----------------------------------------------------------------------------------------------
# Inputs


def load_trained_network(path: str | Path, weights: str = "ema") -> tuple[nn.Module, dict]:
    """The network of a trained `cm.model/1` checkpoint (cm/train.py), with its low-rank branches when it
    has some, in eval mode, and its config. `weights`: the EMA weights (what is sampled and evaluated)
    or the raw optimiser weights (`"state_dict"`)."""
    net, state = _load_trained(path, weights)
    return net, state["config"]


def _load_trained(path: str | Path, weights: str = "ema") -> tuple[nn.Module, dict]:
    """`load_trained_network`'s network and the whole checkpoint it came from (a latent model's VAE too)."""
    if weights not in CHECKPOINT_WEIGHTS:
        raise ValueError(f"weights = {weights!r} is not allowed: one of {', '.join(CHECKPOINT_WEIGHTS)}")
    state = load_checkpoint(path, "cm.model/1")
    net = build_network(state["config"])
    net.load_state_dict(state[weights])
    return net.eval(), state


def as_model_inputs(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored uint8 (N, H, W, C) images and their labels -> float32 (N, C, H, W) in [-1, 1] and int64 (N,)."""
    return scale(to_nchw(images)), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def model_num_classes(net: nn.Module) -> int | None:
    """The classes a network was built for: its `num_classes`, else its label embedding's size; None if
    neither is known (a network the probes cannot check labels against)."""
    declared = getattr(net, "num_classes", None)
    if declared is not None:
        return int(declared)
    embedding = getattr(net, "label_emb", None)
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def _check_images_and_labels(net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
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


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} = {value!r} is not allowed: a positive integer")


@contextmanager
def _evaluating(net: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout: the loss is a deterministic function of the draws), restored afterwards."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def _per_sample_mse(pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """mean over pixels of (pred - eps)^2 per sample: the training loss's terms (cm/methods/ddpm.py)."""
    return (pred - eps).pow(2).flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------
# Pruning probe (Fig. 1b)


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


@torch.no_grad()
def per_image_losses(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, diffusion: GaussianDiffusion,
                     *, draws: int, seed: int, batch_size: int) -> torch.Tensor:
    """The eps-prediction MSE of every image under `draws` noisings: float64 (N, draws), on the CPU.

    Draw j of image i is t_ij ~ U{0..T-1} and eps_ij ~ N(0, I) from a torch.Generator seeded with `seed`
    (all t first, then eps in blocks of NOISE_BLOCK images), so they depend on the seed and the images'
    order only: two networks scored with the same seed see identical draws, whatever `batch_size`.
    Conditional on the true label; the network runs in eval mode without gradients.
    """
    _check_images_and_labels(net, images, labels)
    _check_positive(draws=draws, batch_size=batch_size)
    param = next(net.parameters())
    device, dtype = param.device, param.dtype
    n, shape = len(images), tuple(images.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(0, diffusion.timesteps, (n, draws), generator=gen)
    losses = torch.empty(n, draws, dtype=torch.float64)
    with _evaluating(net):
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
                block_losses.append(_per_sample_mse(pred.double(), eps_b.double()).cpu())
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


def pruning_probe(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  diffusion: GaussianDiffusion, *, fraction: float, scope: str = "conv_linear", draws: int,
                  seed: int, batch_size: int, class_counts: Sequence[int] | None = None) -> dict:
    """Fig. 1b: each class's loss for `net` (`loss_raw`) and for a copy with the smallest `fraction` of its
    weights zeroed (`loss_pruned`, see `prune_smallest`), on identical draws; `net` is left unchanged.
    The dict is `compare_class_losses`'s plus `prune` (PruneInfo as a dict), `draws` and `seed`."""
    _check_images_and_labels(net, images, labels, num_classes)
    pruned = copy.deepcopy(net)
    info = prune_smallest(pruned, fraction, scope)
    scored = dict(diffusion=diffusion, draws=draws, seed=seed, batch_size=batch_size)
    raw_losses = per_image_losses(net, images, labels, **scored)
    pruned_losses = per_image_losses(pruned, images, labels, **scored)
    result = compare_class_losses(raw_losses, pruned_losses, labels, num_classes, names=("raw", "pruned"),
                                  class_counts=class_counts)
    return {**result, "prune": info.as_dict(), "draws": draws, "seed": seed}


def theta_g_probe(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  diffusion: GaussianDiffusion, *, draws: int, seed: int, batch_size: int,
                  class_counts: Sequence[int] | None = None, theta_g_net: nn.Module | None = None) -> dict:
    """Table 7's theta_g model per class: each class's loss for a CM network with its low-rank branches on
    (`loss_full`) and off (`loss_theta_g`), on identical draws. The dict is `compare_class_losses`'s plus
    `branches` (how many convs have one), `draws` and `seed`. ValueError for a network without branches.
    theta_g_net: the theta_g model as a network of its own (a fine-tuning merged without its `expert`
    adapter, beside `net` merged with it); `branches` is then None."""
    _check_images_and_labels(net, images, labels, num_classes)
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


# ----------------------------------------------------------------------------------------------
# Gradient dominance (Thm. 2.1)


def noised_probe_batches(num_images: int, image_shape: Sequence[int], diffusion: GaussianDiffusion, *,
                         batches: int, batch_size: int, seed: int
                         ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`batches` draws of (indices, t, eps) from a torch.Generator seeded with `seed`: per batch,
    min(batch_size, num_images) distinct images uniform from the training set as it is (imbalanced, as
    training sees it), then their timesteps and noise."""
    _check_positive(batches=batches, batch_size=batch_size)
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


def _majority_share(rows: list[dict]) -> dict:
    """Of these tensors: how many, how many have a defined direction, how many the majority dominates, and
    the fraction of the defined ones it dominates (None when none is defined)."""
    defined = sum(row["dominated_by"] is not None for row in rows)
    dominated = sum(row["dominated_by"] == "many" for row in rows)
    return {"tensors": len(rows), "defined": defined, "majority_dominated": dominated,
            "fraction": dominated / defined if defined else None}


def _majority_share_by(rows: list[dict], key: str) -> dict:
    """`_majority_share` per value of `key` (block or part), in order of first appearance."""
    values = dict.fromkeys(row[key] for row in rows)
    return {value: _majority_share([row for row in rows if row[key] == value]) for value in values}


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

    Eval mode (no dropout): the gradients are functions of the draws alone. Three backward passes per
    batch through one forward graph. A matrix whose G_all, G_many or G_few is zero (a branch A while its
    B is still zero) has no direction: its cosines and `dominated_by` are None and it is left out of the
    fractions.

    Returns `tensors` (per matrix: name, block, part, numel, norm_all, norm_many, norm_few, cos_many,
    cos_few, dominated_by = "many" | "few" | "tie" | None), `by_block` and `by_part` (per block / part:
    tensors, defined, majority_dominated, fraction), `overall` (the same over all matrices), `samples`
    (images per group over all batches), `batches`, `batch_size`, `seed`.
    """
    known_classes = model_num_classes(net)
    _check_images_and_labels(net, images, labels)
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
    device, dtype = params[0].device, params[0].dtype
    with _evaluating(net), torch.enable_grad():
        for index, t, eps in drawn:
            eps, t = eps.to(device, dtype), t.to(device)
            x_t = diffusion.q_sample(images[index].to(device, dtype), t, eps)
            losses = _per_sample_mse(net(x_t, t, labels[index].to(device)), eps)
            in_group = {"all": torch.ones(len(index), dtype=torch.bool), "many": is_many[index], "few": is_few[index]}
            active = [group for group in ("all", "many", "few") if in_group[group].any()]
            for k, group in enumerate(active):
                # (1/N) sum over the group's samples: the group's share of the batch's mean loss.
                objective = (losses * in_group[group].to(device, losses.dtype)).sum() / len(index)
                grads = torch.autograd.grad(objective, params, retain_graph=k < len(active) - 1, allow_unused=True)
                for total, grad in zip(sums[group], grads):
                    if grad is not None:
                        total += grad.double()

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
                     "dominated_by": dominated_by})
    return {"tensors": rows, "by_block": _majority_share_by(rows, "block"), "by_part": _majority_share_by(rows, "part"),
            "overall": _majority_share(rows),
            "samples": samples, "batches": batches, "batch_size": batch_size, "seed": seed}


# ----------------------------------------------------------------------------------------------
# The pipeline's probe stage


def probe_model(model_path: str | Path, manifest: dict, experiment: dict) -> dict:
    """Every probe of one trained model on its training set (experiment's `probe` settings): the
    pruning probe, for a model with low-rank branches the theta_g probe (else None), and the
    gradient dominance over the manifest's many/medium/few split."""
    from cm.data import load_training_set

    settings = experiment["probe"]
    net, state = _load_trained(model_path)
    config, codec = state["config"], state.get("codec")  # codec: a latent model's VAE
    del state  # its weights are in `net`: a large checkpoint is not held twice while probing
    if config["num_classes"] != manifest["num_classes"]:
        raise ValueError(f"{model_path}: the model has {config['num_classes']} classes, the training set "
                         f"{manifest['num_classes']}: not a model of this experiment")
    data = load_training_set(manifest)
    if codec is None:
        images, labels = as_model_inputs(data.images, data.labels)
    else:  # a latent model's losses are on the latents of the images
        from cm.finetune.diffusers_models import load_codec

        images = load_codec(codec).encode_stored(to_nchw(data.images))
        labels = torch.as_tensor(np.asarray(data.labels), dtype=torch.int64)
    diffusion = GaussianDiffusion(**experiment["diffusion"])
    scored = dict(draws=settings["draws"], seed=settings["seed"], batch_size=settings["batch_size"],
                  class_counts=manifest["class_counts"])
    has_branches, theta_g_net = any(True for _ in branches(net)), None
    if config.get("lora"):  # a fine-tuning: probe the plain model its adapters merge into
        from cm.finetune import merged

        if has_reserved_capacity(config):
            theta_g_net, has_branches = merged(net, drop=("expert",)).eval(), True
        net = merged(net).eval().requires_grad_(True)  # every weight, for the gradient dominance
    return {
        "pruning": pruning_probe(net, images, labels, manifest["num_classes"], diffusion,
                                 fraction=settings["fraction"], scope=settings["scope"], **scored),
        "theta_g": theta_g_probe(net, images, labels, manifest["num_classes"], diffusion, theta_g_net=theta_g_net,
                                 **scored) if has_branches else None,
        "dominance": gradient_dominance(net, images, labels, manifest["splits"], diffusion,
                                        batches=settings["dominance_batches"], batch_size=settings["batch_size"],
                                        seed=settings["seed"]),
    }
