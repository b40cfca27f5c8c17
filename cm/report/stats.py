"""The report's uncertainty: the 95% interval of a mean over seeds, the paired difference of two
methods seed by seed, and the number of seeds that would resolve a difference of a given size.

Across seeds the interval is Student's t on the seed means (each seed trains, samples and evaluates
afresh, so its spread holds every source of variation); with one seed the report falls back on
the evaluate stage's bootstrap, which holds only the variation of the finite generated set.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from cm.metrics.bootstrap import LEVEL

POWER = 0.8
MAX_SEEDS = 1000


def t_interval(values) -> tuple[float, float] | None:
    """95% interval of the mean of `values` (Student's t, n - 1 degrees of freedom); None for one value."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    half = stats.t.ppf((1 + LEVEL) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def normal_interval(centre: float, se: float) -> tuple[float, float]:
    """95% normal interval around `centre` with standard error `se`."""
    half = stats.norm.ppf((1 + LEVEL) / 2) * se
    return centre - half, centre + half


def seeds_needed(sd: float, delta: float) -> int | None:
    """Seeds a paired comparison needs to tell a true difference `delta` from zero (two-sided 95%,
    80% power, paired t) when its per-seed differences spread by `sd`: the smallest n >= 2 with
    (t_{0.975, n-1} + t_{0.8, n-1}) sd / sqrt(n) <= |delta|. None when more than MAX_SEEDS."""
    for n in range(2, MAX_SEEDS + 1):
        reach = (stats.t.ppf((1 + LEVEL) / 2, n - 1) + stats.t.ppf(POWER, n - 1)) * sd / math.sqrt(n)
        if reach <= abs(delta):
            return n
    return None


def paired(baseline: list[dict], other: list[dict], metric: str, resolve: float) -> dict:
    """Difference other - baseline of `metric`, seed by seed (runs: {"seed", "metrics"}, the same
    seeds on both sides): mean, std, 95% interval, whether it excludes zero (`resolved`; None
    without an interval), and the seeds needed to resolve `resolve` times the baseline's mean.

    With one seed the interval is the normal one from the two bootstrap standard errors
    (`<metric>_se`, independent generated sets), where the evaluate stage made them; else none."""
    base = {run["seed"]: run["metrics"][metric] for run in baseline}
    mine = {run["seed"]: run["metrics"][metric] for run in other}
    if sorted(base) != sorted(mine):
        raise ValueError(f"paired comparison of {metric}: seeds {sorted(mine)} against {sorted(base)}")
    diffs = np.array([mine[s] - base[s] for s in sorted(base)])
    delta = resolve * abs(float(np.mean(list(base.values()))))
    row = {"metric": metric, "seeds": len(diffs), "difference": float(diffs.mean()),
           "difference_std": float(diffs.std(ddof=1)) if len(diffs) > 1 else None,
           "lo": None, "hi": None, "interval": None, "resolve": delta, "seeds_needed": None}
    if len(diffs) > 1:
        row["lo"], row["hi"] = t_interval(diffs)
        row["interval"] = "paired t over seeds"
        row["seeds_needed"] = seeds_needed(row["difference_std"], delta) if delta > 0 else None
    elif f"{metric}_se" in baseline[0]["metrics"]:
        se = math.hypot(baseline[0]["metrics"][f"{metric}_se"], other[0]["metrics"][f"{metric}_se"])
        row["lo"], row["hi"] = normal_interval(row["difference"], se)
        row["interval"] = "bootstrap, one seed"
    row["resolved"] = None if row["lo"] is None else bool(row["lo"] > 0 or row["hi"] < 0)
    return row


def paired_rows(runs: list[dict], baseline: str, columns: list[str], resolve: float) -> list[dict]:
    """`paired` for every method but the baseline and every column, methods in their order."""
    by_method = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    if baseline not in by_method:
        raise ValueError(f"report.baseline = {baseline!r} is not among the reported methods {', '.join(by_method)}")
    return [{"comparison": f"{method} - {baseline}", "method": method, "baseline": baseline,
             **paired(by_method[baseline], mine, col, resolve)}
            for method, mine in by_method.items() if method != baseline for col in columns]


def last_fifth_trend(steps, losses) -> tuple[float, float | None]:
    """How much the training loss still moves at the end: the least-squares line through the logged
    losses of the last fifth of the steps, its change across that fifth relative to their mean,
    and the standard error of that change (None with fewer than 3 points)."""
    steps, losses = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    last = steps >= steps.min() + 0.8 * (steps.max() - steps.min())
    x, y = steps[last], losses[last]
    if len(x) < 2:
        return 0.0, None
    fit = stats.linregress(x, y)
    scale = (x.max() - x.min()) / y.mean()
    return float(fit.slope * scale), float(fit.stderr * scale) if len(x) > 2 else None


def trend_rows(histories: list[dict]) -> list[dict]:
    """Per method: the training loss's relative change across the last fifth of the steps
    (`last_fifth_trend`), mean over seeds with its 95% interval (Student's t over seeds; with one
    seed, the line fit's own), and whether the interval holds zero (flat: converged at this
    resolution)."""
    rows = []
    for method in dict.fromkeys(h["method"] for h in histories):
        fits = [last_fifth_trend([float(r["step"]) for r in h["rows"]], [float(r["loss"]) for r in h["rows"]])
                for h in histories if h["method"] == method]
        changes = [change for change, _ in fits]
        if len(fits) > 1:
            interval = t_interval(changes)
        elif fits[0][1] is not None:
            interval = normal_interval(changes[0], fits[0][1])
        else:
            interval = None
        rows.append({"method": method, "seeds": len(fits), "change": float(np.mean(changes)),
                     "lo": interval[0] if interval else None, "hi": interval[1] if interval else None,
                     "flat": None if interval is None else bool(interval[0] <= 0 <= interval[1])})
    return rows
