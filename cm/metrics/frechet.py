"""Fréchet distance against cached reference statistics, cheap with many classes and many dims.

Each reference Gaussian keeps its count, mean, Tr(S) and a factor ``A`` (D, r) with
``S = A A^T``. For a generated set with covariance ``S_g``, and ``R = S^{1/2}``,

    Tr((S S_g)^{1/2}) = Tr((R S_g R)^{1/2}) = sum_i sqrt(eig_i(A^T S_g A)),

because ``R S_g R``, ``S_g^{1/2} S S_g^{1/2}`` and the small (r, r) matrix ``A^T S_g A`` share
their non-zero eigenvalues -- for *any* factor with ``A A^T = S``. Writing ``S_g = B B^T`` with
``B`` the centred generated rows over ``sqrt(n_g - 1)``, these are also the squared singular
values of ``C = B^T A`` (n_g, r). So no general ``sqrtm`` is needed: per pair we take either
``eigvalsh(A^T S_g A)`` (many generated rows) or the singular values of ``C`` (few rows, exact
to full precision), whichever is cheaper.

The factor is computed once per class:

- more rows than dims: ``A = V diag(sqrt(lam))`` from ``np.linalg.eigh(np.cov(x))`` with
  negative eigenvalues clipped at 0, i.e. the symmetric root ``R = V diag(sqrt(lam)) V^T``
  cached in factored form;
- at most as many rows as dims (the usual per-class case: 500 images, 2,048 Inception dims):
  ``A`` = the centred rows over ``sqrt(n - 1)``, exact and with no decomposition at all
  (a factor of D x n instead of two D x D matrices: 1,000 classes x 2,048 dims fit).

Covariances use ``np.cov(rowvar=False)`` (ddof=1), as clean-fid does. Everything is float64
unless the caller asks for float32 factors to halve the memory of very many classes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cm import io
from cm.metrics.checks import check_feats, check_labels

_FORMAT = "cm.ReferenceStats/1"


def _min_rows_error(what: str, n_gen: int, n_ref: int) -> ValueError:
    return ValueError(
        f"{what} has {n_gen} generated and {n_ref} reference samples; FID needs at least 2 on each "
        "side (a covariance needs 2 rows); generate and keep at least 2 images of every class, "
        "and far more for a stable estimate (per-class FID is biased upward when n is small)"
    )


def _factor_of_psd(s: np.ndarray) -> np.ndarray:
    """(D, D) symmetric PSD -> V diag(sqrt(lam)) (D, D) via eigh, negative eigenvalues clipped."""
    lam, v = np.linalg.eigh(s)
    return v * np.sqrt(lam.clip(0))


@dataclass(frozen=True)
class GaussianStats:
    """Sufficient statistics of one feature set: count, mean, Tr(S) and a factor with S = A A^T.

    Together, count, mean and factor are equivalent to (count, sum, sum of outer products),
    so groups can be pooled without the raw rows.
    """

    count: int
    mean: np.ndarray  # (D,) float64
    trace: float  # Tr(S)
    factor: np.ndarray  # (D, r) float64 (or float32 if built compact), S = A A^T

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_rows(cls, x: np.ndarray, dtype=np.float64) -> "GaussianStats":
        """Statistics of an (N, D) float64 array with N >= 2 (not re-validated here)."""
        n, d = x.shape
        mean = x.mean(0)  # (D,)
        xc = x - mean  # (N, D)
        trace = float(np.einsum("ij,ij->", xc, xc) / (n - 1))
        if n <= d:
            factor = xc.T / np.sqrt(n - 1)  # (D, N): S = xc^T xc / (n - 1) exactly
        else:
            factor = _factor_of_psd(np.cov(x, rowvar=False))  # (D, D)
        return cls(n, mean, trace, np.ascontiguousarray(factor, dtype=dtype))

    @classmethod
    def pooled(cls, parts: Sequence["GaussianStats"], dtype=np.float64) -> "GaussianStats":
        """Statistics of the union of the parts' rows, from the parts' statistics alone.

        Scatter of the union = sum_c (n_c - 1) S_c + sum_c n_c (mu_c - mu)(mu_c - mu)^T.
        """
        if len(parts) == 1:
            return parts[0]
        counts = np.array([p.count for p in parts], dtype=np.float64)  # (K,)
        n = int(counts.sum())
        means = np.stack([p.mean for p in parts])  # (K, D)
        mean = counts @ means / n  # (D,)
        dev = np.sqrt(counts)[:, None] * (means - mean)  # (K, D): between-class part
        trace = float((sum((p.count - 1) * p.trace for p in parts) + np.sum(dev**2)) / (n - 1))
        d, m = means.shape[1], sum(p.factor.shape[1] for p in parts) + len(parts)
        if m <= d:  # scatter = F F^T with F (D, m): keep F itself
            factor = np.concatenate(
                [p.factor * np.sqrt(p.count - 1) for p in parts] + [dev.T], axis=1) / np.sqrt(n - 1)
        else:  # accumulate the (D, D) scatter, then one eigh
            scatter = dev.T @ dev  # (D, D)
            for p in parts:
                a = p.factor.astype(np.float64, copy=False)
                scatter += (p.count - 1) * (a @ a.T)
            factor = _factor_of_psd(scatter / (n - 1))
        return cls(n, mean, trace, np.ascontiguousarray(factor, dtype=dtype))

    def cov(self) -> np.ndarray:
        """Covariance (D, D), rebuilt from the factor."""
        a = self.factor.astype(np.float64, copy=False)
        return a @ a.T

    def root(self) -> np.ndarray:
        """Symmetric square root S^{1/2} (D, D) (for inspection; FID never forms it)."""
        lam, v = np.linalg.eigh(self.cov())
        return (v * np.sqrt(lam.clip(0))) @ v.T

    def trace_sqrt_product(self, gen: np.ndarray) -> float:
        """Tr((S S_g)^{1/2}) for the covariance S_g of the (n_g, D) rows ``gen`` (n_g >= 2)."""
        n, d = gen.shape
        a = self.factor.astype(np.float64, copy=False)  # (D, r)
        r = a.shape[1]
        # Rough flop counts of the two routes; pick the cheaper one.
        cost_rows = n * d * r + 4 * n * r * min(n, r)
        cost_cov = n * d * d + d * d * r + d * r * r + 4 * r**3
        if cost_rows <= cost_cov:
            c = (gen - gen.mean(0)) @ a / np.sqrt(n - 1)  # (n_g, r)
            # Singular values of C are the square roots of eig(R S_g R), to full precision.
            return float(np.linalg.svd(c, compute_uv=False).sum())
        m = a.T @ np.cov(gen, rowvar=False) @ a  # (r, r), same non-zero spectrum as R S_g R
        return float(np.sqrt(np.linalg.eigvalsh(m).clip(0)).sum())

    def fid_to(self, gen: np.ndarray) -> float:
        """||mu - mu_g||^2 + Tr(S) + Tr(S_g) - 2 Tr((S S_g)^{1/2}) for (n_g, D) float64 rows."""
        mu_g = gen.mean(0)
        gc = gen - mu_g
        tr_g = np.einsum("ij,ij->", gc, gc) / (len(gen) - 1)
        diff = self.mean - mu_g
        return float(diff @ diff + self.trace + tr_g - 2 * self.trace_sqrt_product(gen))


def fast_fid(gen_feats: np.ndarray, ref_feats: np.ndarray) -> float:
    """FID between two (N, D) feature sets through :class:`GaussianStats` (no ``sqrtm``)."""
    gen = check_feats("gen_feats", gen_feats)
    ref = check_feats("ref_feats", ref_feats)
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"gen_feats and ref_feats differ in feature dim: {gen.shape[1]} vs {ref.shape[1]}")
    return GaussianStats.from_rows(ref).fid_to(gen)


class ReferenceStats:
    """Per-class and overall reference statistics, computed once and reused for every model.

    ``classes[c]`` describes the reference rows of class c; ``overall`` all rows. Pooled
    statistics of a group of classes are formed on demand from the per-class ones and cached.
    ``extractor`` and ``dataset`` record what the features are, so stale files are refused.
    """

    def __init__(self, classes: Sequence[GaussianStats], overall: GaussianStats | None = None, *,
                 extractor: str = "", dataset: str = ""):
        if not classes:
            raise ValueError("ReferenceStats needs at least one class")
        self.classes = list(classes)
        self.overall = overall
        self.extractor, self.dataset = str(extractor), str(dataset)
        self._pooled: dict[tuple[int, ...], GaussianStats] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def feature_dim(self) -> int:
        return self.classes[0].dim

    @property
    def counts(self) -> list[int]:
        return [g.count for g in self.classes]

    @classmethod
    def from_features(
        cls,
        feats: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        *,
        extractor: str = "",
        dataset: str = "",
        overall: bool = True,
        dtype=np.float64,
    ) -> "ReferenceStats":
        """Build statistics from reference features (N, D) and labels (N,) in [0, num_classes).

        Every class needs at least 2 rows. ``overall=False`` skips the all-rows statistics
        (they are then pooled from the classes if asked for). ``dtype=np.float32`` stores the
        covariance factors in single precision (half the memory; FID changes by ~1e-6 relative).
        """
        x = check_feats("ref_feats", feats, min_rows=0)
        y = check_labels("ref_labels", labels, len(x), num_classes)
        counts = np.bincount(y, minlength=num_classes)  # (K,)
        short = [c for c in range(num_classes) if counts[c] < 2]
        if short:
            c = short[0]
            raise ValueError(
                f"class {c} has {counts[c]} reference samples ({len(short)} class(es) have fewer than 2, "
                f"e.g. {short[:10]}); per-class FID needs at least 2 reference images of every class "
                f"in [0, {num_classes})"
            )
        order = np.argsort(y, kind="stable")  # group rows by class, keeping their order
        bounds = np.concatenate([[0], np.cumsum(counts)])
        per_class = [
            GaussianStats.from_rows(x[order[bounds[c] : bounds[c + 1]]], dtype) for c in range(num_classes)
        ]
        whole = GaussianStats.from_rows(x, dtype) if overall else None
        return cls(per_class, whole, extractor=extractor, dataset=dataset)

    def stats(self, classes: Iterable[int] | None = None) -> GaussianStats:
        """Statistics of all rows (None) or of the union of ``classes`` (pooled, cached)."""
        if classes is None:
            if self.overall is None:
                self.overall = GaussianStats.pooled(self.classes)
            return self.overall
        key = tuple(sorted({int(c) for c in classes}))
        if not key:
            raise ValueError("classes is empty")
        bad = [c for c in key if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"classes {bad} outside [0, {self.num_classes})")
        if key not in self._pooled:
            self._pooled[key] = GaussianStats.pooled([self.classes[c] for c in key])
        return self._pooled[key]

    def _gen(self, gen_feats: np.ndarray) -> np.ndarray:
        g = check_feats("gen_feats", gen_feats, min_rows=0)
        if g.shape[1] != self.feature_dim:
            raise ValueError(f"gen_feats have dim {g.shape[1]}, reference statistics have {self.feature_dim}")
        return g

    def fid_to(self, gen_feats: np.ndarray, classes: Iterable[int] | None = None) -> float:
        """FID of generated rows (N, D) against all reference rows, or those of ``classes``.

        The caller passes only the generated rows that belong to ``classes``.
        """
        g = self._gen(gen_feats)
        ref = self.stats(classes)
        if len(g) < 2:
            what = "the generated set" if classes is None else f"classes {sorted(set(classes))}"
            raise _min_rows_error(what, len(g), ref.count)
        return ref.fid_to(g)

    def per_class_fid(self, gen_feats: np.ndarray, gen_labels: np.ndarray) -> list[float]:
        """FID of each class c in [0, num_classes): generated rows of c against reference rows of c."""
        g = self._gen(gen_feats)
        y = check_labels("gen_labels", gen_labels, len(g), self.num_classes)
        counts = np.bincount(y, minlength=self.num_classes)  # (K,)
        for c in range(self.num_classes):  # fail before any work
            if counts[c] < 2:
                raise _min_rows_error(f"class {c}", int(counts[c]), self.classes[c].count)
        return [self.classes[c].fid_to(g[y == c]) for c in range(self.num_classes)]

    # --- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz (atomically): counts, means, traces, covariance factors, overall, metadata."""
        overall = self.stats(None)
        io.save_npz(
            path,
            format=np.array(_FORMAT),
            extractor=np.array(self.extractor),
            dataset=np.array(self.dataset),
            counts=np.array(self.counts, dtype=np.int64),  # (K,)
            means=np.stack([g.mean for g in self.classes]),  # (K, D)
            traces=np.array([g.trace for g in self.classes]),  # (K,)
            ranks=np.array([g.factor.shape[1] for g in self.classes], dtype=np.int64),  # (K,)
            factors=np.concatenate([g.factor.T for g in self.classes]),  # (sum r, D): row = column of A
            overall_count=np.array(overall.count, dtype=np.int64),
            overall_mean=overall.mean,  # (D,)
            overall_trace=np.array(overall.trace),
            overall_factor=overall.factor.T,  # (r, D)
        )

    @classmethod
    def load(cls, path: str | os.PathLike, extractor: str | None = None,
             dataset: str | None = None) -> "ReferenceStats":
        """Read statistics written by :meth:`save`.

        Raises CorruptFileError naming ``path`` if the file is unreadable or inconsistent, or if
        its ``extractor``/``dataset`` differ from the expected ones (None = accept any).
        """
        a = io.load_npz(path, required=(
            "format", "extractor", "dataset", "counts", "means", "traces", "ranks", "factors",
            "overall_count", "overall_mean", "overall_trace", "overall_factor"))
        if str(a["format"]) != _FORMAT:
            raise io.CorruptFileError(f"{path}: format {str(a['format'])!r}, expected {_FORMAT!r}")
        stored = {"extractor": str(a["extractor"]), "dataset": str(a["dataset"])}
        expected = {"extractor": extractor, "dataset": dataset}
        if any(expected[k] is not None and str(expected[k]) != stored[k] for k in stored):
            raise io.CorruptFileError(
                f"{path}: reference statistics are for extractor {stored['extractor']!r} on dataset "
                f"{stored['dataset']!r}, but extractor {extractor!r} on dataset {dataset!r} was expected; "
                "recompute the reference statistics")
        counts, means, ranks = a["counts"], a["means"], a["ranks"]
        k = len(counts)
        d = means.shape[-1] if means.ndim == 2 else -1
        ok = (means.shape == (k, d) and a["traces"].shape == (k,) and ranks.shape == (k,)
              and a["factors"].shape == (int(ranks.sum()), d) and a["overall_mean"].shape == (d,)
              and a["overall_factor"].ndim == 2 and a["overall_factor"].shape[1] == d and k > 0)
        if not ok:
            raise io.CorruptFileError(f"{path}: inconsistent array shapes in reference statistics")
        off = np.concatenate([[0], np.cumsum(ranks)])
        classes = [
            GaussianStats(int(counts[c]), means[c], float(a["traces"][c]), a["factors"][off[c] : off[c + 1]].T)
            for c in range(k)
        ]
        overall = GaussianStats(int(a["overall_count"]), a["overall_mean"], float(a["overall_trace"]),
                                a["overall_factor"].T)
        return cls(classes, overall, **stored)
