"""Uncertainty of the numbers: the bootstrap of one generated set (cm/metrics/bootstrap.py) checked
against fresh sets drawn from a known distribution, and the report's intervals, paired differences
and seeds needed (cm/report/stats.py) against published t quantiles and simulated power."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cm.metrics.bootstrap import bootstrap_intervals, fid_replicates, kid_influence, resample_counts
from cm.metrics.frechet import GaussianStats, ReferenceStats
from cm.report.stats import paired, paired_rows, seeds_needed, t_interval
from cm.report.tables import quotable

D = 6


def gaussian_sets(rng, n_gen, classes=3):
    """Reference: N(0, I); generated: shifted and wider, so FID is well above its noise."""
    ref = rng.normal(size=(3000, D))
    gen = rng.normal(size=(n_gen, D)) * 1.15 + 0.2
    return ref, np.repeat(np.arange(classes), 1000), gen, np.arange(n_gen) % classes


def test_resampling_keeps_every_class_count():
    labels = np.array([0, 0, 0, 1, 2, 2, 1, 0])
    counts = resample_counts(labels, 50, seed=3)
    for c in (0, 1, 2):
        assert (counts[:, labels == c].sum(1) == (labels == c).sum()).all()
    assert (counts == resample_counts(labels, 50, seed=3)).all() and counts.std(0).min() > 0


def test_a_replicate_is_the_fid_of_the_set_it_describes():
    rng = np.random.default_rng(0)
    ref, _, gen, _ = gaussian_sets(rng, 40)
    stats = GaussianStats.from_rows(ref)
    counts = resample_counts(np.zeros(40, int), 3, seed=1)
    for w in counts:  # the expanded set, duplicates and all, through the plain formula
        expanded = np.repeat(gen, w, axis=0)
        assert fid_replicates(stats, gen, w[None])[0] == pytest.approx(stats.fid_to(expanded), rel=1e-7)
    few = GaussianStats.from_rows(ref[:5])  # factor of rank 5 < 40 rows, and 3 rows < rank: both routes
    assert fid_replicates(few, gen[:3], np.ones((1, 3), int))[0] == pytest.approx(few.fid_to(gen[:3]), rel=1e-7)


def test_fid_interval_covers_the_fid_of_fresh_sets():
    """Over independent generated sets, the bias-shifted interval covers the mean FID a set of this
    size gets (from 2,000 fresh sets) about 95% of the time; the plain percentile interval, which
    sits above the estimate, covers it far less often."""
    rng = np.random.default_rng(1)
    ref, ref_labels, _, _ = gaussian_sets(rng, 0)
    ref_stats = ReferenceStats.from_features(ref, ref_labels, 3)
    overall = ref_stats.stats(None)
    n = 150
    truth = np.mean([overall.fid_to(rng.normal(size=(n, D)) * 1.15 + 0.2) for _ in range(2000)])
    covered = raw_covered = 0
    trials = 60
    for _ in range(trials):
        _, _, gen, labels = gaussian_sets(rng, n)
        replicates = fid_replicates(overall, gen, resample_counts(labels, 200, seed=int(rng.integers(1e9))))
        estimate = overall.fid_to(gen)
        bias = replicates.mean() - estimate
        low, high = np.quantile(replicates, [0.025, 0.975])
        covered += low - bias <= truth <= high - bias
        raw_covered += low <= truth <= high
    assert covered / trials >= 0.85 and raw_covered < covered


def mmd2_unbiased(x, y):
    """The full-set unbiased MMD^2 of clean-fid's kernel, written out."""
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    n, m = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * k(x, y).mean())


def test_kid_spread_matches_fresh_sets():
    """The linearised replicates' standard deviation against the standard deviation of the unbiased
    MMD^2 over 400 fresh generated sets (reference fixed): within 20%."""
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(400, D))
    draw = lambda: rng.normal(size=(200, D)) * 1.15 + 0.2  # noqa: E731
    fresh_sd = np.std([mmd2_unbiased(draw(), ref) for _ in range(400)], ddof=1)
    gen = draw()
    psi = kid_influence(gen, ref)
    assert abs(psi.mean()) < 1e-12
    counts = resample_counts(np.zeros(len(gen), int), 2000, seed=0)
    assert np.std(counts @ psi / len(gen), ddof=1) == pytest.approx(fresh_sd, rel=0.2)


def test_intervals_of_every_bootstrapped_metric_hold_their_estimate():
    rng = np.random.default_rng(3)
    ref, ref_labels, gen, labels = gaussian_sets(rng, 300)
    ref_stats = ReferenceStats.from_features(ref, ref_labels, 3)
    splits = {"many": [0], "few": [1, 2]}
    estimates = {"fid": ref_stats.fid_to(gen), "kid": 0.05,
                 **{f"fid_{g}": ref_stats.fid_to(gen[np.isin(labels, c)], c) for g, c in splits.items()}}
    out = bootstrap_intervals(gen=gen, labels=labels, ref=ref, ref_stats=ref_stats, splits=splits,
                              estimates=estimates, replicates=100, seed=0)
    assert sorted(out) == ["fid", "fid_few", "fid_many", "kid"]
    for key, interval in out.items():
        assert interval["lo"] < estimates[key] < interval["hi"] and interval["se"] > 0
    assert out["kid"]["bias"] == 0 and out["fid"]["bias"] > 0  # FID's resampling bias is upward
    assert out["fid_many"]["se"] > out["fid"]["se"]  # a third of the rows: a wider spread


# ---------------------------------------------------------------------------------------- report statistics


def test_t_interval_uses_the_published_quantiles():
    # t(0.975) with 2 and 4 degrees of freedom: 4.303 and 2.776 in every table.
    for values, t in (([1.0, 2.0, 4.0], 4.303), ([0.5, 0.7, 0.2, 0.9, 0.4], 2.776)):
        half = t * statistics.stdev(values) / len(values) ** 0.5
        assert t_interval(values) == pytest.approx((statistics.mean(values) - half, statistics.mean(values) + half),
                                                   abs=1e-3)
    assert t_interval([1.0]) is None


def runs_of(method, values, se=None):
    return [{"method": method, "seed": s, "metrics": {"fid": v, **({"fid_se": se} if se else {})}}
            for s, v in enumerate(values)]


def test_paired_difference_seed_by_seed():
    base, other = runs_of("ddpm", [2.0, 3.0, 4.5]), runs_of("cm", [1.5, 2.0, 4.3])
    row = paired(base, other, "fid", resolve=0.1)
    diffs = [-0.5, -1.0, -0.2]
    half = 4.303 * statistics.stdev(diffs) / 3 ** 0.5
    assert row["difference"] == pytest.approx(statistics.mean(diffs))
    assert (row["lo"], row["hi"]) == pytest.approx((statistics.mean(diffs) - half, statistics.mean(diffs) + half),
                                                   abs=1e-3)
    assert row["resolved"] is False and row["resolve"] == pytest.approx(0.1 * statistics.mean([2.0, 3.0, 4.5]))
    assert quotable({**row, "comparison": "cm - ddpm"}) == (
        f"cm - ddpm, fid: {statistics.mean(diffs):+.2f} [{row['lo']:+.2f}, {row['hi']:+.2f}], 3 seeds")
    # A constant improvement: an interval of width zero that excludes zero.
    assert paired(base, runs_of("cm", [1.0, 2.0, 3.5]), "fid", 0.1)["resolved"] is True


def test_one_seed_uses_the_bootstraps_and_other_seeds_are_refused():
    row = paired(runs_of("ddpm", [2.0], se=0.3), runs_of("cm", [1.0], se=0.4), "fid", resolve=0.1)
    assert (row["lo"], row["hi"]) == pytest.approx((-1 - 1.96 * 0.5, -1 + 1.96 * 0.5), abs=1e-3)
    assert row["resolved"] is True and row["seeds_needed"] is None and row["interval"] == "bootstrap, one seed"
    alone = paired(runs_of("ddpm", [2.0]), runs_of("cm", [1.0]), "fid", 0.1)
    assert alone["lo"] is None and alone["resolved"] is None  # neither seeds nor bootstrap: nothing to say
    moved = [{**run, "seed": 7} for run in runs_of("cm", [1.0])]
    with pytest.raises(ValueError, match=r"seeds \[7\] against \[0\]"):
        paired(runs_of("ddpm", [2.0]), moved, "fid", 0.1)
    with pytest.raises(ValueError, match="report.baseline = 'oc' is not among the reported methods ddpm, cm"):
        paired_rows(runs_of("ddpm", [2.0]) + runs_of("cm", [1.0]), "oc", ["fid"], 0.1)


def test_seeds_needed_reach_the_stated_power():
    """Simulated paired t-tests at the seeds it names reject a true difference delta about 80% of
    the time (two-sided 5%), and clearly less often with half as many seeds."""
    rng = np.random.default_rng(4)
    sd, delta = 1.0, 0.8
    n = seeds_needed(sd, delta)
    assert n == seeds_needed(2 * sd, 2 * delta) and seeds_needed(sd, 2 * delta) < n  # depends on sd / delta only

    def power(k):
        diffs = rng.normal(delta, sd, size=(4000, k))
        return np.mean(scipy_stats.ttest_1samp(diffs, 0, axis=1).pvalue < 0.05)

    assert 0.76 <= power(n) <= 0.9 and power(max(2, n // 2)) < 0.65
    assert seeds_needed(1.0, 1e-3) is None  # beyond 1,000 seeds


def test_the_last_fifth_trend_of_a_known_line():
    from cm.report.stats import last_fifth_trend, trend_rows

    steps = np.arange(50, 2001, 50)  # the last fifth: steps 1610..2000, i.e. 1650..2000
    change, se = last_fifth_trend(steps, 1.0 - 1e-4 * steps)
    tail = steps[steps >= 50 + 0.8 * 1950]
    assert change == pytest.approx(-1e-4 * (tail[-1] - tail[0]) / np.mean(1.0 - 1e-4 * tail)) and se == pytest.approx(0)
    rng = np.random.default_rng(5)
    noisy = [{"method": "ddpm", "seed": s, "rows": [{"step": t, "loss": 0.1 + 0.002 * rng.standard_normal()}
                                                    for t in steps]} for s in range(4)]
    falling = [{"method": "cm", "seed": 0, "rows": [{"step": t, "loss": 1.0 - 1e-4 * t} for t in steps]}]
    rows = trend_rows(noisy + falling)
    assert rows[0]["flat"] is True and rows[0]["seeds"] == 4 and rows[1]["flat"] is False
