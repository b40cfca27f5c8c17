"""Class-balanced generation from a merged model: the same number of images for every class."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cm import io
from cm.data.images import to_uint8
from cm.diffusion import GaussianDiffusion
from cm.merge import load_merged
from cm.train import resolve_device


def balanced_labels(num_classes: int, per_class: int) -> np.ndarray:
    """0,0,...,1,1,...: `per_class` labels of each class, in class order."""
    return np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def sample(*, merged_path: str | Path, out: str | Path, experiment: dict, seed: int,
           device: str = "auto", progress: bool = True) -> dict:
    """Generate `per_class` images of every class and write them (uint8 NHWC + labels) to `out`."""
    cfg = experiment["sample"]
    dev = resolve_device(device)
    net, meta = load_merged(merged_path)
    net.to(dev)
    config = meta["config"]
    diffusion = GaussianDiffusion(**experiment["diffusion"])
    labels = balanced_labels(config["num_classes"], cfg["per_class"])
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    chunks = []
    starts = range(0, len(labels), cfg["batch_size"])
    for batch_index, start in enumerate(tqdm(starts, desc="sample", disable=not progress,
                                             mininterval=1.0 if sys.stderr.isatty() else 30.0)):
        y = torch.as_tensor(labels[start:start + cfg["batch_size"]], device=dev)
        # One generator per batch: a batch's images depend only on (seed, batch), not on history.
        gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + batch_index)
        x = diffusion.sample(net, y, (len(y), *shape), sampler=cfg["sampler"], steps=cfg["steps"],
                             guidance=cfg["guidance"], generator=gen)
        chunks.append(to_uint8(x))
    images = np.concatenate(chunks)
    io.save_npz(out, images=images, labels=labels)
    return {"num_images": int(len(labels)), "per_class": cfg["per_class"]}
