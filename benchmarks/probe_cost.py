"""What the probe stage costs per model: measured on the embedded digits, projected for the paper's
U-Net on CIFAR-100-LT.

    python benchmarks/probe_cost.py [--threads 1]

The probes' work does not depend on the weights, so untrained networks are timed. Digits (`small`
U-Net with CM's branches, 707 images of 8x8): the whole `probe_model` with the default settings.
`ddpm_cifar` (35.7 M parameters, CM's branches) on CIFAR-100-LT at ratio 100 (10,847 images of
32x32): the time of one 64-image loss pass and of one 64-image dominance batch are measured on
random tensors, then multiplied by the passes the default settings make (pruning and theta_g: 2 x
images x draws forward passes each; dominance: `dominance_batches` forward + 3 backward passes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cm import config as cfg
from cm.data import build_manifest
from cm.diffusion import GaussianDiffusion
from cm.lowrank import add_lowrank_branches
from cm.models import build_unet
from cm.probe import gradient_dominance, per_image_losses, probe_model

ROOT = Path(__file__).resolve().parent.parent
CIFAR100_LT_IMAGES = 10_847  # CIFAR-100-LT at ratio 100 (LDAM-DRW's split)


def digits_seconds(params: dict, folder: Path) -> float:
    """The whole probe stage's computation for one digits CM model."""
    from cm import io

    experiment = params["experiments"]["digits_lt"]
    manifest = build_manifest(experiment["data"])
    config = {"preset": experiment["model"], "num_classes": 10, "in_channels": 1, "image_size": 8,
              "rank_ratio": 0.1, "branch_scale": 1.0, "branch_layers": "decoder"}  # cm/train.py's model_config
    net = build_unet(config["preset"], num_classes=10, in_channels=1, image_size=8)
    add_lowrank_branches(net, config["rank_ratio"])
    io.save_torch(folder / "model.pt", {"format": "cm.model/1", "config": config, "method": "cm", "step": 0,
                                        "state_dict": net.state_dict(), "ema": net.state_dict()})
    t0 = time.perf_counter()
    probe_model(folder / "model.pt", manifest, experiment)
    return time.perf_counter() - t0


def cifar_projection(probe: dict) -> dict:
    """Seconds of the default probes for ddpm_cifar + CM branches on CIFAR-100-LT, from timed 64-image passes."""
    net = build_unet("ddpm_cifar", num_classes=100, in_channels=3, image_size=32)
    add_lowrank_branches(net, 0.1)
    net.eval()
    diffusion = GaussianDiffusion()
    batch = probe["batch_size"]
    images, labels = torch.rand(batch, 3, 32, 32) * 2 - 1, torch.arange(batch) * 100 // batch  # every group
    t0 = time.perf_counter()
    per_image_losses(net, images, labels, diffusion, draws=1, seed=0, batch_size=batch)
    loss_pass = time.perf_counter() - t0
    splits = {"many": list(range(0, 33)), "medium": list(range(33, 66)), "few": list(range(66, 100))}
    t0 = time.perf_counter()
    gradient_dominance(net, images, labels, splits, diffusion, batches=1, batch_size=batch, seed=0)
    dominance_batch = time.perf_counter() - t0
    per_loss_sweep = loss_pass * CIFAR100_LT_IMAGES * probe["draws"] / batch
    return {"loss_pass_64": loss_pass, "dominance_batch_64": dominance_batch,
            "pruning": 2 * per_loss_sweep, "theta_g": 2 * per_loss_sweep,
            "dominance": dominance_batch * probe["dominance_batches"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = cfg.load_params(ROOT / "params.yaml")
    probe = params["experiments"]["digits_lt"]["probe"]
    with tempfile.TemporaryDirectory() as tmp:
        digits = digits_seconds(params, Path(tmp))
    print(f"torch {torch.__version__}, {args.threads} thread(s); probe settings {probe}")
    print(f"digits (small U-Net + CM branches, 707 images): whole probe stage {digits:.1f} s")
    cifar = cifar_projection(probe)
    total = cifar["pruning"] + cifar["theta_g"] + cifar["dominance"]
    print(f"ddpm_cifar + CM branches, one 64-image loss pass {cifar['loss_pass_64']:.2f} s, one 64-image "
          f"dominance batch {cifar['dominance_batch_64']:.2f} s")
    print(f"CIFAR-100-LT ({CIFAR100_LT_IMAGES} images), projected on this CPU: "
          f"pruning {cifar['pruning'] / 60:.1f} min, "
          f"theta_g {cifar['theta_g'] / 60:.1f} min, dominance {cifar['dominance'] / 60:.1f} min; "
          f"{total / 60:.1f} min per CM model")


if __name__ == "__main__":
    main()
