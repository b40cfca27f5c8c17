"""What the intervals and paired comparisons cost, measured in one run.

    python benchmarks/uncertainty_cost.py [--results results/digits_lt] [--classes 1000] [--per-class 50]
                                          [--dim 128] [--replicates 200]

1. The default experiment (a finished run under --results): the report stage's work
   (`write_report`) with and without its uncertainty (the intervals of `summarise`, `paired_rows`,
   `paired_markdown`), and the evaluate stage's bootstrap against its other metrics, on the run's
   own features.
2. --classes x --per-class generated samples of --dim features (synthetic; the paper-scale local
   extractor has 128 dims), 3 methods x 3 seeds: the bootstrap of one generated set and the
   report's statistics over the per-class table.

Prints seconds and ratios; set OMP_NUM_THREADS to pin the thread count.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from cm import io
from cm.evaluate import distances_between
from cm.metrics.bootstrap import bootstrap_intervals
from cm.metrics.frechet import ReferenceStats
from cm.report import COLUMNS, paired_markdown, paired_rows, per_class_rows, summarise, write_report


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def default_run(results: Path, replicates: int) -> None:
    manifest = io.read_json(results / "data" / "manifest.json")
    methods = sorted(p.name for p in (results / "metrics").iterdir())
    runs = [{"method": m, "seed": int(p.stem[4:]), "metrics": io.read_json(p)}
            for m in methods for p in sorted((results / "metrics" / m).glob("seed*.json"))]
    samples = {m: results / "samples" / m / "seed0" / "samples.npz" for m in methods}
    with tempfile.TemporaryDirectory() as out:
        _, report = timed(write_report, experiment=results.name, runs=runs, samples=samples, manifest=manifest,
                          evaluator={"test_accuracy": 0.0}, out_dir=out)
    rows, summary = timed(summarise, runs)
    stripped = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if not k.endswith(("_lo", "_hi", "_se"))}}
                for r in runs]
    _, plain = timed(summarise, stripped)  # without the bootstrap columns: the mean and std only
    paired, pairing = timed(paired_rows, runs, methods[0], COLUMNS, 0.1)
    _, wording = timed(paired_markdown, paired, 0.1)
    extra = max(summary - plain, 0) + pairing + wording
    print(f"default report ({results}): write_report {report:.2f} s; intervals and paired comparisons "
          f"{extra * 1e3:.1f} ms = {extra / report:.2%} of it")

    feats = io.load_npz(results / "features" / methods[0] / "seed0.npz", required=("features", "labels"))
    ref = io.load_npz(results / "reference" / "features.npz", required=("features", "labels"))
    stats = ReferenceStats.from_features(ref["features"], ref["labels"], manifest["num_classes"])
    cfg = {"kid_subsets": 100, "kid_subset_size": 1000, "prdc_k": 5}
    measured, metrics = timed(distances_between, feats["features"], feats["labels"], ref["features"], stats,
                              manifest["splits"], cfg)
    _, boot = timed(bootstrap_intervals, gen=feats["features"], labels=feats["labels"], ref=ref["features"],
                    ref_stats=stats, splits=manifest["splits"], estimates=measured, replicates=replicates, seed=0)
    print(f"default evaluate: metrics {metrics:.2f} s, bootstrap ({replicates} replicates) {boot:.2f} s "
          f"= {boot / metrics:.2f} x the metrics")


def many_classes(classes: int, per_class: int, dim: int, replicates: int) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    centres = rng.standard_normal((classes, dim))
    ref = centres[labels] + rng.standard_normal((len(labels), dim))
    gen = centres[labels] * 1.1 + rng.standard_normal((len(labels), dim))
    stats = ReferenceStats.from_features(ref, labels, classes)
    third = classes // 3
    splits = {"many": list(range(third)), "medium": list(range(third, 2 * third)),
              "few": list(range(2 * third, classes))}
    estimates = {"fid": stats.fid_to(gen), "kid": 0.0,
                 **{f"fid_{g}": stats.fid_to(gen[np.isin(labels, c)], c) for g, c in splits.items()}}
    _, boot = timed(bootstrap_intervals, gen=gen, labels=labels, ref=ref, ref_stats=stats, splits=splits,
                    estimates=estimates, replicates=replicates, seed=0)
    base = {c: 1.0 for c in COLUMNS}
    runs = [{"method": m, "seed": s, "metrics": {
        **{c: v + 0.01 * s + 0.1 * k for c, v in base.items()}, "feature_extractor": "local",
        **{f"{c}_floor": 0.1 for c in ("fid", "kid", "fid_many", "fid_medium", "fid_few")},
        "per_class": {"fid": list(rng.random(classes)), "acc": list(rng.random(classes)),
                      "fid_floor": list(rng.random(classes))}}} for k, m in enumerate(("ddpm", "cm", "cbdm"))
            for s in range(3)]
    manifest = {"class_counts": list(range(classes, 0, -1)), "class_names": [str(c) for c in range(classes)]}

    def statistics():
        summarise(runs)
        paired_markdown(paired_rows(runs, "ddpm", COLUMNS, 0.1), 0.1)
        per_class_rows(runs, manifest)

    _, report = timed(statistics)
    print(f"{classes} classes x {per_class} samples, {dim} dims: bootstrap of one generated set ({replicates} "
          f"replicates) {boot:.1f} s; the report's statistics (3 methods x 3 seeds, per-class table) {report:.2f} s; "
          f"in all {boot + report:.1f} s (budget 60 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results/digits_lt"))
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--replicates", type=int, default=200)
    args = parser.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if (args.results / "metrics").is_dir():
        default_run(args.results, args.replicates)
    else:
        print(f"{args.results}: no finished run (make run first); skipping the default's figures")
    many_classes(args.classes, args.per_class, args.dim, args.replicates)


if __name__ == "__main__":
    main()
