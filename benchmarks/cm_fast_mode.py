"""CM's fast mode (method_params.cm.passes = shared_encoder) against the released two-pass recipe.

    python benchmarks/cm_fast_mode.py [--methods cm cm+cbdm ...] [--train-steps 1200] [--seeds 0]
                                      [--threads 1] [--skip-quality]

(a) Speed: ms/step of ddpm and of each CM variant in both modes, same model, batch and machine,
    timed in interleaved rounds (benchmarks/step_time.py's helpers), and the FLOPs of one step,
    which do not depend on the machine's load.
(b) Quality: `cm` trained in both modes on an experiment of params.yaml (default the embedded
    digits-LT) for the same steps and seeds, then merged, sampled and evaluated with the
    pipeline's own functions; one local evaluator and one reference serve every run. Prints FID,
    fid_few and recall of each mode beside the real-vs-real floor.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch
from step_time import machine_name, make_step, time_interleaved
from torch.utils.flop_counter import FlopCounterMode

from cm import accel
from cm import config as cfg
from cm.data import build_manifest
from cm.data.profiles import exponential_counts
from cm.evaluate import evaluate, reference_features, train_evaluator
from cm.merge import merge
from cm.methods import METHOD_NAMES, parse_method
from cm.sample import sample
from cm.train import train

MODES = ("two", "shared_encoder")
CM_NAMES = [name for name in METHOD_NAMES if parse_method(name).variant is not None]
METRICS = ("fid", "fid_few", "recall")


def step_flops(step) -> int:
    """Floating-point operations of one training step (forward and backward; the counter sees
    convolutions, matrix products and attention): the machine-independent part of the cost."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def speed(args, device: torch.device) -> None:
    """ms/step and FLOPs/step of ddpm and of every CM variant asked for, in both modes, and the ratios."""
    counts = exponential_counts(5000, 10, 100)
    steps = {"ddpm": make_step("ddpm", args, counts, device)}
    for name in args.methods:
        for mode in MODES:
            steps[f"{name} ({mode})"] = make_step(name, args, counts, device, {"passes": mode})
    flops = {label: step_flops(step) for label, step in steps.items()}
    times = {label: statistics.median(values) for label, values in
             time_interleaved(steps, args.rounds, args.steps).items()}
    print(f"\n(a) speed: preset {args.preset}, {args.channels}x{args.image_size}x{args.image_size}, "
          f"batch {args.batch}, {machine_name(device, args.threads)}, {args.rounds} rounds x {args.steps} steps")
    print("| method | ms/step | x ddpm | shared_encoder / two (time) | GFLOP/step | shared_encoder / two (FLOPs) |")
    print("|---|---|---|---|---|---|")
    for label, seconds in times.items():
        two = label.replace("(shared_encoder)", "(two)")
        fast = label.endswith("(shared_encoder)")
        time_ratio = f"{seconds / times[two]:.2f}" if fast else ""
        flop_ratio = f"{flops[label] / flops[two]:.2f}" if fast else ""
        print(f"| {label} | {seconds * 1000:.1f} | {seconds / times['ddpm']:.2f} | {time_ratio} | "
              f"{flops[label] / 1e9:.2f} | {flop_ratio} |", flush=True)


def with_passes(method_params: dict, mode: str) -> dict:
    params = copy.deepcopy(method_params)
    params["cm"]["passes"] = mode
    return params


def shared_reference(experiment: dict, work: Path, device: str) -> dict:
    """Train the local evaluator and extract the real reference once, for every run."""
    report = train_evaluator(experiment=experiment, out=work / "evaluator.pt", report_out=work / "evaluator.json",
                             device=device, progress=False)
    reference_features(experiment=experiment, evaluator=work / "evaluator.pt", out=work / "reference.npz",
                       stats_out=work / "stats.npz", device=device)
    return report


def one_run(experiment: dict, manifest: dict, method_params: dict, mode: str, seed: int, work: Path,
            device: str) -> dict:
    """Train `cm` in one mode, merge, sample and evaluate; the metrics plus the training time."""
    run = work / f"{mode}_seed{seed}"
    summary = train(manifest=manifest, experiment=experiment, method_name="cm",
                    method_params=with_passes(method_params, mode), seed=seed, out=run / "model.pt",
                    checkpoint_root=work / "checkpoints", history_out=run / "history.csv", device=device,
                    progress=False)
    merge(run / "model.pt", run / "merged.pt")
    sample(merged_path=run / "merged.pt", out=run / "samples.npz", experiment=experiment, seed=seed,
           device=device, progress=False)
    metrics = evaluate(samples=run / "samples.npz", evaluator=work / "evaluator.pt", reference=work / "reference.npz",
                       stats=work / "stats.npz", features_out=run / "features.npz", manifest=manifest,
                       experiment=experiment, out=run / "metrics.json", device=device)
    return {**metrics, "s_per_step": summary["seconds_per_step"], "final_loss": summary["final_loss"]}


def quality(args, work: Path) -> None:
    """Train, sample and evaluate `cm` in both modes for each seed; print one row per run."""
    params = cfg.load_params(args.params)
    experiment = copy.deepcopy(cfg.experiment(params, args.experiment))
    experiment["train"]["steps"] = args.train_steps
    device = str(accel.resolve_device(params["device"]))
    manifest = build_manifest(experiment["data"])
    report = shared_reference(experiment, work, device)
    print(f"\n(b) quality: {args.experiment}, preset {experiment['model']}, {args.train_steps} steps, seeds "
          f"{args.seeds}; local evaluator test accuracy {report['test_accuracy']:.3f}")
    print("| passes | seed | train s/step | final loss | FID | fid_few | recall |\n|---|---|---|---|---|---|---|")
    floor = {}
    for seed in args.seeds:
        for mode in MODES:
            m = one_run(experiment, manifest, params["method_params"], mode, seed, work, device)
            print(f"| {mode} | {seed} | {m['s_per_step']:.3f} | {m['final_loss']:.4f} | "
                  + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |", flush=True)
            floor = floor or m
    print("| real vs real (floor) | | | | " + " | ".join(f"{floor[k + '_floor']:.3f}" for k in METRICS) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["cm"], choices=CM_NAMES, metavar="NAME",
                        help="CM variants to time in both modes (default: cm)")
    parser.add_argument("--preset", default="small", help="model preset of the speed part")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--params", default=cfg.PARAMS_FILE)
    parser.add_argument("--experiment", default="digits_lt", help="experiment of the quality part")
    parser.add_argument("--train-steps", type=int, default=1200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--work", type=Path, help="folder for the runs' files (default: a temporary one)")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speed(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if args.skip_quality:
        return
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        quality(args, args.work)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            quality(args, Path(tmp))


if __name__ == "__main__":
    main()
