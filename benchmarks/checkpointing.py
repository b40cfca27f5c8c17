"""What checkpointing costs and what a kill loses, measured in one run.

    python benchmarks/checkpointing.py [--preset small] [--steps 200] [--intervals 10 50 200]

Trains the digits default's method `cm` with several checkpoint intervals (plus one run that never
checkpoints) and prints each run's time per step relative to the run without checkpoints. A kill
loses the steps since the newest checkpoint: uniform on 0 .. interval-1, (interval-1)/2 on average
(tests/test_reliability.py kills real jobs and checks the resumed weights are bit-identical).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cm import config as cfg
from cm import io
from cm.data import build_manifest
from cm.train import train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--intervals", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = cfg.load_params()
    experiment = copy.deepcopy(params["experiments"]["digits_lt"])
    experiment["model"] = args.preset
    manifest = build_manifest(experiment["data"])
    never = args.steps * 10  # an interval past the end: only the final checkpoint
    intervals = [never, *args.intervals]
    times = {k: [] for k in intervals}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for interval in intervals:  # interleaved so machine noise hits all alike
                exp = copy.deepcopy(experiment)
                exp["train"].update(steps=args.steps, checkpoint_every=interval, keep_checkpoints=2)
                out = Path(tmp) / f"{repeat}-{interval}"
                summary = train(manifest=manifest, experiment=exp, method_name="cm",
                                method_params=params["method_params"], seed=repeat, out=out / "model.pt",
                                checkpoint_root=out / "ckpt", history_out=out / "history.csv", progress=False)
                times[interval].append(summary["seconds_per_step"])
        ckpt = next(Path(tmp).rglob("step_*.pt"))
        start = time.perf_counter()
        io.save_torch(Path(tmp) / "probe.pt", io.load_torch(ckpt))
        save_seconds = time.perf_counter() - start
        size_mib = ckpt.stat().st_size / 2**20
    base = statistics.median(times[never])
    print(f"preset {args.preset}, method cm, {args.steps} steps, 1 thread; checkpoint file "
          f"{size_mib:.1f} MiB, written in {save_seconds * 1000:.0f} ms")
    print(f"{'interval':>10} {'ms/step':>9} {'overhead':>9} {'steps lost on a kill (mean / max)':>36}")
    for interval in intervals:
        median = statistics.median(times[interval])
        label = "final only" if interval == never else str(interval)
        lost = "-" if interval == never else f"{(interval - 1) / 2:.1f} / {interval - 1}"
        print(f"{label:>10} {median * 1000:9.1f} {100 * (median / base - 1):8.1f}% {lost:>36}")


if __name__ == "__main__":
    main()
