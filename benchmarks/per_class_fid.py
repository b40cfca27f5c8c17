"""Per-class FID cost: cached reference statistics (cm.metrics.frechet) vs one scipy sqrtm per class.

    python benchmarks/per_class_fid.py [--classes 100] [--dim 2048] [--rows 60] [--slow-classes 2]
                                       [--many-classes 1000] [--full-rank-classes 3] [--full-rank-rows 2500]

Synthetic Gaussian features, ``--rows`` generated and ``--rows`` reference rows per class.
Three regimes:

1. ``--classes`` classes with fewer rows than dims (the usual per-class case): reference build,
   per-class FID for every class, and the textbook path (np.cov + scipy.linalg.sqrtm, as
   clean-fid does) timed on ``--slow-classes`` classes and *extrapolated* to all of them;
2. ``--many-classes`` classes, fast path only (each class keeps a float64 covariance factor of
   (D, rows), its centred rows, so 1,000 x 2,048 fits in about 1 GB instead of 33 GB);
3. full-rank classes (more rows than dims): eigh per class at build, eigvalsh per FID;
   timed on ``--full-rank-classes`` classes and extrapolated.

Set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS to pin the thread count; the table shows what
numpy's BLAS used.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
import warnings

import numpy as np
from scipy import linalg

from cm.metrics.frechet import ReferenceStats


def synthetic(rng, classes: int, rows: int, dim: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(classes*rows, dim) features with class-dependent means and scales, labels (classes*rows,)."""
    labels = np.repeat(np.arange(classes), rows)
    centres = rng.standard_normal((classes, dim))  # (K, D)
    scales = 0.5 + rng.random(classes)  # (K,)
    feats = rng.standard_normal((len(labels), dim)) * scales[labels, None] + centres[labels] + shift
    return feats, labels


def fid_sqrtm(gen: np.ndarray, ref: np.ndarray) -> float:
    """The textbook / clean-fid computation: covariances, then sqrtm of their product."""
    mu1, mu2 = gen.mean(0), ref.mean(0)
    s1, s2 = np.cov(gen, rowvar=False), np.cov(ref, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LinAlgWarning on the singular products
        covmean = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def stats_bytes(stats: ReferenceStats) -> int:
    parts = stats.classes + ([stats.overall] if stats.overall is not None else [])
    return sum(g.factor.nbytes + g.mean.nbytes for g in parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=60, help="generated and reference rows per class")
    parser.add_argument("--slow-classes", type=int, default=2, help="classes timed on the sqrtm path")
    parser.add_argument("--many-classes", type=int, default=1000, help="0 to skip")
    parser.add_argument("--full-rank-classes", type=int, default=3, help="0 to skip")
    parser.add_argument("--full-rank-rows", type=int, default=2500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    k, d, n = args.classes, args.dim, args.rows
    rows = []  # (regime, step, seconds, note)

    # 1. Rank-deficient classes: fast path for all, sqrtm on a few.
    ref, rl = synthetic(rng, k, n, d, 0.0)
    gen, gl = synthetic(rng, k, n, d, 0.1)
    stats, t_build = timed(lambda: ReferenceStats.from_features(ref, rl, k, overall=False))
    _, t_overall = timed(lambda: stats.stats(None))
    fast, t_fast = timed(lambda: stats.per_class_fid(gen, gl))
    rows += [(f"{k} cls x {d}-d, {n}+{n} rows", "reference stats build (per class)", t_build, "one-off"),
             ("", "overall stats (pooled from classes)", t_overall, "one-off"),
             ("", f"per-class FID, fast, all {k} classes", t_fast, "measured")]
    slow_t, rel = [], []
    for c in range(min(args.slow_classes, k)):
        value, t = timed(lambda: fid_sqrtm(gen[gl == c], ref[rl == c]))
        slow_t.append(t)
        rel.append(abs(value - fast[c]) / abs(value))
    if slow_t:
        rows.append(("", f"per-class FID, sqrtm, all {k} classes", np.mean(slow_t) * k,
                     f"extrapolated from {len(slow_t)} classes ({np.mean(slow_t):.1f} s each); "
                     f"max rel diff to fast {max(rel):.1e}"))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ref_stats.npz")
        _, t_save = timed(lambda: stats.save(path))
        size = os.path.getsize(path)
        _, t_load = timed(lambda: ReferenceStats.load(path))
    rows += [("", "save (.npz, compressed)", t_save, f"{size / 2**20:.0f} MiB on disk"),
             ("", "load", t_load, "")]
    del ref, gen, stats

    # 2. Many classes, fast path only.
    if args.many_classes:
        m = args.many_classes
        ref, rl = synthetic(rng, m, n, d, 0.0)
        gen, gl = synthetic(rng, m, n, d, 0.1)
        stats, t_build = timed(lambda: ReferenceStats.from_features(ref, rl, m, overall=False))
        _, t_fast = timed(lambda: stats.per_class_fid(gen, gl))
        rows += [(f"{m} cls x {d}-d, {n}+{n} rows", "reference stats build (per class)", t_build,
                  f"float64 factors (D x {n}) per class: {stats_bytes(stats) / 2**30:.2f} GiB"),
                 ("", f"per-class FID, fast, all {m} classes", t_fast, "measured")]
        del ref, gen, stats

    # 3. Full-rank classes: more rows than dims.
    if args.full_rank_classes:
        f, nf = args.full_rank_classes, args.full_rank_rows
        ref, rl = synthetic(rng, f, nf, d, 0.0)
        gen, gl = synthetic(rng, f, nf, d, 0.1)
        stats, t_build = timed(lambda: ReferenceStats.from_features(ref, rl, f, overall=False))
        fast, t_fast = timed(lambda: stats.per_class_fid(gen, gl))
        value, t_slow = timed(lambda: fid_sqrtm(gen[gl == 0], ref[rl == 0]))
        per_cls = stats_bytes(stats) / f
        rows += [(f"{f} cls x {d}-d, {nf}+{nf} rows", "reference stats build (per class)", t_build,
                  f"{t_build / f:.1f} s/class -> {t_build / f * k:.0f} s for {k} classes (extrapolated); "
                  f"{per_cls / 2**20:.0f} MiB/class float64"),
                 ("", f"per-class FID, fast, {f} classes", t_fast,
                  f"{t_fast / f:.1f} s/class -> {t_fast / f * k:.0f} s for {k} classes (extrapolated)"),
                 ("", "per-class FID, sqrtm, 1 class", t_slow,
                  f"-> {t_slow * k:.0f} s for {k} classes (extrapolated); rel diff {abs(value - fast[0]) / value:.1e}")]

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, peak RSS {peak:.1f} GiB")
    print(f"| {'regime':<28} | {'step':<40} | {'seconds':>8} | note")
    print(f"|{'-' * 30}|{'-' * 42}|{'-' * 10}|------")
    for regime, step, sec, note in rows:
        print(f"| {regime:<28} | {step:<40} | {sec:>8.3f} | {note}")


if __name__ == "__main__":
    main()
