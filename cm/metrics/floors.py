"""Noise floors: the value a metric takes between two disjoint halves of the *real* data.

A generated set can never be told apart from the reference better than a second real sample of
the same size can, so the split-half value is the floor below which differences between models
are noise (FID in particular is biased upward by roughly Tr(S)/n for small n; per-class FID
with a few hundred images per class is dominated by it). Halves are class-stratified and
disjoint; both are drawn from the reference, so the floor uses half-sized references and is,
if anything, a little pessimistic.

Half sizes (``n_gen`` / ``n_per_class``):

- ``None``: as large as possible, floor(N_c / 2) rows of class c in each half;
- an int: each half holds that many rows in total, spread over the classes in proportion to
  the reference class counts (largest-remainder rounding) -- size the halves like the generated
  set when it follows the reference's class balance;
- a sequence of K ints: rows of class c in each half -- pass the generated set's per-class
  counts, e.g. ``np.bincount(gen_labels, minlength=K)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cm.metrics.checks import check_feats, check_labels
from cm.metrics.frechet import ReferenceStats


def _allocate(total: int, counts: np.ndarray) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (K,), largest remainder first."""
    quota = total * counts / counts.sum()  # (K,)
    sizes = np.floor(quota).astype(np.int64)
    extra = total - int(sizes.sum())
    order = np.argsort(-(quota - sizes), kind="stable")  # ties: lower class index first
    sizes[order[:extra]] += 1
    return sizes


def half_sizes(n: int | Sequence[int] | None, ref_counts: np.ndarray, min_per_class: int = 0) -> np.ndarray:
    """Rows of each class (K,) in each half; raises if two disjoint halves do not fit."""
    k = len(ref_counts)
    if n is None:
        sizes = ref_counts // 2
    elif np.ndim(n) == 0:
        if int(n) < 1:
            raise ValueError(f"half size must be positive, got {n}")
        sizes = _allocate(int(n), ref_counts)
    else:
        sizes = np.asarray(n, dtype=np.int64)
        if sizes.shape != (k,) or (sizes < 0).any():
            raise ValueError(f"per-class half sizes must be {k} non-negative ints, got {list(np.asarray(n))}")
    for c in range(k):
        if 2 * sizes[c] > ref_counts[c]:
            raise ValueError(
                f"class {c} has {ref_counts[c]} real images; two disjoint halves of {sizes[c]} each need "
                f"{2 * sizes[c]}: lower the half size to at most {ref_counts[c] // 2} for this class")
        if sizes[c] < min_per_class:
            raise ValueError(
                f"class {c} would get {sizes[c]} rows per half; this floor needs at least {min_per_class} "
                f"per class, i.e. at least {2 * min_per_class} real images of class {c} (it has {ref_counts[c]})")
    return sizes


def split_halves(labels: np.ndarray, sizes: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint row indices (a, b), each with sizes[c] random rows of class c."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c, n in enumerate(sizes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a.append(idx[:n])
        b.append(idx[n : 2 * n])
    return np.concatenate(a), np.concatenate(b)


def split_half_floor(
    ref_feats: np.ndarray,
    ref_labels: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_gen: int | Sequence[int] | None = None,
    seed: int = 0,
    *,
    num_classes: int | None = None,
) -> float:
    """``metric_fn(half_a, half_b)`` on two disjoint class-stratified halves of the reference.

    ``half_a`` plays the generated set (same size as it, see the module docstring for
    ``n_gen``), ``half_b`` the reference. ``num_classes`` defaults to max(label) + 1.
    """
    x = check_feats("ref_feats", ref_feats)
    y = check_labels("ref_labels", ref_labels, len(x), num_classes)
    k = int(y.max()) + 1 if num_classes is None else num_classes
    sizes = half_sizes(n_gen, np.bincount(y, minlength=k))
    a, b = split_halves(y, sizes, seed)
    return float(metric_fn(x[a], x[b]))


def per_class_floor(
    ref_feats: np.ndarray,
    ref_labels: np.ndarray,
    num_classes: int,
    n_per_class: int | Sequence[int] | None = None,
    seed: int = 0,
) -> list[float]:
    """Per-class FID between two disjoint halves of each class's reference rows.

    ``n_per_class``: rows of each class per half -- an int (same for every class), a sequence
    of K ints (pass the generated per-class counts to match per-class FID), or None (half of
    each class). Every class needs at least 2 rows per half, i.e. at least 4 real images.
    """
    x = check_feats("ref_feats", ref_feats)
    y = check_labels("ref_labels", ref_labels, len(x), num_classes)
    counts = np.bincount(y, minlength=num_classes)  # (K,)
    if n_per_class is not None and np.ndim(n_per_class) == 0:  # an int means per class here
        n_per_class = np.full(num_classes, int(n_per_class))
    sizes = half_sizes(n_per_class, counts, min_per_class=2)
    a, b = split_halves(y, sizes, seed)
    stats = ReferenceStats.from_features(x[b], y[b], num_classes, overall=False)
    return stats.per_class_fid(x[a], y[a])
