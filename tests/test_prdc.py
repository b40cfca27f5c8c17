"""Improved precision/recall against a brute-force transcription of the definition."""

import numpy as np
import pytest

from cm.metrics.prdc import precision_recall


def _brute(real, gen, k):
    """Kynkäänniemi et al. 2019 by loops over full distance matrices."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]  # k-th nearest other sample

    cross = np.linalg.norm(gen[:, None] - real[None], axis=-1)  # (M, N)
    rr, gr = radii(real), radii(gen)
    precision = np.mean([np.any(cross[j] <= rr) for j in range(len(gen))])
    recall = np.mean([np.any(cross[:, i] <= gr) for i in range(len(real))])
    return precision, recall


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("batch_size", [7, 1000])
def test_matches_brute_force(k, batch_size):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(120, 6))
    gen = rng.normal(size=(90, 6)) * 0.8 + 0.7  # partly overlapping
    got = precision_recall(real, gen, k=k, batch_size=batch_size)
    p, r = _brute(real, gen, k)
    assert got == {"precision": pytest.approx(p, abs=1e-12), "recall": pytest.approx(r, abs=1e-12)}
    assert 0 < p < 1 and 0 < r < 1  # a non-trivial case


def test_k_changes_the_answer():
    rng = np.random.default_rng(0)
    real, gen = rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 1.0
    small, large = precision_recall(real, gen, k=1), precision_recall(real, gen, k=20)
    # Larger k -> larger balls -> both fractions can only grow.
    assert large["precision"] >= small["precision"] and large["recall"] >= small["recall"]
    assert large != small


def test_identical_and_far_apart():
    x = np.random.default_rng(1).normal(size=(50, 5))
    assert precision_recall(x, x.copy(), k=3) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(x, x + 1e3, k=3) == {"precision": 0.0, "recall": 0.0}


def test_errors():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="need at least k\\+1 = 6"):
        precision_recall(x, x, k=5)
    with pytest.raises(ValueError, match="feature dim"):
        precision_recall(x, np.zeros((5, 4)), k=2)
    with pytest.raises(ValueError, match="gen_feats contains NaN"):
        precision_recall(x, np.full((5, 3), np.nan), k=2)
