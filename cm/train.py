"""The training loop shared by every method: Adam with warm-up, clipping, EMA, checkpoints, resume.

A run checkpoints every `checkpoint_every` steps into a folder named by the fingerprint of its
settings, and a later run with the same settings resumes from the newest checkpoint there. The
checkpoint holds everything that decides the remaining steps (model, EMA, optimiser, data order,
RNG states), so a resumed run ends with the same weights as an uninterrupted one on the CPU.

A step never waits for the device: losses and statistics stay there and are read once per
`log_every` (and at checkpoints); a non-finite loss is skipped on the device by fused Adam's
`found_inf` flag and counted there (cm/accel.py). Under torchrun the same command trains with
DistributedDataParallel, rank r computing its rows of every global batch (cm/distributed.py).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cm import accel, distributed, io
from cm.data import load_training_set
from cm.data.images import scale, to_nchw
from cm.diffusion import GaussianDiffusion
from cm.errors import DataError, NonFiniteLossError
from cm.methods import build_method, parse_method, resolve_params
from cm.models import build_model
from cm.pretrain import load_pretrained

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cm.train/1"
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


def fingerprint(run: dict) -> str:
    """Short hash of everything that determines the training trajectory."""
    run = copy.deepcopy(run)
    for key in _NOT_IN_FINGERPRINT:
        run["train"].pop(key, None)
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' is not allowed here: no CUDA device is visible; use auto or cpu")
    return torch.device(name)


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


def _checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in a folder, newest first."""
    return sorted(folder.glob("step_*.pt"), reverse=True)


def _load_latest(folder: Path, max_step: int) -> dict | None:
    """The newest readable checkpoint at or before `max_step` (a run shortened after a longer one
    must not start past its end); a corrupt one is reported and the previous one tried."""
    for path in _checkpoints(folder):
        if int(path.stem.removeprefix("step_")) > max_step:
            continue
        try:
            state = io.load_torch(path)
            if state.get("format") == CHECKPOINT_FORMAT:
                log.info("resuming from %s", path)
                return state
            log.warning("%s: not a training checkpoint of this version; ignored", path)
        except io.CorruptFileError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
    return None


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
        # Fine-tuning: the adapters to rebuild (absent otherwise, so such configs keep their bytes).
        **({"lora": method.lora} if method.lora else {}),
    }


class Objective(nn.Module):
    """A method's loss on a batch as one module call, so that DistributedDataParallel sees every
    network pass of a step (CM's branch-off pass, CBDM's batched pair, the shared encoder) inside
    one forward. The passes run under the precision's autocast; the U-Net returns float32."""

    def __init__(self, net: nn.Module, method, precision: str):
        super().__init__()
        self.net, self.method, self.precision = net, method, precision

    def forward(self, x0: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        with accel.autocast(self.precision, x0.device):
            out = self.method(self.net, x0, y)
        return out.loss, out.stats, out.per_sample


class Trainer:
    """One optimisation step (forward, backward, clipping, Adam, EMA) that leaves every number on
    the device, and the running sums the loop logs.

    NaN guard: a step whose loss is not finite changes neither the weights, nor Adam's state, nor
    the EMA, and is counted. In one process with PyTorch's default Adam the loss is checked on the
    host before the backward pass, as the loop always did (on the CPU that read costs nothing).
    Otherwise the check is on the gradient norm after the backward pass (a non-finite loss makes it
    non-finite; under torchrun it is the all-reduced norm, so every rank decides alike), and with
    fused Adam it never leaves the device: `found_inf` skips the update, the EMA lerps by 0.
    """

    def __init__(self, net: nn.Module, method, cfg: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        self.net = net.to(device).train()
        # The EMA copy after the layout change (its tensors have the weights' strides, as the fused
        # _foreach kernels need) and before compiling (a plain module, not compiled wrappers).
        accel.prepare_network(net, channels_last=cfg["channels_last"], compile=False)
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        accel.prepare_network(net, channels_last=cfg["channels_last"], compile=cfg["compile"])
        objective = Objective(net, method, cfg["precision"])
        # Unused parameters exist on some steps (the class embedding when the batch's labels are
        # dropped); their gradients stay None on every rank, as in one process.
        self.objective = (DistributedDataParallel(objective, find_unused_parameters=True)
                          if distributed.world_size() > 1 else objective)
        # Only what trains (every weight, or a fine-tuning's adapters) is optimised and averaged.
        trains = [p.requires_grad for p in net.parameters()]
        self.params = [p for p, t in zip(net.parameters(), trains) if t]
        self.ema_params = [p for p, t in zip(self.ema.parameters(), trains) if t]
        mismatch = foreach_mismatch(self.ema_params, self.params)
        if mismatch:  # still correct, but one kernel launch per tensor and step
            log.warning("the EMA update misses the fused multi-tensor kernels: %s", mismatch)
        self.optimizer = accel.make_adam(self.params, lr=cfg["lr"], kernel=cfg["adam"], device=device)
        self.on_device = accel.skips_on_device(self.optimizer)
        self.loss_check = not self.on_device and distributed.world_size() == 1
        # float64 sums: the same numbers the host's Python floats gave before they moved here.
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)  # skipped steps, all so far
        self.last_bad = torch.zeros((), device=device)  # the latest skipped step's loss, for the message
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the log window's (sum, count)
        # The base loss per class over the window (sum, count): the per-class training loss.
        classes = getattr(net, "num_classes", None) or 0
        self.class_sums = torch.zeros((2, classes), dtype=torch.float64, device=device)

    def step(self, x0: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats, per_sample = self.objective(accel.to_layout(x0, self.cfg["channels_last"]), y)
        if self.loss_check and not torch.isfinite(loss):
            self._count_bad(torch.ones((), dtype=torch.bool, device=self.device), loss)
            return
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg["grad_clip"])
        bad = ~torch.isfinite(grad_norm)
        self._count_bad(bad, loss)
        if self.on_device:
            self.optimizer.found_inf = bad.float()  # fused Adam skips the update (GradScaler's protocol)
        elif not self.loss_check and bad:           # under torchrun without fused Adam: a host read
            return
        self.optimizer.step()
        ema_update(self.ema_params, self.params, 1.0 - self.cfg["ema_decay"], bad if self.on_device else None)
        good = (~bad).double()
        for key, value in {"loss": loss, "grad_norm": grad_norm, **stats}.items():
            value = torch.where(bad, 0.0, value.detach().double())  # a skipped step adds nothing
            # (sum, count) per key: a statistic may exist on some steps only (CBDM's on conditional ones).
            total, count = self.sums.get(key, (0.0, 0.0))
            self.sums[key] = (value + total, good + count)
        if per_sample is not None and self.class_sums.shape[1]:
            per_sample = per_sample.double()
            self.class_sums.index_add_(1, y, torch.stack([per_sample, torch.ones_like(per_sample)]) * good)

    def _count_bad(self, bad: torch.Tensor, loss: torch.Tensor) -> None:
        self.nonfinite += bad
        self.last_bad = torch.where(bad, loss.detach(), self.last_bad)

    def read_window(self) -> tuple[dict[str, float], int]:
        """The log window's means over its finite steps (and over the ranks; empty if none) and the
        count of skipped steps so far: one read from the device. The window starts again."""
        keys = list(self.sums)
        values = torch.cat([torch.stack([self.nonfinite, *(part for k in keys for part in self.sums[k])]),
                            self.class_sums.flatten()])
        nonfinite, *sums = distributed.mean_over_ranks(values).tolist()
        classes = self.class_sums.shape[1]
        n = 2 * len(keys)
        sums, class_totals, class_counts = sums[:n], sums[n:n + classes], sums[n + classes:]
        self.sums.clear()
        self.class_sums.zero_()
        means = {k: total / count for k, total, count in zip(keys, sums[::2], sums[1::2]) if count}
        if means and classes:
            means.update({f"loss_class_{c}": total / count
                          for c, (total, count) in enumerate(zip(class_totals, class_counts)) if count})
        return means, int(nonfinite)


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], weight: float,
               skip: torch.Tensor | None = None) -> None:
    """ema <- ema + weight (params - ema), in multi-tensor kernels over the whole list.

    weight is a Python float: the fused _foreach kernels take one host scalar for every tensor
    (a list of 0-dim tensor weights fails their same-shape condition and runs one lerp per tensor).
    skip: a 0-dim device bool (the step was not finite) that makes the update a no-op without a host
    read; the weight then is a device tensor, applied by _foreach_mul_'s one-tensor form.
    """
    if skip is None:
        torch._foreach_lerp_(ema, params, weight)
        return
    delta = torch._foreach_sub(params, ema)
    torch._foreach_mul_(delta, torch.where(skip, 0.0, weight).to(ema[0].dtype))
    torch._foreach_add_(ema, delta)


def foreach_mismatch(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    """Why two tensor lists would miss the fused _foreach kernels' fast path (the same device,
    dtype and strides pairwise, dense tensors, one device and dtype per list), or "" when they meet it."""
    if len(a) != len(b):
        return f"{len(a)} tensors against {len(b)}"
    kinds = {(x.device, x.dtype) for x in (*a, *b)}
    if len(kinds) > 1:
        return f"more than one device/dtype: {sorted(map(str, kinds))}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.stride() != y.stride():
            return f"tensor {i}: shape {tuple(x.shape)} strides {x.stride()} against {tuple(y.shape)} {y.stride()}"
        if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
            return f"tensor {i}: not dense (strides {x.stride()})"
    return ""


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
    dev = distributed.init(str(resolve_device(device)))
    accel.configure_backends(cfg["precision"], dev)
    main = distributed.is_main()
    run = {"manifest": manifest["content_sha256"], "model": experiment["model"], "method": method_name,
           "method_params": resolve_params(method_name, method_params), "seed": seed,
           "diffusion": experiment["diffusion"], "hflip": experiment["data"]["hflip"], "train": dict(cfg),
           "threads": torch.get_num_threads()}  # parallel sums round by the thread count
    if distributed.world_size() > 1:  # and by the process count (the all-reduce)
        run["processes"] = distributed.world_size()
    start_from = load_pretrained(pretrained) if pretrained is not None else None
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
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    if frozen:  # and then the buffers (prompt embeddings): they never train, they are the pretrained model's
        frozen |= set(net.state_dict()) - {name for name, _ in net.named_parameters()}
    sampler = EpochSampler(len(y_all), cfg["batch_size"], seed)
    rows = distributed.local_rows(sampler.batch_size)
    start, history, nonfinite = 0, [], 0

    state = _load_latest(folder, cfg["steps"])
    if state is not None:
        _load_trained(net, state["model"], frozen)
        _load_trained(ema, state["ema"], frozen)
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"], dev)
        start, history, nonfinite = int(state["step"]), list(state["history"]), int(state["nonfinite"])
        trainer.nonfinite.fill_(nonfinite)

    def save_checkpoint(step: int) -> None:
        if not main:
            return
        io.save_torch(folder / f"step_{step:09d}.pt", {
            "format": CHECKPOINT_FORMAT, "step": step, "run": json.dumps(run, sort_keys=True),
            "model": _without(net.state_dict(), frozen), "ema": _without(ema.state_dict(), frozen),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(), "rng": _rng_state(dev), "history": history,
            "nonfinite": nonfinite,
        })
        for old in _checkpoints(folder)[cfg["keep_checkpoints"]:]:
            old.unlink(missing_ok=True)

    def check_nonfinite(count: int, step: int) -> None:
        if count > nonfinite:
            log.warning("%s: %d non-finite loss(es) skipped by step %d (%d of at most %d)", method_name,
                        count - nonfinite, step, count, cfg["max_nonfinite_steps"])
        if count > cfg["max_nonfinite_steps"]:
            kept = _checkpoints(folder)
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
        # Linear warm-up, then constant.
        trainer.step(x0, y, cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup_steps"])))
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

    if main and not _holds(out, folder.name, cfg["steps"]):  # else: leave the same result byte-identical
        io.save_torch(out, {"format": "cm.model/1", "config": config, "method": method_name,
                            "step": cfg["steps"], "fingerprint": folder.name,
                            "state_dict": net.state_dict(), "ema": ema.state_dict(),
                            **({"codec": codec} if codec is not None else {})})  # a latent model's VAE
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


def _without(state: dict, frozen: set[str]) -> dict:
    return {k: v for k, v in state.items() if k not in frozen}


def _load_trained(module: nn.Module, state: dict, frozen: set[str]) -> None:
    """Load a checkpoint's weights; those left out must be exactly the frozen ones."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or set(missing) != frozen:
        raise io.CorruptFileError(f"checkpoint does not fit the network: missing {sorted(set(missing) - frozen)[:3]}, "
                                  f"unexpected {unexpected[:3]}")


def _to_device(idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Batch indices on the device without waiting for it (pinned memory, asynchronous copy)."""
    return idx.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else idx


def _holds(path: Path, fingerprint_: str, step: int) -> bool:
    """Whether `path` already is the final checkpoint of this run (rewriting it would give the same
    bytes but a new modification time, which Snakemake takes for a newer input downstream)."""
    try:
        state = io.load_torch(path)
    except (FileNotFoundError, io.CorruptFileError):
        return False
    return state.get("fingerprint") == fingerprint_ and state.get("step") == step


def write_history(path: Path, history: list[dict]) -> None:
    """The logged loss curve as CSV (a DVC plot)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    with io.atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys or ["step"])
        writer.writeheader()
        writer.writerows(history)
