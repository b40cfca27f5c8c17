"""The training loop shared by every method: Adam with warm-up, clipping, EMA, checkpoints, resume.

A run checkpoints every `checkpoint_every` steps into a folder named by the fingerprint of its
settings, and a later run with the same settings resumes from the newest checkpoint there. The
checkpoint holds everything that decides the remaining steps (model, EMA, optimiser, data order,
RNG states), so a resumed run ends with the same weights as an uninterrupted one on the CPU.

A step never waits for the device: losses and statistics stay there and are read once per
`log_every` (and at checkpoints; the step itself is cm/trainer.py). Under torchrun the same command
trains with DistributedDataParallel, rank r computing its rows of every global batch
(cm/distributed.py). The checkpoint files are cm/checkpoint.py's.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cm import accel, checkpoint, distributed, io
from cm.data import load_training_set
from cm.data.images import scale, to_nchw
from cm.diffusion import GaussianDiffusion
from cm.errors import DataError, NonFiniteLossError
from cm.methods import build_method, parse_method, resolve_params
from cm.models import build_model
from cm.trainer import Trainer

log = logging.getLogger(__name__)

# Settings that do not change the trajectory of the steps taken, so a changed value still resumes.
_NOT_IN_FINGERPRINT = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "max_nonfinite_steps")


class EpochSampler:
    """Shuffled epochs of batch indices (drop_last), resumable from its state."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, min(batch_size, n)
        self.generator = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        batch = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"], int(state["pos"])


def learning_rate(step: int, cfg: dict) -> float:
    """The learning rate of optimiser step `step` (0-based): a linear warm-up to lr, then lr
    (lr_decay none) or a half cosine from lr towards zero at the end of the run (cosine)."""
    lr = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup_steps"]))
    if cfg["lr_decay"] == "cosine" and step >= cfg["warmup_steps"]:
        progress = (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
        lr *= 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def fingerprint(run: dict) -> str:
    """Short hash of everything that determines the training trajectory."""
    run = copy.deepcopy(run)
    decays = run["train"].get("lr_decay", "none") != "none"
    if not decays:  # the former implicit value: checkpoints made before the option still resume
        run["train"].pop("lr_decay", None)
    for key in _NOT_IN_FINGERPRINT:
        if not (key == "steps" and decays):  # a decaying rate depends on the run's length
            run["train"].pop(key, None)
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]


def _rng_state(device: torch.device) -> dict:
    """The CPU generator and the training device's (with torchrun every rank draws the same)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["device"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "device" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["device"], device)


def model_config(manifest: dict, experiment: dict, method, start: dict | None = None) -> dict:
    """What is needed to rebuild the network (and its low-rank branches) from a state dict. A
    fine-tuning from a diffusers folder takes its network's description from the pretrained model."""
    height, width, channels = manifest["image_shape"]
    if start is not None and start["config"].get("diffusers"):
        network = {k: start["config"][k] for k in ("diffusers", "num_classes", "in_channels", "image_size")}
    else:
        network = {"preset": experiment["model"], "num_classes": manifest["num_classes"], "in_channels": channels,
                   "image_size": height}
    return {
        **network,
        "rank_ratio": method.rank_ratio,
        "branch_scale": method.branch_scale,
        "branch_layers": method.branch_layers,
        # Fine-tuning: the adapters to rebuild. No `lora` key otherwise: a plain run's config, and so
        # its checkpoint's bytes, holds nothing about fine-tuning.
        **({"lora": method.lora} if method.lora else {}),
    }


def train(*, manifest: dict, experiment: dict, method_name: str, method_params: dict, seed: int,
          out: Path, checkpoint_root: Path, history_out: Path, device: str = "auto",
          progress: bool = True, pretrained: Path | None = None) -> dict:
    """Train one method with one seed; write the final checkpoint `out` and the loss history CSV
    (under torchrun: rank 0 writes, every rank trains).

    method_params: params.yaml's whole `method_params` mapping (a CM variant reads `cm` and its base's
    section). pretrained: the experiment's pretrain stage output (cm/pretrain.py); when it holds a
    model, training starts from its EMA weights, and checkpoints leave out the weights kept frozen.
    """
    cfg = experiment["train"]
    dev = distributed.init(str(accel.resolve_device(device)))
    accel.configure_backends(cfg["precision"], dev)
    main = distributed.is_main()
    run = {"manifest": manifest["content_sha256"], "model": experiment["model"], "method": method_name,
           "method_params": resolve_params(method_name, method_params), "seed": seed,
           "diffusion": experiment["diffusion"], "hflip": experiment["data"]["hflip"], "train": dict(cfg),
           "threads": torch.get_num_threads()}  # parallel sums round by the thread count
    if distributed.world_size() > 1:  # and by the process count (the all-reduce)
        run["processes"] = distributed.world_size()
    start_from = checkpoint.load_pretrained(pretrained) if pretrained is not None else None
    if start_from is not None:
        run["pretrained"] = io.file_sha256(pretrained)
    lora = (experiment.get("finetune") or {}).get("lora")
    if parse_method(method_name).lora:  # the adapters' shape: another rank must not resume these checkpoints
        run["lora"] = lora
    folder = Path(checkpoint_root) / fingerprint(run)

    torch.manual_seed(seed)
    data = load_training_set(manifest)
    # Kept as uint8 (each batch is scaled to [-1, 1]) and dense in the layout the network runs in, so
    # that a batch gathered from it is too (to_nchw's permuted view would give NHWC-strided batches).
    x_all = accel.to_layout(to_nchw(data.images), cfg["channels_last"], contiguous=True).to(dev)
    y_all = torch.as_tensor(data.labels).to(dev)
    diffusion = GaussianDiffusion(**experiment["diffusion"])
    method = build_method(method_name, diffusion=diffusion, train=cfg, all_params=method_params,
                          class_counts=manifest["class_counts"], lora=lora)
    config = model_config(manifest, experiment, method, start_from)
    net = build_model(config)
    if start_from is not None:
        check_same_network(start_from["config"], config, pretrained)
        net.load_state_dict(start_from["ema"])
    codec = start_from.get("codec") if start_from is not None else None
    latents = encode_training_set(codec, x_all, experiment["data"]["hflip"]) if codec is not None else None
    method.prepare(net)
    trainer = Trainer(net, method, cfg, dev)
    net, ema, optimizer = trainer.net, trainer.ema, trainer.optimizer
    # Weights kept frozen (fine-tuning through adapters) are the pretrained ones: not checkpointed.
    frozen = checkpoint.frozen_names(net)
    sampler = EpochSampler(len(y_all), cfg["batch_size"], seed)
    rows = distributed.local_rows(sampler.batch_size)
    start, history, nonfinite = 0, [], 0

    state = checkpoint.load_latest_training(folder, cfg["steps"])
    if state is not None:
        checkpoint.load_weights(net, state["model"], frozen)
        checkpoint.load_weights(ema, state["ema"], frozen)
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"], dev)
        start, history, nonfinite = int(state["step"]), list(state["history"]), int(state["nonfinite"])
        trainer.nonfinite.fill_(nonfinite)

    def save_checkpoint(step: int) -> None:
        if not main:
            return
        checkpoint.save_training(
            folder, step=step, run=run,
            model=checkpoint.without(net.state_dict(), frozen), ema=checkpoint.without(ema.state_dict(), frozen),
            optimizer=optimizer.state_dict(),
            sampler=sampler.state_dict(), rng=_rng_state(dev), history=history,
            nonfinite=nonfinite, keep=cfg["keep_checkpoints"])

    def check_nonfinite(count: int, step: int) -> None:
        if count > nonfinite:
            log.warning("%s: %d non-finite loss(es) skipped by step %d (%d of at most %d)", method_name,
                        count - nonfinite, step, count, cfg["max_nonfinite_steps"])
        if count > cfg["max_nonfinite_steps"]:
            kept = checkpoint.training_checkpoints(folder)
            raise NonFiniteLossError(
                f"{method_name}: non-finite loss ({trainer.last_bad.item()}) by step {step}, "
                f"{count} such step(s) > train.max_nonfinite_steps = {cfg['max_nonfinite_steps']}; "
                f"last good checkpoint kept: {kept[0] if kept else 'none yet'}")

    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], desc=f"train {method_name}",
               disable=not (progress and main), mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for step in bar:
        idx = _to_device(sampler.next(), dev)[rows]  # this rank's rows of the global batch
        x0, y = (scale(x_all[idx]) if latents is None else latents[0][idx]), y_all[idx]
        if experiment["data"]["hflip"]:
            flip = distributed.draw(lambda n: torch.rand(n, device=dev) < 0.5, len(x0))
            mirrored = x0.flip(3) if latents is None else latents[1][idx]
            x0 = torch.where(flip.view(-1, 1, 1, 1), mirrored, x0)
        trainer.step(x0, y, learning_rate(step, cfg))
        logs = (step + 1) % cfg["log_every"] == 0 or step + 1 == cfg["steps"]
        checkpoints = (step + 1) % cfg["checkpoint_every"] == 0 or step + 1 == cfg["steps"]
        if logs or checkpoints:  # the only reads from the device
            means, count = trainer.read_window() if logs else ({}, int(trainer.nonfinite))
            check_nonfinite(count, step + 1)  # before a checkpoint: none is written past the limit
            nonfinite = count
            if means:
                history.append({"step": step + 1, **means})
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", refresh=False)
        if checkpoints:
            save_checkpoint(step + 1)
    bar.close()
    seconds = time.perf_counter() - t0

    # An identical final checkpoint is left as it is (see checkpoint.holds_model).
    if main and not checkpoint.holds_model(out, folder.name, cfg["steps"]):
        # A fine-tuning's frozen weights stay in the pretrained file; a model trained whole is saved as
        # its state dicts are (their metadata included, so the bytes stay those of earlier runs).
        weights = {"state_dict": net.state_dict(), "ema": ema.state_dict()}
        if frozen:
            weights = {name: checkpoint.without(state, frozen) for name, state in weights.items()}
        checkpoint.save_model(out, config=config, method=method_name, step=cfg["steps"], fingerprint=folder.name,
                              **weights, codec=None if frozen else codec, pretrained=pretrained if frozen else None)
    if main:
        write_history(history_out, history)
    steps_run = cfg["steps"] - start
    return {"steps": cfg["steps"], "resumed_from": start, "seconds": seconds,
            "seconds_per_step": seconds / steps_run if steps_run else 0.0,
            "final_loss": history[-1]["loss"] if history else float("nan"),
            "parameters": sum(p.numel() for p in net.parameters()), "nonfinite_steps": nonfinite,
            "processes": distributed.world_size(), "history": history}


def encode_training_set(codec_state: dict, images: torch.Tensor,
                        hflip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A latent model's training set, encoded once with its frozen VAE: the latents of the images and,
    with hflip, of their mirror images (a flip of the image, not of its latent)."""
    from cm.finetune.diffusers_models import load_codec

    codec = load_codec(codec_state).to(images.device)
    return codec.encode_stored(images), codec.encode_stored(images, mirror=True) if hflip else None


def check_same_network(pretrained: dict, config: dict, path) -> None:
    """A pretrained model must be the network the experiment builds: one line naming what differs."""
    keys = ("num_classes",) if config.get("diffusers") else ("preset", "num_classes", "in_channels", "image_size")
    for key in keys:
        if pretrained.get(key) != config[key]:
            raise DataError(f"{path}: the pretrained model has {key} = {pretrained.get(key)!r}, the experiment's "
                            f"network needs {config[key]!r} (model and data must match the pretraining's)")


def _to_device(idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Batch indices on the device without waiting for it (pinned memory, asynchronous copy)."""
    return idx.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else idx


def write_history(path: Path, history: list[dict]) -> None:
    """The logged loss curve as CSV (a DVC plot)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    with io.atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys or ["step"])
        writer.writeheader()
        writer.writerows(history)
