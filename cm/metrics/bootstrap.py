"""How much FID, KID and the group FIDs of one generated set would move on another set of the same
size: a bootstrap over the generated samples, the real reference held fixed.

Resampling is stratified by class: the sample stage draws a fixed number of images per class, so
each replicate redraws, with replacement, as many rows of every class as the set holds.

FID (overall and per class group) is recomputed exactly on every replicate from the weighted mean
and covariance of the generated rows, against the reference statistics (`GaussianStats`), at the
cost of one (r, r) eigenvalue problem per replicate. FID is biased upward by finite samples, and a
replicate repeats about a third of its rows, so its covariance is noisier and its FID larger than
a fresh set's would be: uncorrected percentiles sit above the estimate and can exclude it. The
interval is therefore the percentile interval shifted by the bootstrap's own bias estimate
(mean of the replicates minus the estimate), i.e. centred where a fresh set's FID would fall.

KID is an unbiased U-statistic (clean-fid's subsets of `kid_subset_size`); recomputing it per
replicate costs `kid_subsets` x 3 kernel matrices each. Its replicates are its first-order
(Hoeffding) projection resampled: KID* = KID + mean_i (w_i - 1) psi_i with psi_i the influence of
generated row i, 2 (mean_j k(x_i, x_j) - mean_j k(x_i, y_j)) centred, exact to first order in 1/n.
Replicates have mean KID, so no bias correction is needed.
"""

from __future__ import annotations

import numpy as np

from cm.metrics.frechet import GaussianStats

LEVEL = 0.95


def resample_counts(labels: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """(replicates, n) multiplicities: each replicate redraws every class's rows with replacement,
    as many as the class has (so each row of a replicate sums to n, each class to its count)."""
    labels = np.asarray(labels)
    n = len(labels)
    order = np.argsort(labels, kind="stable")  # rows grouped by class
    _, first, size = np.unique(labels[order], return_index=True, return_counts=True)
    start, width = np.repeat(first, size), np.repeat(size, size)  # per sorted position: its class's span
    draws = order[start + (np.random.default_rng(seed).random((replicates, n)) * width).astype(np.int64)]
    flat = draws + n * np.arange(replicates)[:, None]
    return np.bincount(flat.ravel(), minlength=replicates * n).reshape(replicates, n)


def fid_replicates(ref: GaussianStats, gen: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """FID against `ref` of every replicate, a row of `counts` (multiplicities of gen's (n, D) rows):
    `GaussianStats.fid_to` on the set each row describes, from weighted moments of the rows."""
    x = gen - ref.mean  # centred on the reference: the mean shift is then w @ x / n
    p = x @ ref.factor.astype(np.float64, copy=False)  # (n, r): A^T S_g A is the covariance of p
    norms = np.einsum("ij,ij->i", x, x)
    n = int(counts[0].sum())
    out = np.empty(len(counts))
    for k, w in enumerate(counts.astype(np.float64)):
        shift, p_mean = w @ x / n, w @ p / n
        trace = (w @ norms - n * shift @ shift) / (n - 1)
        if len(p) < p.shape[1]:  # fewer rows than the factor's rank: the (n, n) Gram matrix, same spectrum
            q = np.sqrt(w)[:, None] * (p - p_mean)
            small = q @ q.T / (n - 1)
        else:
            small = (p.T @ (p * w[:, None]) - n * np.outer(p_mean, p_mean)) / (n - 1)
        root_trace = np.sqrt(np.linalg.eigvalsh(small).clip(0)).sum()
        out[k] = shift @ shift + ref.trace + trace - 2 * root_trace
    return out


def _kernel_means(x: np.ndarray, y: np.ndarray, exclude_self: bool, chunk: int = 2048) -> np.ndarray:
    """mean_j k(x_i, y_j) for every row of x, clean-fid's kernel k(a, b) = (a.b / D + 1)^3; with
    exclude_self (y is x), the j = i term left out."""
    d = x.shape[1]
    out = np.empty(len(x))
    for start in range(0, len(x), chunk):
        k = (x[start:start + chunk] @ y.T / d + 1) ** 3
        out[start:start + chunk] = k.sum(1)
    if exclude_self:
        out = (out - (np.einsum("ij,ij->i", x, x) / d + 1) ** 3) / (len(y) - 1)
    else:
        out /= len(y)
    return out


def kid_influence(gen: np.ndarray, ref: np.ndarray, max_rows: int = 5000, seed: int = 0) -> np.ndarray:
    """psi_i, the first-order influence of each generated row on the unbiased MMD^2 (mean 0). The
    kernel means run over at most `max_rows` rows of each set (a seeded random subset beyond that:
    their error is far below the spread they describe)."""
    rng = np.random.default_rng(seed)
    gen_cols = gen if len(gen) <= max_rows else gen[rng.choice(len(gen), max_rows, replace=False)]
    ref_cols = ref if len(ref) <= max_rows else ref[rng.choice(len(ref), max_rows, replace=False)]
    within = _kernel_means(gen, gen, exclude_self=True) if gen_cols is gen else _kernel_means(gen, gen_cols, False)
    psi = 2 * (within - _kernel_means(gen, ref_cols, exclude_self=False))
    return psi - psi.mean()


def interval(estimate: float, replicates: np.ndarray, correct_bias: bool) -> dict:
    """Standard error, the 95% percentile interval (shifted by the bootstrap's bias when
    correct_bias) and that bias."""
    bias = float(replicates.mean() - estimate) if correct_bias else 0.0
    low, high = np.quantile(replicates, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]) - bias
    return {"se": float(replicates.std(ddof=1)), "lo": float(low), "hi": float(high), "bias": bias}


def bootstrap_intervals(*, gen: np.ndarray, labels: np.ndarray, ref: np.ndarray, ref_stats, splits: dict,
                        estimates: dict, replicates: int, seed: int) -> dict:
    """{metric: {se, lo, hi, bias}} for fid, kid and fid_<group> of every split, from `replicates`
    stratified resamplings of the generated rows drawn with `seed`; `estimates` holds the metrics
    of the set itself (the intervals' centre)."""
    counts = resample_counts(labels, replicates, seed)
    out = {"fid": interval(estimates["fid"], fid_replicates(ref_stats.stats(None), gen, counts), True)}
    for name, classes in splits.items():
        rows = np.isin(labels, classes)
        out[f"fid_{name}"] = interval(estimates[f"fid_{name}"],
                                      fid_replicates(ref_stats.stats(classes), gen[rows], counts[:, rows]), True)
    psi = kid_influence(gen, ref, seed=seed)
    out["kid"] = interval(estimates["kid"], estimates["kid"] + counts @ psi / len(gen), False)
    return out
