"""The sqrtm-free Fréchet distance, checked against the plain formula, clean-fid and raw rows."""

import warnings

import numpy as np
import pytest
from cleanfid.fid import fid_from_feats
from scipy import linalg

from cm import io
from cm.metrics import distances
from cm.metrics.frechet import GaussianStats, ReferenceStats, fast_fid
from tests.conftest import singular_relu_features


def _fid_sqrtm(a, b):
    """Textbook FID with scipy's general sqrtm of the (non-symmetric) product."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LinAlgWarning on singular products
        covmean = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _clean_fid(a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm(disp=False) deprecation inside clean-fid
        return float(np.real(fid_from_feats(a, b)))


def _sets(rng, n_a, n_b, d, shift=0.3):
    la, lb = rng.normal(size=(d, d)) / np.sqrt(d), rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n_a, d)) @ la, rng.normal(size=(n_b, d)) @ lb + shift


@pytest.mark.parametrize("n_a,n_b,d", [(400, 300, 16), (30, 50, 64), (50, 30, 64), (500, 20, 24), (20, 500, 24)])
def test_matches_sqrtm_and_clean_fid(n_a, n_b, d):
    # Both the full-rank (eigh) and the fewer-rows-than-dims (SVD) routes, on either side.
    a, b = _sets(np.random.default_rng(n_a + n_b + d), n_a, n_b, d)
    got = fast_fid(a, b)
    assert got == pytest.approx(_fid_sqrtm(a, b), rel=1e-4)
    assert got == pytest.approx(_clean_fid(a, b), rel=1e-4)
    if n_a > d and n_b > d:  # well conditioned: agreement is near machine precision
        assert got == pytest.approx(_fid_sqrtm(a, b), rel=1e-8)


@pytest.mark.parametrize("n_ref", [8, 200])  # factor = centred rows, or V sqrt(lam) from eigh
def test_both_trace_routes_agree(n_ref):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n_ref, 12))
    ref = GaussianStats.from_rows(x)
    np.testing.assert_allclose(ref.cov(), np.cov(x, rowvar=False), atol=1e-12)
    gen = rng.normal(size=(300, 12)) * 1.3
    a = ref.factor
    via_eig = np.sqrt(np.linalg.eigvalsh(a.T @ np.cov(gen, rowvar=False) @ a).clip(0)).sum()
    via_svd = np.linalg.svd((gen - gen.mean(0)) @ a / np.sqrt(len(gen) - 1), compute_uv=False).sum()
    r = ref.root()  # the symmetric root: Tr((R S_g R)^{1/2}) is the quantity both routes compute
    via_root = np.sqrt(np.linalg.eigvalsh(r @ np.cov(gen, rowvar=False) @ r).clip(0)).sum()
    np.testing.assert_allclose(r @ r, np.cov(x, rowvar=False), atol=1e-10)
    np.testing.assert_allclose(r, r.T, atol=1e-14)
    for route in (via_svd, via_root, ref.trace_sqrt_product(gen)):
        assert route == pytest.approx(via_eig, rel=1e-7)
    few = gen[:5]  # few generated rows: the SVD route
    want = np.sqrt(np.linalg.eigvalsh(r @ np.cov(few, rowvar=False) @ r).clip(0)).sum()
    assert ref.trace_sqrt_product(few) == pytest.approx(want, rel=1e-6)


def test_singular_covariances():
    a, b = singular_relu_features()
    assert fast_fid(a, b) == pytest.approx(_fid_sqrtm(a, b), rel=1e-6)
    assert fast_fid(a, b) == pytest.approx(distances.fid(a, b), rel=1e-6)
    assert abs(fast_fid(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))


def test_stats_match_numpy():
    rng = np.random.default_rng(2)
    for n in (5, 40):  # SVD route and eigh route
        x = rng.normal(size=(n, 20)) @ rng.normal(size=(20, 20))
        g = GaussianStats.from_rows(x)
        np.testing.assert_allclose(g.mean, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(g.cov(), np.cov(x, rowvar=False), atol=1e-10)
        assert g.trace == pytest.approx(np.trace(np.cov(x, rowvar=False)), rel=1e-12)


@pytest.fixture
def labelled():
    rng = np.random.default_rng(3)
    k, d = 4, 10
    rl, gl = np.repeat(np.arange(k), [40, 8, 25, 60]), np.repeat(np.arange(k), [30, 12, 5, 50])
    ref = rng.normal(size=(len(rl), d)) + rl[:, None] * 0.5
    gen = rng.normal(size=(len(gl), d)) * 1.2 + gl[:, None] * 0.6
    pr, pg = rng.permutation(len(rl)), rng.permutation(len(gl))  # labels need not be sorted
    return gen[pg], gl[pg], ref[pr], rl[pr], k


def test_per_class_equals_fid_on_class_rows(labelled):
    gen, gl, ref, rl, k = labelled
    stats = ReferenceStats.from_features(ref, rl, k)
    got = stats.per_class_fid(gen, gl)
    want = [distances.fid(gen[gl == c], ref[rl == c]) for c in range(k)]
    assert got == pytest.approx(want, rel=1e-6)
    assert distances.per_class_fid(gen, gl, ref, rl, k) == pytest.approx(want, rel=1e-6)
    assert stats.fid_to(gen) == pytest.approx(distances.fid(gen, ref), rel=1e-8)


def test_group_stats_pooled_equal_raw_rows(labelled):
    gen, gl, ref, rl, k = labelled
    stats = ReferenceStats.from_features(ref, rl, k, overall=False)
    for group in ([0, 2], [1, 2, 3], [1, 3], list(range(k))):
        rows = ref[np.isin(rl, group)]
        pooled = stats.stats(group)
        assert pooled.count == len(rows)
        np.testing.assert_allclose(pooled.mean, rows.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(pooled.cov(), np.cov(rows, rowvar=False), rtol=1e-9, atol=1e-10)
        assert pooled.trace == pytest.approx(np.trace(np.cov(rows, rowvar=False)), rel=1e-10)
        g = gen[np.isin(gl, group)]
        assert stats.fid_to(g, group) == pytest.approx(distances.fid(g, rows), rel=1e-6)
    assert stats.stats([2, 0, 2]) is stats.stats([0, 2])  # cached, order and duplicates ignored
    # Low-rank pooling (rows < dims) takes the SVD route.
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 50)), np.repeat([0, 1, 2], 4)
    small = ReferenceStats.from_features(x, y, 3)
    np.testing.assert_allclose(small.stats([0, 1, 2]).cov(), np.cov(x, rowvar=False), atol=1e-12)
    np.testing.assert_allclose(small.stats(None).cov(), np.cov(x, rowvar=False), atol=1e-12)


def test_save_load_round_trip(labelled, tmp_path):
    gen, gl, ref, rl, k = labelled
    stats = ReferenceStats.from_features(ref, rl, k, extractor="local", dataset="digits")
    path = tmp_path / "ref_stats.npz"
    stats.save(path)
    back = ReferenceStats.load(path, extractor="local", dataset="digits")
    assert (back.extractor, back.dataset, back.counts) == ("local", "digits", stats.counts)
    assert back.per_class_fid(gen, gl) == stats.per_class_fid(gen, gl)
    assert back.fid_to(gen) == stats.fid_to(gen)
    assert back.fid_to(gen[np.isin(gl, [1, 2])], [1, 2]) == pytest.approx(
        stats.fid_to(gen[np.isin(gl, [1, 2])], [1, 2]), rel=1e-12)
    ReferenceStats.load(path)  # no expectation: accepted


def test_float32_eigenvectors_are_close(labelled):
    gen, gl, ref, rl, k = labelled
    full = ReferenceStats.from_features(ref, rl, k).per_class_fid(gen, gl)
    compact = ReferenceStats.from_features(ref, rl, k, dtype=np.float32)
    assert compact.classes[0].factor.dtype == np.float32
    assert compact.per_class_fid(gen, gl) == pytest.approx(full, rel=1e-5)


def test_load_metadata_mismatch_and_corrupt(labelled, tmp_path):
    _, _, ref, rl, k = labelled
    path = tmp_path / "ref_stats.npz"
    ReferenceStats.from_features(ref, rl, k, extractor="local", dataset="digits").save(path)
    with pytest.raises(io.CorruptFileError, match=r"ref_stats\.npz.*'local'.*'digits'.*'inception'.*'digits'"):
        ReferenceStats.load(path, extractor="inception", dataset="digits")
    with pytest.raises(io.CorruptFileError, match="'cifar10'"):
        ReferenceStats.load(path, dataset="cifar10")
    path.write_bytes(b"not an npz")
    with pytest.raises(io.CorruptFileError, match="ref_stats.npz"):
        ReferenceStats.load(path)
    io.save_npz(path, features=np.zeros((3, 2)))
    with pytest.raises(io.CorruptFileError, match="missing"):
        ReferenceStats.load(path)


def test_errors(labelled):
    gen, gl, ref, rl, k = labelled
    with pytest.raises(ValueError, match=r"class 4 has 0 reference samples.*at least 2"):
        ReferenceStats.from_features(ref, rl, k + 1)
    stats = ReferenceStats.from_features(ref, rl, k)
    gl2 = gl.copy()
    gl2[gl2 == 2] = 0
    gl2[np.flatnonzero(gl2 == 0)[0]] = 2  # class 2 now has one generated row
    with pytest.raises(ValueError, match=r"class 2 has 1 generated and 25 reference samples.*at least 2"):
        stats.per_class_fid(gen, gl2)
    bad = gen.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="gen_feats contains NaN"):
        stats.per_class_fid(bad, gl)
    bad_ref = ref.copy()
    bad_ref[0, 0] = np.inf
    with pytest.raises(ValueError, match="ref_feats contains NaN"):
        ReferenceStats.from_features(bad_ref, rl, k)
    with pytest.raises(ValueError, match="dim"):
        stats.fid_to(gen[:, :3])
    with pytest.raises(ValueError, match=r"classes \[1\] has 1 generated"):
        stats.fid_to(gen[:1], [1])
    with pytest.raises(ValueError, match="outside"):
        stats.stats([k])
