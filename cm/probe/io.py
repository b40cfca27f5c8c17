"""The probe stage's inputs and run: a trained checkpoint and its training set in, the three probes'
results out (a JSON-able dict, written by the CLI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cm.checkpoint import has_reserved_capacity, load_trained
from cm.data.images import scale, to_nchw
from cm.diffusion import GaussianDiffusion
from cm.lowrank import branches
from cm.probe.dominance import gradient_dominance
from cm.probe.pruning import pruning_probe
from cm.probe.theta_g import theta_g_probe


def as_model_inputs(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored uint8 (N, H, W, C) images and their labels -> float32 (N, C, H, W) in [-1, 1] and int64 (N,)."""
    return scale(to_nchw(images)), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def probe_model(model_path: str | Path, manifest: dict, experiment: dict) -> dict:
    """Every probe of one trained model on its training set (experiment's `probe` settings): the
    pruning probe, for a model with low-rank branches the theta_g probe (else None), and the
    gradient dominance over the manifest's many/medium/few split."""
    from cm.data import load_training_set

    settings = experiment["probe"]
    net, state = load_trained(model_path)
    config, codec = state["config"], state.get("codec")  # codec: a latent model's VAE
    del state  # its weights are in `net`: a large checkpoint is not held twice while probing
    if config["num_classes"] != manifest["num_classes"]:
        raise ValueError(f"{model_path}: the model has {config['num_classes']} classes, the training set "
                         f"{manifest['num_classes']}: not a model of this experiment")
    data = load_training_set(manifest)
    if codec is None:
        images, labels = as_model_inputs(data.images, data.labels)
    else:  # a latent model's losses are on the latents of the images
        from cm.finetune.diffusers_models import load_codec

        images = load_codec(codec).encode_stored(to_nchw(data.images))
        labels = torch.as_tensor(np.asarray(data.labels), dtype=torch.int64)
    diffusion = GaussianDiffusion(**experiment["diffusion"])
    scored = dict(draws=settings["draws"], seed=settings["seed"], batch_size=settings["batch_size"],
                  class_counts=manifest["class_counts"])
    has_branches, theta_g_net = any(True for _ in branches(net)), None
    if config.get("lora"):  # a fine-tuning: probe the plain model its adapters merge into
        from cm.finetune import merged

        if has_reserved_capacity(config):
            theta_g_net, has_branches = merged(net, drop=("expert",)).eval(), True
        net = merged(net).eval().requires_grad_(True)  # every weight, for the gradient dominance
    return {
        "pruning": pruning_probe(net, images, labels, manifest["num_classes"], diffusion,
                                 fraction=settings["fraction"], scope=settings["scope"], **scored),
        "theta_g": theta_g_probe(net, images, labels, manifest["num_classes"], diffusion, theta_g_net=theta_g_net,
                                 **scored) if has_branches else None,
        "dominance": gradient_dominance(net, images, labels, manifest["splits"], diffusion,
                                        batches=settings["dominance_batches"], batch_size=settings["batch_size"],
                                        seed=settings["seed"]),
    }
