"""The training loop shared by every method: Adam with warm-up, clipping, EMA, checkpoints, resume.

A run checkpoints every `checkpoint_every` steps into a folder named by the fingerprint of its
settings, and a later run with the same settings resumes from the newest checkpoint there. The
checkpoint holds everything that decides the remaining steps (model, EMA, optimiser, data order,
RNG states), so a resumed run ends with the same weights as an uninterrupted one on the CPU.
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
from tqdm import tqdm

from cm import io
from cm.data import load_training_set
from cm.data.images import scale, to_nchw
from cm.diffusion import GaussianDiffusion
from cm.errors import NonFiniteLossError
from cm.methods import build_method, resolve_params
from cm.models import build_unet

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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def model_config(manifest: dict, experiment: dict, method) -> dict:
    """What is needed to rebuild the network (and its low-rank branches) from a state dict."""
    height, width, channels = manifest["image_shape"]
    return {
        "preset": experiment["model"],
        "num_classes": manifest["num_classes"],
        "in_channels": channels,
        "image_size": height,
        "rank_ratio": method.rank_ratio,
        "branch_scale": method.branch_scale,
        "branch_layers": method.branch_layers,
    }


def train(*, manifest: dict, experiment: dict, method_name: str, method_params: dict, seed: int,
          out: Path, checkpoint_root: Path, history_out: Path, device: str = "auto",
          progress: bool = True) -> dict:
    """Train one method with one seed; write the final checkpoint `out` and the loss history CSV.

    method_params: params.yaml's whole `method_params` mapping (a CM variant reads `cm` and its base's
    section).
    """
    cfg = experiment["train"]
    dev = resolve_device(device)
    run = {"manifest": manifest["content_sha256"], "model": experiment["model"], "method": method_name,
           "method_params": resolve_params(method_name, method_params), "seed": seed,
           "diffusion": experiment["diffusion"], "hflip": experiment["data"]["hflip"], "train": dict(cfg),
           "threads": torch.get_num_threads()}  # parallel sums round by the thread count
    folder = Path(checkpoint_root) / fingerprint(run)

    torch.manual_seed(seed)
    data = load_training_set(manifest)
    x_all = to_nchw(data.images).to(dev)  # kept as uint8; each batch is scaled to [-1, 1]
    y_all = torch.as_tensor(data.labels).to(dev)
    diffusion = GaussianDiffusion(**experiment["diffusion"])
    method = build_method(method_name, diffusion=diffusion, train=cfg, all_params=method_params,
                          class_counts=manifest["class_counts"])
    config = model_config(manifest, experiment, method)
    net = build_unet(config["preset"], num_classes=config["num_classes"],
                     in_channels=config["in_channels"], image_size=config["image_size"])
    method.prepare(net)
    net.to(dev).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    sampler = EpochSampler(len(y_all), cfg["batch_size"], seed)
    start, history, nonfinite = 0, [], 0

    state = _load_latest(folder, cfg["steps"])
    if state is not None:
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        start, history, nonfinite = int(state["step"]), list(state["history"]), int(state["nonfinite"])

    def save_checkpoint(step: int) -> None:
        io.save_torch(folder / f"step_{step:09d}.pt", {
            "format": CHECKPOINT_FORMAT, "step": step, "run": json.dumps(run, sort_keys=True),
            "model": net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(), "rng": _rng_state(), "history": history,
            "nonfinite": nonfinite,
        })
        for old in _checkpoints(folder)[cfg["keep_checkpoints"]:]:
            old.unlink(missing_ok=True)

    params, ema_params = list(net.parameters()), list(ema.parameters())
    window: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], desc=f"train {method_name}",
               disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for step in bar:
        for group in optimizer.param_groups:  # linear warm-up, then constant
            group["lr"] = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup_steps"]))
        idx = sampler.next().to(dev)
        x0, y = scale(x_all[idx]), y_all[idx]
        if experiment["data"]["hflip"]:
            flip = torch.rand(len(x0), device=dev) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
        result = method(net, x0, y)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(result.loss):
            # NaN guard: skip the update (a bounded number of times), never checkpoint bad weights.
            nonfinite += 1
            if nonfinite > cfg["max_nonfinite_steps"]:
                kept = _checkpoints(folder)
                raise NonFiniteLossError(
                    f"{method_name}: non-finite loss ({result.loss.item()}) at step {step + 1}, "
                    f"{nonfinite} such step(s) > train.max_nonfinite_steps = {cfg['max_nonfinite_steps']}; "
                    f"last good checkpoint kept: {kept[0] if kept else 'none yet'}")
            log.warning("%s: non-finite loss at step %d skipped (%d of at most %d)", method_name, step + 1,
                        nonfinite, cfg["max_nonfinite_steps"])
        else:
            result.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            optimizer.step()
            with torch.no_grad():  # EMA of the weights, updated every step
                torch._foreach_lerp_(ema_params, params, 1.0 - cfg["ema_decay"])
            for key, value in {"loss": result.loss.item(), "grad_norm": grad_norm.item(), **result.stats}.items():
                window.setdefault(key, []).append(value)
        if ((step + 1) % cfg["log_every"] == 0 or step + 1 == cfg["steps"]) and window:
            history.append({"step": step + 1, **{k: sum(v) / len(v) for k, v in window.items()}})
            window.clear()
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", refresh=False)
        if (step + 1) % cfg["checkpoint_every"] == 0 or step + 1 == cfg["steps"]:
            save_checkpoint(step + 1)
    bar.close()
    seconds = time.perf_counter() - t0

    if not _holds(out, folder.name, cfg["steps"]):  # else: leave the same result byte-identical
        io.save_torch(out, {"format": "cm.model/1", "config": config, "method": method_name,
                            "step": cfg["steps"], "fingerprint": folder.name,
                            "state_dict": net.state_dict(), "ema": ema.state_dict()})
    write_history(history_out, history)
    steps_run = cfg["steps"] - start
    return {"steps": cfg["steps"], "resumed_from": start, "seconds": seconds,
            "seconds_per_step": seconds / steps_run if steps_run else 0.0,
            "final_loss": history[-1]["loss"] if history else float("nan"),
            "parameters": sum(p.numel() for p in net.parameters()), "nonfinite_steps": nonfinite,
            "history": history}


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
