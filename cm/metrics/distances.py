"""Distribution distances and accuracies on precomputed feature arrays (pure numpy).

Features are float arrays of shape (N, D), typically the penultimate layer of the local
:class:`~cm.metrics.feature_net.FeatureNet`; labels are integer arrays of shape (N,).
FID and KID delegate to clean-fid so the numbers match the reference implementation; per-class
and group FID use the equivalent, ``sqrtm``-free path of :mod:`cm.metrics.frechet` (tested equal).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
from cleanfid import fid as _cleanfid
from scipy.linalg import LinAlgWarning


def _check_feats(name: str, x: np.ndarray, min_rows: int = 2) -> np.ndarray:
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


def _check_pair(a: np.ndarray, b: np.ndarray, names=("feats_a", "feats_b")) -> tuple[np.ndarray, np.ndarray]:
    a, b = _check_feats(names[0], a), _check_feats(names[1], b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} differ in feature dim: {a.shape[1]} vs {b.shape[1]}")
    return a, b


def _check_labels(name: str, labels: np.ndarray, n: int, num_classes: int | None = None) -> np.ndarray:
    """Validate integer labels of shape (n,), optionally in [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {labels.shape}")
    if n and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {labels.dtype}")
    if num_classes is not None and n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} has values outside [0, {num_classes})")
    return labels.astype(np.int64, copy=False)


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (clean-fid)."""
    a, b = _check_pair(feats_a, feats_b)
    with warnings.catch_warnings():
        # clean-fid passes sqrtm(disp=False), deprecated in scipy >= 1.16; result is unaffected.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Singular covariances are routine here (dead ReLU units, N < D per class); sqrtm's
        # Schur method still returns an accurate trace for PSD products (checked in the tests).
        warnings.simplefilter("ignore", LinAlgWarning)
        return float(np.real(_cleanfid.fid_from_feats(a, b)))


def kid(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """Kernel Inception Distance (unbiased MMD^2, cubic polynomial kernel) via clean-fid.

    clean-fid draws its subsets from numpy's *global* RNG; we seed it with ``seed`` and
    restore the previous global state afterwards, so results are reproducible and callers'
    random streams are untouched (not thread-safe w.r.t. other users of ``np.random``).
    """
    a, b = _check_pair(feats_a, feats_b)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(_cleanfid.kernel_distance(a, b, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


def _rows_of(feats: np.ndarray, labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    return feats[np.isin(labels, list(classes))]


def per_class_fid(
    gen_feats: np.ndarray,
    gen_labels: np.ndarray,
    ref_feats: np.ndarray,
    ref_labels: np.ndarray,
    num_classes: int,
) -> list[float]:
    """FID between generated and reference features of each class c in [0, num_classes).

    Computed through :class:`~cm.metrics.frechet.ReferenceStats` (eigendecompositions instead
    of one ``sqrtm`` per class); equal to :func:`fid` on each class's rows up to round-off.
    """
    from cm.metrics.frechet import ReferenceStats  # lazy: frechet imports this module's checks

    gen, ref = _check_pair(gen_feats, ref_feats, ("gen_feats", "ref_feats"))
    gl = _check_labels("gen_labels", gen_labels, len(gen), num_classes)
    rl = _check_labels("ref_labels", ref_labels, len(ref), num_classes)
    gen_counts = np.bincount(gl, minlength=num_classes)
    ref_counts = np.bincount(rl, minlength=num_classes)
    for c in range(num_classes):  # check all classes before any work
        if gen_counts[c] < 2 or ref_counts[c] < 2:
            raise ValueError(
                f"class {c} has {gen_counts[c]} generated and {ref_counts[c]} reference samples; "
                "FID needs at least 2 on each side"
            )
    stats = ReferenceStats.from_features(ref, rl, num_classes, overall=False)
    return stats.per_class_fid(gen, gl)


def group_fid(
    gen_feats: np.ndarray,
    gen_labels: np.ndarray,
    ref_feats: np.ndarray,
    ref_labels: np.ndarray,
    groups: Mapping[str, list[int]],
) -> dict[str, float]:
    """FID restricted to the union of each group's classes, e.g. {"many": [...], "few": [...]}.

    Computed with :class:`~cm.metrics.frechet.GaussianStats` (no ``sqrtm``); equal to :func:`fid`
    on the group's rows up to round-off.
    """
    from cm.metrics.frechet import GaussianStats  # lazy: frechet imports this module's checks

    gen, ref = _check_pair(gen_feats, ref_feats, ("gen_feats", "ref_feats"))
    gl = _check_labels("gen_labels", gen_labels, len(gen))
    rl = _check_labels("ref_labels", ref_labels, len(ref))
    out = {}
    for name, classes in groups.items():
        g, r = _rows_of(gen, gl, classes), _rows_of(ref, rl, classes)
        if len(g) < 2 or len(r) < 2:
            raise ValueError(
                f"group {name!r} (classes {list(classes)}) has {len(g)} generated and {len(r)} "
                "reference samples; FID needs at least 2 on each side"
            )
        out[name] = GaussianStats.from_rows(r).fid_to(g)
    return out


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    """Fraction of samples of each true class c whose prediction equals c (NaN if class c is absent)."""
    labels = _check_labels("labels", labels, np.size(labels), num_classes)
    pred = _check_labels("pred", pred, len(labels))
    correct = np.bincount(labels, weights=(pred == labels), minlength=num_classes)  # (K,)
    total = np.bincount(labels, minlength=num_classes)  # (K,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(x) for x in correct / total]
