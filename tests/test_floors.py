"""Split-half noise floors: disjoint stratified halves, seeded, shrinking with size."""

import numpy as np
import pytest

from cm.metrics.floors import half_sizes, per_class_floor, split_half_floor
from cm.metrics.frechet import fast_fid


@pytest.fixture
def ref():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [600, 450, 500])
    feats = rng.normal(size=(len(labels), 6)) + labels[:, None]
    perm = rng.permutation(len(labels))
    return feats[perm], labels[perm]


def test_halves_are_disjoint_and_stratified(ref):
    feats, labels = ref
    tagged = np.column_stack([feats, np.arange(len(feats)), labels])  # row id and label ride along
    seen = {}

    def record(a, b):
        seen["a"], seen["b"] = a, b
        return 0.0

    split_half_floor(tagged, labels, record, n_gen=[10, 20, 30], seed=1)
    ids_a, ids_b = seen["a"][:, -2], seen["b"][:, -2]
    assert not set(ids_a) & set(ids_b) and len(set(ids_a)) == len(ids_a)
    for half in (seen["a"], seen["b"]):
        assert np.bincount(half[:, -1].astype(int), minlength=3).tolist() == [10, 20, 30]
    split_half_floor(tagged, labels, record, n_gen=155, seed=1)  # total, proportional to 600:450:500
    assert np.bincount(seen["a"][:, -1].astype(int)).tolist() == [60, 45, 50]


def test_floor_non_negative_shrinks_and_seeded(ref):
    feats, labels = ref
    small = [split_half_floor(feats, labels, fast_fid, n_gen=60, seed=s) for s in range(3)]
    large = [split_half_floor(feats, labels, fast_fid, n_gen=600, seed=s) for s in range(3)]
    assert min(small + large) >= 0
    assert np.mean(large) < 0.5 * np.mean(small)
    assert split_half_floor(feats, labels, fast_fid, n_gen=60, seed=0) == small[0]
    assert small[0] != small[1]


def test_per_class_floor(ref):
    feats, labels = ref
    small = per_class_floor(feats, labels, 3, n_per_class=15, seed=0)
    large = per_class_floor(feats, labels, 3, n_per_class=200, seed=0)
    assert len(small) == 3 and min(small + large) >= 0
    assert all(big < sm for big, sm in zip(large, small))
    assert per_class_floor(feats, labels, 3, n_per_class=15, seed=0) == small
    assert per_class_floor(feats, labels, 3, n_per_class=15, seed=1) != small
    assert len(per_class_floor(feats, labels, 3, n_per_class=[5, 6, 7])) == 3
    assert len(per_class_floor(feats, labels, 3)) == 3  # halves of every class


def test_too_few_real_images(ref):
    feats, labels = ref
    with pytest.raises(ValueError, match=r"class 1 has 450 real images; two disjoint halves of 300 each need 600"):
        per_class_floor(feats, labels, 3, n_per_class=300)
    with pytest.raises(ValueError, match=r"class 0 has 600 real images; two disjoint halves of 400 each need 800"):
        split_half_floor(feats, labels, fast_fid, n_gen=[400, 0, 0])
    with pytest.raises(ValueError, match=r"class 2 would get 1 rows per half.*at least 4 real images"):
        per_class_floor(feats, labels, 3, n_per_class=[2, 2, 1])
    with pytest.raises(ValueError, match="must be 3 non-negative ints"):
        half_sizes([1, 2], np.array([10, 10, 10]))
