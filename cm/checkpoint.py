"""The checkpoint files of the pipeline: their formats, writing, reading and checking, and the
network a checkpoint describes.

    TRAINING      a training run's resumable state, every `checkpoint_every` steps (train, pretrain)
    MODEL         a trained model: train's final checkpoint, or the starting model pretrain writes;
                  `state_dict` and `ema` weights, the `config` that rebuilds the network. A
                  fine-tuning that keeps the pretrained weights frozen holds its adapters only and
                  a `pretrained` reference (path and sha256) to the starting model that has the rest
    MERGED        a plain U-Net, its low-rank branches or adapters folded in (merge)
    FROM_SCRATCH  pretrain's record of an experiment that trains from scratch (no `finetune`)

Every file is written through cm/io.py's byte-stable `save_torch` and read with `load_torch`
(weights_only). A file of another kind ends in one line naming it, the format expected and the
one found.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from cm import io
from cm.errors import DataError
from cm.lowrank import add_lowrank_branches
from cm.models import build_model

log = logging.getLogger(__name__)

TRAINING = "cm.train/1"
MODEL = "cm.model/1"
MERGED = "cm.merged/1"
FROM_SCRATCH = "cm.from_scratch/1"

WEIGHTS = ("ema", "state_dict")
"""The weights of a MODEL checkpoint: the EMA (what is sampled and evaluated), or the optimiser's."""


def load(path: str | Path, expected_format: str) -> dict:
    """Load a checkpoint safely and check it is the kind of file the stage needs."""
    state = io.load_torch(path)
    if not isinstance(state, dict) or state.get("format") != expected_format:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise io.CorruptFileError(f"{path}: expected a {expected_format} checkpoint, found {found!r}")
    return state


# ----------------------------------------------------------------------------------------------
# The network a checkpoint describes


def build_network(config: dict, with_branches: bool = True, base: dict | None = None) -> nn.Module:
    """Rebuild the U-Net described by a checkpoint's config, with its branches when it has some;
    `base`: the weights of the network before its adapters (a fine-tuning's pretrained ones)."""
    net = build_model(config)
    if base is not None:
        net.load_state_dict(base)
    if with_branches and config.get("rank_ratio"):
        # A config without branch_scale / branch_layers means the released values.
        add_lowrank_branches(net, config["rank_ratio"], scale=config.get("branch_scale", 1.0),
                             layers=config.get("branch_layers", "decoder"))
    if with_branches and config.get("lora"):  # a fine-tuning's adapters (peft, the finetune extra)
        from cm.finetune import attach
        from cm.methods.lora import lora_settings

        attach(net, lora_settings(config["lora"]), tuple(config["lora"]["adapters"]))
    return net


def has_reserved_capacity(config: dict) -> bool:
    """Whether a trained checkpoint has CM's reserved capacity, which theta_g drops: low-rank branches,
    or the `expert` LoRA adapter of a fine-tuning."""
    return bool(config.get("rank_ratio")) or "expert" in (config.get("lora") or {}).get("adapters", ())


# ----------------------------------------------------------------------------------------------
# TRAINING: step_<step>.pt in a run's folder


def training_checkpoints(folder: Path) -> list[Path]:
    """A run's training checkpoints, newest first."""
    return sorted(folder.glob("step_*.pt"), reverse=True)


def save_training(folder: Path, *, step: int, run: dict, model: dict, ema: dict, optimizer: dict, sampler: dict,
                  rng: dict, history: list[dict], nonfinite: int, keep: int) -> None:
    """Write the state after `step` steps into the run's folder; keep the newest `keep` checkpoints."""
    io.save_torch(folder / f"step_{step:09d}.pt", {
        "format": TRAINING, "step": step, "run": json.dumps(run, sort_keys=True),
        "model": model, "ema": ema, "optimizer": optimizer,
        "sampler": sampler, "rng": rng, "history": history,
        "nonfinite": nonfinite,
    })
    for old in training_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)


def load_latest_training(folder: Path, max_step: int) -> dict | None:
    """The newest readable checkpoint at or before `max_step` (a run shortened after a longer one
    must not start past its end); a corrupt one is reported and the previous one tried."""
    for path in training_checkpoints(folder):
        if int(path.stem.removeprefix("step_")) > max_step:
            continue
        try:
            state = io.load_torch(path)
            if state.get("format") == TRAINING:
                log.info("resuming from %s", path)
                return state
            log.warning("%s: not a training checkpoint of this version; ignored", path)
        except io.CorruptFileError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
    return None


def frozen_names(net: nn.Module) -> set[str]:
    """The state-dict entries a fine-tuning keeps as pretrained: the parameters that do not train and,
    when there are any, the buffers (prompt embeddings). Empty for a network that trains whole."""
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    if frozen:
        frozen |= set(net.state_dict()) - {name for name, _ in net.named_parameters()}
    return frozen


def without(state: dict, frozen: set[str]) -> dict:
    """A state dict less the frozen entries (a fine-tuning's pretrained weights are not checkpointed)."""
    return {k: v for k, v in state.items() if k not in frozen}


def load_weights(module: nn.Module, state: dict, frozen: set[str]) -> None:
    """Load a checkpoint's weights; those left out must be exactly the frozen ones."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or set(missing) != frozen:
        raise io.CorruptFileError(f"checkpoint does not fit the network: missing {sorted(set(missing) - frozen)[:3]}, "
                                  f"unexpected {unexpected[:3]}")


# ----------------------------------------------------------------------------------------------
# MODEL: train's final checkpoint


def save_model(path: Path, *, config: dict, method: str, step: int, fingerprint: str, state_dict: dict,
               ema: dict, codec: dict | None = None, pretrained: Path | None = None) -> None:
    """A trained model; `codec`: a latent model's VAE. `pretrained`: the starting model whose frozen
    weights the state dicts leave out (and which holds the codec), referenced by path and sha256."""
    reference = {"pretrained": {"path": str(pretrained), "sha256": io.file_sha256(pretrained)}} if pretrained else {}
    io.save_torch(path, {"format": MODEL, "config": config, "method": method,
                         "step": step, "fingerprint": fingerprint,
                         "state_dict": state_dict, "ema": ema,
                         **({"codec": codec} if codec is not None else {}), **reference})


def load_model(path: str | Path) -> dict:
    """A MODEL checkpoint with complete weights: a fine-tuning's adapters joined with the frozen
    weights of the starting model it references, which must be the file it trained from."""
    return _load_complete(path)[0]


def _load_complete(path: str | Path) -> tuple[dict, nn.Module | None]:
    """`load_model`'s checkpoint, and for a fine-tuning the network it built to join the weights (its
    pretrained weights in place, the adapters as initialised), so that a caller need not build it again."""
    state = load(path, MODEL)
    reference = state.get("pretrained")
    if reference is None:
        return state, None
    source = Path(reference["path"])
    if not source.is_file():
        raise io.CorruptFileError(f"{path}: its pretrained weights {source} are missing; the experiment's pretrain "
                                  f"stage writes them (a fine-tuning's checkpoint holds its adapters only)")
    digest = io.file_sha256(source)
    if digest != reference["sha256"]:
        raise io.CorruptFileError(f"{path}: its pretrained weights {source} are not the file it was trained from "
                                  f"(sha256 {digest[:16]}..., trained from {reference['sha256'][:16]}...); "
                                  f"train it again")
    start = load_pretrained(source)
    net = build_network(state["config"], base=start["ema"])
    full, frozen = net.state_dict(), frozen_names(net)
    for weights in WEIGHTS:
        if set(full) - set(state[weights]) != frozen or set(state[weights]) - set(full):
            raise io.CorruptFileError(f"{path}: its {weights} does not hold exactly the adapters of the network it "
                                      f"describes")
        state[weights] = {name: state[weights].get(name, value) for name, value in full.items()}
    if start.get("codec") is not None:
        state["codec"] = start["codec"]
    return state, net


def holds_model(path: Path, fingerprint: str, step: int) -> bool:
    """Whether `path` already is the final checkpoint of this run (rewriting it would give the same
    bytes but a new modification time, which Snakemake takes for a newer input downstream)."""
    try:
        state = io.load_torch(path)
    except (FileNotFoundError, io.CorruptFileError):
        return False
    return state.get("fingerprint") == fingerprint and state.get("step") == step


def load_trained(path: str | Path, weights: str = "ema") -> tuple[nn.Module, dict]:
    """The network of a trained MODEL checkpoint, with its low-rank branches (or adapters) when it has
    some, in eval mode, and the whole checkpoint (`config`, a latent model's `codec`). `weights`: the
    EMA weights (what is sampled and evaluated) or the raw optimiser weights (`"state_dict"`)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights = {weights!r} is not allowed: one of {', '.join(WEIGHTS)}")
    state, net = _load_complete(path)
    net = net if net is not None else build_network(state["config"])
    net.load_state_dict(state[weights])
    return net.eval(), state


# ----------------------------------------------------------------------------------------------
# The pretrain stage's output: a MODEL to start from, or the FROM_SCRATCH record


def save_from_scratch(path: Path) -> None:
    io.save_torch(path, {"format": FROM_SCRATCH})


def save_pretrained(path: Path, record: dict, source: dict[str, str]) -> None:
    """A starting model read from a diffusers folder: `record` (config, weights, codec) and the sha256
    of each of the folder's files (`source`)."""
    io.save_torch(path, {"format": MODEL, **record, "method": "pretrained", "step": 0, "source": source})


def load_pretrained(path: str | Path) -> dict | None:
    """The EMA weights, model config and latent codec (None: pixels) of a pretrain stage's output
    ({"ema", "config", "codec"}), or None when the experiment trains from scratch."""
    state = io.load_torch(path)
    if state.get("format") == FROM_SCRATCH:
        return None
    if state.get("format") != MODEL or "ema" not in state:
        raise DataError(f"{path}: not a pretrain stage's output (format {state.get('format')!r}); "
                        f"run the experiment's pretrain stage again")
    return {"ema": state["ema"], "config": state["config"], "codec": state.get("codec")}


# ----------------------------------------------------------------------------------------------
# MERGED


def save_merged(path: str | Path, *, config: dict, method: str, step: int, state_dict: dict, merge: dict,
                codec: dict | None = None) -> None:
    """A plain U-Net and its merge report; `codec`: a latent model's VAE, for sampling."""
    io.save_torch(path, {"format": MERGED, "config": config,
                         "method": method, "step": step,
                         "state_dict": state_dict, "merge": merge, **({"codec": codec} if codec else {})})


def load_merged(path: str | Path) -> tuple[nn.Module, dict]:
    """The plain U-Net of a merged checkpoint, in eval mode, and the checkpoint's metadata."""
    state = load(path, MERGED)
    net = build_network(state["config"], with_branches=False)
    net.load_state_dict(state["state_dict"])
    return net.eval(), {k: v for k, v in state.items() if k != "state_dict"}
