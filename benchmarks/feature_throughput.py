"""Feature-extraction throughput (images/s) of the local FeatureNet, on CPU threads and a GPU if present.

    python benchmarks/feature_throughput.py [--images 4096] [--batch 512] [--rounds 3]
                                            [--inception-weights PATH] [--inception-images 256]

Times :func:`cm.metrics.feature_net.extract` (uint8 -> [-1, 1] conversion included) on random
uint8 images, 8x8x1 and 32x32x3, for 1 and 2 CPU threads and, when CUDA is available, the GPU.
An untrained network: the cost does not depend on the weights. The best of ``--rounds`` runs
after one warm-up is reported. With ``--inception-weights``, clean-fid's Inception (through
:func:`cm.metrics.inception.inception_features`, PIL resize to 299 included) is timed as well.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from cm.metrics.feature_net import FeatureNet, extract

SHAPES = [(8, 1), (32, 3)]  # (image size, channels)


def best_rate(fn, n_images: int, rounds: int, sync) -> float:
    """Images per second of the fastest of ``rounds`` calls, after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return n_images / min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inception-weights", default=None, help="time clean-fid's Inception too")
    parser.add_argument("--inception-images", type=int, default=256)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cuda = torch.cuda.is_available()
    targets = [("cpu", 1), ("cpu", 2)] + ([("cuda", None)] if cuda else [])
    rows = []
    threads0 = torch.get_num_threads()
    for size, channels in SHAPES:
        images = rng.integers(0, 256, size=(args.images, size, size, channels), dtype=np.uint8)
        net = FeatureNet(in_channels=channels, image_size=size, num_classes=10).eval()
        for device, threads in targets:
            torch.set_num_threads(threads or threads0)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            rate = best_rate(lambda: extract(net, images, batch_size=args.batch, device=device),
                             args.images, args.rounds, sync)
            rows.append((f"FeatureNet {size}x{size}x{channels}", device, threads or "-", args.batch, rate))
    torch.set_num_threads(threads0)

    if args.inception_weights:
        from cm.metrics.inception import inception_features, load_inception

        device = "cuda" if cuda else "cpu"
        net = load_inception(args.inception_weights, device)
        images = rng.integers(0, 256, size=(args.inception_images, 32, 32, 3), dtype=np.uint8)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        rate = best_rate(lambda: inception_features(net, images, batch_size=64, device=device, num_workers=2),
                         len(images), 1, sync)
        rows.append(("Inception 32x32x3 -> 299", device, torch.get_num_threads(), 64, rate))

    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, GPU: {gpu}, torch {torch.__version__}")
    print(f"| {'extractor':<26} | {'device':<6} | {'threads':>7} | {'batch':>5} | {'images/s':>10} |")
    print(f"|{'-' * 28}|{'-' * 8}|{'-' * 9}|{'-' * 7}|{'-' * 12}|")
    for name, device, threads, batch, rate in rows:
        print(f"| {name:<26} | {device:<6} | {threads!s:>7} | {batch:>5} | {rate:>10,.0f} |")


if __name__ == "__main__":
    main()
