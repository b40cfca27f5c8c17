"""Distances on feature arrays, checked against closed forms and independent implementations."""

import numpy as np
import pytest

from cm.metrics.distances import fid, group_fid, kid, per_class_accuracy, per_class_fid
from tests.conftest import singular_relu_features


def _sqrtm_psd(s):
    """Symmetric PSD square root via eigh (independent of the sqrtm clean-fid uses)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(w.clip(0))) @ v.T


def _fid_closed_form(a, b):
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) on empirical moments.

    Tr((S1 S2)^{1/2}) = Tr((R S2 R)^{1/2}) with R = S1^{1/2}, whose argument is symmetric PSD.
    """
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = _sqrtm_psd(s1)
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(r @ s2 @ r).clip(0)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _mmd2_unbiased(x, y):
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, written out term by term."""
    d, m = x.shape[1], len(x)
    k = lambda p, q: (p @ q.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = ~np.eye(m, dtype=bool)
    return kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean()


@pytest.fixture
def gaussians():
    rng = np.random.default_rng(0)
    d = 6
    l1, l2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    a = rng.normal(size=(1500, d)) @ l1 + rng.normal(size=d)
    b = rng.normal(size=(1200, d)) @ l2 + rng.normal(size=d)
    return a, b


def test_fid_matches_closed_form(gaussians):
    a, b = gaussians
    assert fid(a, b) == pytest.approx(_fid_closed_form(a, b), rel=1e-6)
    assert isinstance(fid(a, b), float)


def test_fid_singular_covariances_match_closed_form():
    a, b = singular_relu_features()
    assert fid(a, b) == pytest.approx(_fid_closed_form(a, b), rel=1e-6)


def test_fid_identity_and_shift(gaussians):
    a, _ = gaussians
    assert abs(fid(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))
    shift = np.linspace(-1, 2, a.shape[1])
    assert fid(a, a + shift) == pytest.approx(np.sum(shift**2), rel=1e-6)


def test_kid_matches_unbiased_mmd(gaussians):
    a, b = gaussians
    a, b = a[:500], b[:500]
    # One subset covering all rows: the estimate is permutation-invariant, hence exact.
    assert kid(a, b, num_subsets=1, max_subset_size=10_000) == pytest.approx(_mmd2_unbiased(b, a), rel=1e-9)


def test_kid_same_distribution_near_zero_and_deterministic():
    rng = np.random.default_rng(2)
    a, a2 = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    far = kid(a, a2 + 0.5, num_subsets=20, max_subset_size=300)
    near = kid(a, a2, num_subsets=20, max_subset_size=300)
    assert abs(near) < 0.05 * far
    state = np.random.get_state()
    assert kid(a, a2, num_subsets=20, max_subset_size=300) == near  # seeded
    assert kid(a, a2, num_subsets=20, max_subset_size=300, seed=1) != near
    np.testing.assert_array_equal(np.random.get_state()[1], state[1])  # global RNG restored


@pytest.fixture
def labelled():
    rng = np.random.default_rng(3)
    gl, rl = np.repeat(np.arange(3), [20, 30, 40]), np.repeat(np.arange(3), [50, 25, 35])
    gen = rng.normal(size=(len(gl), 5)) + gl[:, None]
    ref = rng.normal(size=(len(rl), 5)) + 1.1 * rl[:, None]
    perm_g, perm_r = rng.permutation(len(gl)), rng.permutation(len(rl))  # labels need not be sorted
    return gen[perm_g], gl[perm_g], ref[perm_r], rl[perm_r]


def test_per_class_fid_equals_fid_on_class_rows(labelled):
    gen, gl, ref, rl = labelled
    got = per_class_fid(gen, gl, ref, rl, 3)
    assert got == pytest.approx([_fid_closed_form(gen[gl == c], ref[rl == c]) for c in range(3)], rel=1e-6)


def test_per_class_fid_too_few_samples(labelled):
    gen, gl, ref, rl = labelled
    gl = gl.copy()
    gl[gl == 1] = 0
    gl[np.flatnonzero(gl == 0)[0]] = 1  # class 1 now has a single generated sample
    with pytest.raises(ValueError, match=r"class 1 has 1 generated and 25 reference"):
        per_class_fid(gen, gl, ref, rl, 3)
    with pytest.raises(ValueError, match=r"class 3 has 0 generated and 0 reference"):
        per_class_fid(*labelled, 4)


def test_group_fid(labelled):
    gen, gl, ref, rl = labelled
    per_class = per_class_fid(gen, gl, ref, rl, 3)
    got = group_fid(gen, gl, ref, rl, {"few": [2], "many": [0, 1]})
    assert got["few"] == pytest.approx(per_class[2], rel=1e-12)
    union = lambda x, lab: x[(lab == 0) | (lab == 1)]  # noqa: E731
    assert got["many"] == pytest.approx(_fid_closed_form(union(gen, gl), union(ref, rl)), rel=1e-6)
    with pytest.raises(ValueError, match="group 'empty'"):
        group_fid(gen, gl, ref, rl, {"empty": [7]})


def test_per_class_accuracy():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 1, 0, 1, 1, 0, 2, 1, 2])
    got = per_class_accuracy(pred, labels, 4)
    assert got[:3] == pytest.approx([2 / 3, 1.0, 0.5])
    assert np.isnan(got[3])  # class 3 absent


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_names_array(bad):
    a = np.random.default_rng(0).normal(size=(10, 3))
    b = a.copy()
    b[4, 1] = bad
    with pytest.raises(ValueError, match="feats_b contains NaN"):
        fid(a, b)
    with pytest.raises(ValueError, match="feats_a contains NaN"):
        kid(b, a)


def test_shape_checks():
    a = np.zeros((10, 3))
    with pytest.raises(ValueError, match="feature dim"):
        fid(a, np.zeros((10, 4)))
    with pytest.raises(ValueError, match="2-D"):
        fid(a, np.zeros(10))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fid(a, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="gen_labels must have shape"):
        per_class_fid(a, np.zeros(9, int), a, np.zeros(10, int), 1)
