"""Class-imbalance profiles (docs/experiments.md, Building a long-tailed set) and the long-tailed subset they select."""

from __future__ import annotations

import numpy as np


def exponential_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """n_c = int(n_max * ratio ** (-c / (C - 1))), c = 0..C-1 with class 0 the head (Cao et al. 2019)."""
    if num_classes < 2:
        return [int(n_max)]
    return [int(n_max * ratio ** (-c / (num_classes - 1))) for c in range(num_classes)]


def step_counts(n_max: int, num_classes: int, ratio: float, fraction: float) -> list[int]:
    """Step imbalance (Buda et al. 2018; Cao et al. 2019): the last `fraction` of the classes keep
    int(n_max / ratio) images, the others n_max."""
    minority = int(round(fraction * num_classes))
    return [n_max if c < num_classes - minority else int(n_max / ratio) for c in range(num_classes)]


def two_class_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """Two classes, majority first: [n_max, int(n_max / ratio)] (imbalanced CelebA-HQ)."""
    if num_classes != 2:
        raise ValueError(f"data.profile = 'two_class' needs a source with 2 classes, this one has {num_classes}")
    return exponential_counts(n_max, 2, ratio)


PROFILES = ("exponential", "step", "explicit", "two_class", "listed")
# Sources whose images already are the long-tailed set: only `listed` keeps them as they are.
LONG_TAILED_SOURCES = ("imagenet_lt",)


def profile_counts(data: dict, available: np.ndarray) -> list[int]:
    """Per-class target counts of an experiment's `data` settings, given the images per class the
    source has; n_max is its smallest class, so every class can supply it. `listed` keeps every image."""
    num_classes, n_max, ratio = len(available), int(available.min()), data["imbalance_ratio"]
    profile = data["profile"]
    if data["source"] in LONG_TAILED_SOURCES and profile != "listed":
        raise ValueError(f"data.profile = {profile!r} is not allowed with data.source = {data['source']!r}: must be "
                         "listed (the split list already is the long-tailed set)")
    if profile == "listed":
        counts = [int(n) for n in available]
    elif profile == "exponential":
        counts = exponential_counts(n_max, num_classes, ratio)
    elif profile == "step":
        counts = step_counts(n_max, num_classes, ratio, data["step_fraction"])
    elif profile == "two_class":
        counts = two_class_counts(n_max, num_classes, ratio)
    elif profile == "explicit":
        counts = list(data["class_counts"] or [])
        if len(counts) != num_classes:
            raise ValueError(f"data.class_counts has {len(counts)} entries, the source has {num_classes} classes")
        short = [c for c in range(num_classes) if counts[c] > available[c]]
        if short:
            raise ValueError(f"data.class_counts asks class {short[0]} for {counts[short[0]]} images, the source "
                             f"has {int(available[short[0]])}")
    else:
        raise ValueError(f"data.profile = {profile!r} is not allowed: one of {', '.join(PROFILES)}")
    empty = [c for c, n in enumerate(counts) if n < 1]
    if empty:
        raise ValueError(
            f"data.imbalance_ratio = {ratio!r} leaves class(es) {empty} without an image: must be <= {n_max} "
            f"(the head class has {counts[0]} images)")
    return counts


def select_long_tailed(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """Indices of a long-tailed subset, drawn exactly as the field's public splits are (LDAM-DRW's
    `ImbalanceCIFAR`, reused by CBDM, OC and the released CM code): one legacy generator seeded
    once, then for each class in order, shuffle its indices (in the source's order) and keep the
    first n_c. The indices come out in that order, class by class, as those datasets hold them; on
    CIFAR in its official order they are the published subsets' images."""
    rng = np.random.RandomState(seed)  # the stream of np.random.seed(seed) + np.random.shuffle
    kept = []
    for c, n_c in enumerate(counts):
        idx = np.flatnonzero(labels == c)  # np.where(targets == c)[0]
        rng.shuffle(idx)
        kept.append(idx[:n_c])
    return np.concatenate(kept)


def head_to_tail(counts: list[int]) -> list[int]:
    """Classes ordered by training count, largest first (ties by class index)."""
    return sorted(range(len(counts)), key=lambda c: (-counts[c], c))


def many_medium_few(counts: list[int]) -> dict[str, list[int]]:
    """Thirds of the classes ordered head to tail by training count."""
    many, medium, few = np.array_split(np.array(head_to_tail(counts), dtype=int), 3)
    return {"many": many.tolist(), "medium": medium.tolist(), "few": few.tolist()}
