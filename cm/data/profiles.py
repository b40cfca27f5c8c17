"""Class-imbalance profiles (design section 4) and the long-tailed subset they select."""

from __future__ import annotations

import numpy as np


def exponential_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """n_c = int(n_max * ratio ** (-c / (C - 1))), c = 0..C-1 with class 0 the head (Cao et al. 2019)."""
    if num_classes < 2:
        return [int(n_max)]
    return [int(n_max * ratio ** (-c / (num_classes - 1))) for c in range(num_classes)]


PROFILES = {"exponential": exponential_counts}


def profile_counts(profile: str, labels: np.ndarray, num_classes: int, ratio: float) -> list[int]:
    """Per-class target counts; n_max is the smallest class of the source so every class can supply it."""
    available = np.bincount(labels, minlength=num_classes)
    counts = PROFILES[profile](int(available.min()), num_classes, ratio)
    empty = [c for c, n in enumerate(counts) if n < 1]
    if empty:
        raise ValueError(
            f"data.imbalance_ratio = {ratio!r} leaves class(es) {empty} without an image "
            f"(largest class {counts[0]}); use a ratio of at most {counts[0]}"
        )
    return counts


def select_long_tailed(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """Indices of a long-tailed subset: the first n_c of a seeded permutation of each class."""
    rng = np.random.default_rng(seed)
    kept = []
    for c, n_c in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        kept.append(np.sort(rng.permutation(idx)[:n_c]))
    return np.concatenate(kept)


def head_to_tail(counts: list[int]) -> list[int]:
    """Classes ordered by training count, largest first (ties by class index)."""
    return sorted(range(len(counts)), key=lambda c: (-counts[c], c))


def many_medium_few(counts: list[int]) -> dict[str, list[int]]:
    """Thirds of the classes ordered head to tail by training count."""
    many, medium, few = np.array_split(np.array(head_to_tail(counts), dtype=int), 3)
    return {"many": many.tolist(), "medium": medium.tolist(), "few": few.tolist()}
