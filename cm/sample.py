"""Class-balanced generation from a merged model: the same number of images for every class.

Batches are written to a `partial/` folder beside the output as they finish, under a key of the
model file and the sampling settings, so a killed job resumes at the first missing batch (no
batch generated twice, none missing); the folder is removed once the output is complete.

Images are stored as uint8 (`sample.quantize: true`, rounded as an image file holds them) or as
float32 in [0, 1] (`false`: the sampler's output unrounded, as CBDM, OC and CM fed their FID code).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cm import accel, io
from cm.checkpoint import load_merged
from cm.data.images import to_uint8
from cm.diffusion import GaussianDiffusion


def to_unit_float(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> float32 (N, H, W, C) in [0, 1], clipped but not rounded."""
    x = ((x.detach().float().cpu() + 1.0) / 2.0).clamp(0, 1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def balanced_labels(num_classes: int, per_class: int) -> np.ndarray:
    """0,0,...,1,1,...: `per_class` labels of each class, in class order."""
    return np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def _run_key(merged_path: Path, experiment: dict, seed: int) -> str:
    """What decides the images: the model's bytes, the sampler settings, the seed and the thread count."""
    digest = hashlib.sha256()
    with open(merged_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    settings = [experiment["sample"], experiment["diffusion"], seed, torch.get_num_threads()]
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _finished_batch(path: Path, labels: np.ndarray) -> np.ndarray | None:
    """The images of a batch written by an earlier attempt, if intact and for the same labels."""
    if not path.is_file():
        return None
    try:
        arrays = io.load_npz(path, required=("images", "labels"))
    except io.CorruptFileError:
        return None
    return arrays["images"] if np.array_equal(arrays["labels"], labels) else None


def _codec(meta: dict, device):
    """The VAE of a latent model's merged checkpoint (the finetune extra), else None."""
    if not meta.get("codec"):
        return None
    from cm.finetune.diffusers_models import load_codec

    return load_codec(meta["codec"]).to(device)


def sample(*, merged_path: str | Path, out: str | Path, experiment: dict, seed: int,
           device: str = "auto", progress: bool = True) -> dict:
    """Generate `per_class` images of every class and write them (NHWC, uint8 or with
    `sample.quantize: false` float32 in [0, 1]; and labels) to `out`."""
    cfg = experiment["sample"]
    dev = accel.resolve_device(device)
    net, meta = load_merged(merged_path)
    net.to(dev)
    accel.configure_backends(cfg["precision"], dev)
    accel.prepare_network(net, channels_last=cfg["channels_last"], compile=cfg["compile"])
    config = meta["config"]
    codec = _codec(meta, dev)
    diffusion = GaussianDiffusion(**experiment["diffusion"])
    labels = balanced_labels(config["num_classes"], cfg["per_class"])
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    partial = Path(out).parent / "partial"
    folder = partial / _run_key(Path(merged_path), experiment, seed)

    chunks, resumed = [], 0
    starts = range(0, len(labels), cfg["batch_size"])
    for batch_index, start in enumerate(tqdm(starts, desc="sample", disable=not progress,
                                             mininterval=1.0 if sys.stderr.isatty() else 30.0)):
        batch_labels = labels[start:start + cfg["batch_size"]]
        chunk = folder / f"batch_{batch_index:06d}.npz"
        images = _finished_batch(chunk, batch_labels)
        if images is None:
            y = torch.as_tensor(batch_labels, device=dev)
            # One generator per batch: a batch's images depend only on (seed, batch), not on history.
            gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + batch_index)
            with accel.autocast(cfg["precision"], dev):  # the network's passes; the updates stay float32
                x = diffusion.sample(net, y, (len(y), *shape), sampler=cfg["sampler"], steps=cfg["steps"],
                                     guidance=cfg["guidance"], generator=gen)
            if codec is not None:  # a latent model: the samples are latents, the images their decoding
                x = codec.decode(x)
            images = to_uint8(x) if cfg["quantize"] else to_unit_float(x)
            io.save_npz(chunk, images=images, labels=batch_labels)
        else:
            resumed += 1
        chunks.append(images)
    io.save_npz(out, images=np.concatenate(chunks), labels=labels)
    shutil.rmtree(partial, ignore_errors=True)
    return {"num_images": int(len(labels)), "per_class": cfg["per_class"], "batches_resumed": resumed}
