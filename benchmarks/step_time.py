"""Per-step training cost of each method relative to DDPM: same model, batch and machine, one run.

    python benchmarks/step_time.py [--preset small] [--image-size 8] [--channels 1] [--batch 64]
                                   [--methods ddpm cm+oc ...]

Every registered method (cm.methods.METHOD_NAMES) is timed by default, with the registry's
default parameters (the released-code values). Methods are timed in interleaved rounds so that
machine noise hits them alike; the figure to read is the ratio to DDPM, not the absolute time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from cm.data.profiles import exponential_counts
from cm.diffusion import GaussianDiffusion
from cm.methods import METHOD_NAMES, PARAM_DEFAULTS, build_method
from cm.models import build_unet


def make_step(name, args, counts, device, params: dict | None = None):
    """One training step of method `name` (registry defaults, with `params` on top) on a fixed batch."""
    diffusion = GaussianDiffusion(1000)
    params = PARAM_DEFAULTS.get(name, {}) if params is None else params
    method = build_method(name, diffusion=diffusion, train={"label_drop": 0.1, "batch_size": args.batch},
                          params=params, class_counts=counts, all_params=PARAM_DEFAULTS)
    net = build_unet(args.preset, num_classes=len(counts), in_channels=args.channels, image_size=args.image_size)
    method.prepare(net)
    net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    x0 = torch.randn(args.batch, args.channels, args.image_size, args.image_size, device=device)
    y = torch.randint(0, len(counts), (args.batch,), device=device)

    def step():
        loss = method(net, x0, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def time_interleaved(steps: dict, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds per step of each named step function, per round: 3 warm-up steps each, then
    `rounds` rounds that time every function in turn, so machine noise hits them alike."""
    for step in steps.values():
        for _ in range(3):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            times[name].append((time.perf_counter() - start) / per_round)
    return times


def machine_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {threads} thread(s)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES, metavar="NAME",
                        help="methods to time (default: all registered); ddpm is always added as the reference")
    args = parser.parse_args()
    names = list(dict.fromkeys(["ddpm", *args.methods]))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    counts = exponential_counts(5000, 10, 100)
    steps = {name: make_step(name, args, counts, device) for name in names}
    times = time_interleaved(steps, args.rounds, args.steps)
    print(f"preset {args.preset}, {args.channels}x{args.image_size}x{args.image_size}, batch {args.batch}, "
          f"{machine_name(device, args.threads)}")
    base = statistics.median(times["ddpm"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:18s} {median * 1000:8.1f} ms/step   x{median / base:.2f} of ddpm")


if __name__ == "__main__":
    main()
