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

from cm.metrics.checks import check_labels, check_pair
from cm.metrics.frechet import GaussianStats, ReferenceStats


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (clean-fid)."""
    a, b = check_pair(feats_a, feats_b)
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
    a, b = check_pair(feats_a, feats_b)
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
    gen, ref = check_pair(gen_feats, ref_feats, ("gen_feats", "ref_feats"))
    gl = check_labels("gen_labels", gen_labels, len(gen), num_classes)
    rl = check_labels("ref_labels", ref_labels, len(ref), num_classes)
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
    gen, ref = check_pair(gen_feats, ref_feats, ("gen_feats", "ref_feats"))
    gl = check_labels("gen_labels", gen_labels, len(gen))
    rl = check_labels("ref_labels", ref_labels, len(ref))
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
    labels = check_labels("labels", labels, np.size(labels), num_classes)
    pred = check_labels("pred", pred, len(labels))
    correct = np.bincount(labels, weights=(pred == labels), minlength=num_classes)  # (K,)
    total = np.bincount(labels, minlength=num_classes)  # (K,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(x) for x in correct / total]
