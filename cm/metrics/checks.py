"""The checks every metric makes on its inputs: (N, D) feature arrays and (N,) integer labels.

A bad input ends in one ValueError naming the argument, what it is and what was expected.
"""

from __future__ import annotations

import numpy as np


def check_feats(name: str, x: np.ndarray, min_rows: int = 2) -> np.ndarray:
    """Validate one (N, D) feature array and return it as float64."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_pair(a: np.ndarray, b: np.ndarray, names=("feats_a", "feats_b")) -> tuple[np.ndarray, np.ndarray]:
    """Validate two feature arrays of the same feature dim and return them as float64."""
    a, b = check_feats(names[0], a), check_feats(names[1], b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} differ in feature dim: {a.shape[1]} vs {b.shape[1]}")
    return a, b


def check_labels(name: str, labels: np.ndarray, n: int, num_classes: int | None = None) -> np.ndarray:
    """Validate integer labels of shape (n,), optionally in [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {labels.shape}")
    if n and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {labels.dtype}")
    if num_classes is not None and n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} has values outside [0, {num_classes})")
    return labels.astype(np.int64, copy=False)
