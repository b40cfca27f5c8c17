"""A small local classifier whose penultimate layer is the feature space for FID/KID.

Inception features are meaningless for 8x8 digits, so the pipeline trains this net on the
balanced real data instead: its ``features`` feed FID/KID, its predictions give per-class
accuracy of generated samples.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm.auto import tqdm

from cm import io
from cm.data.images import to_model_range
from cm.metrics.distances import per_class_accuracy


def _block(c_in: int, c_out: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: features of a sample must not depend on its batch.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.ReLU(inplace=True)
    )


class FeatureNet(nn.Module):
    """CNN for (C, H, W) inputs in [-1, 1]: conv stages -> GAP -> Linear+ReLU (features) -> logits.

    Stage i has two conv blocks of ``width * 2**i`` channels followed by a 2x2 max-pool; the
    number of stages is chosen so the last map is 4x4 (8x8 -> 1 stage, 32x32 -> 3 stages).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        feature_dim: int = 64,
        width: int = 32,
    ):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
        self.config = dict(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes,
            feature_dim=feature_dim, width=width,
        )
        layers, c = [], in_channels
        for i in range(int(math.log2(image_size // 4))):
            c_out = width * 2**i
            layers += [_block(c, c_out), _block(c_out, c_out), nn.MaxPool2d(2)]
            c = c_out
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (N, c)
        self.embed = nn.Sequential(nn.Linear(c, feature_dim), nn.ReLU(inplace=True))  # (N, D)
        self.head = nn.Linear(feature_dim, num_classes)  # (N, K)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> penultimate features (N, feature_dim)."""
        return self.embed(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> class logits (N, num_classes)."""
        return self.head(self.features(x))


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image of (N, C, H, W) by up to ``max_shift`` pixels (edge-replicated)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (N, C, H+2s, W+2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1, 1), generator=gen).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + dy  # (N, H, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + dx  # (N, 1, W)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)


def train_feature_net(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    test_fraction: float = 0.2,
    device: str = "cpu",
    augment: bool = False,
    progress: bool = True,
    **net_kwargs,
) -> tuple[FeatureNet, dict]:
    """Train a :class:`FeatureNet` on uint8 (N, H, W, C) images with a stratified held-out split.

    Adam with cosine learning-rate decay; minibatches drawn with replacement across epochs
    from a seeded permutation stream. ``augment`` adds random translations of up to
    ``H // 8`` pixels (no flips: they would corrupt digits). Deterministic under ``seed``
    on CPU; the global torch RNG is left untouched. Extra kwargs go to ``FeatureNet``
    (e.g. ``feature_dim``, ``width``).

    Returns the model in eval mode and {"test_accuracy", "per_class_test_accuracy",
    "train_size", "test_size"}.
    """
    images, labels = np.asarray(images), np.asarray(labels).astype(np.int64)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    idx_train, idx_test = train_test_split(
        np.arange(len(images)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    _, h, _, c = images.shape

    with torch.random.fork_rng(devices=[]):  # seeded init without clobbering the global RNG
        torch.manual_seed(seed)
        model = FeatureNet(in_channels=c, image_size=h, num_classes=num_classes, **net_kwargs)
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)  # augmentation offsets
    rng = np.random.default_rng(seed)  # minibatch order
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))

    order = np.empty(0, dtype=np.int64)
    bar = tqdm(range(steps), desc="feature net", disable=not progress)
    for _ in bar:
        if len(order) < batch_size:  # refill with a fresh epoch permutation
            order = np.concatenate([order, rng.permutation(idx_train)])
        batch, order = order[:batch_size], order[batch_size:]
        x = to_model_range(images[batch]).to(device)  # (B, C, H, W)
        if augment:
            x = _random_shift(x, max(1, h // 8), gen)
        loss = F.cross_entropy(model(x), torch.from_numpy(labels[batch]).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

    model.eval()
    _, pred = extract(model, images[idx_test], device=device)
    report = {
        "test_accuracy": float(np.mean(pred == labels[idx_test])),
        "per_class_test_accuracy": per_class_accuracy(pred, labels[idx_test], num_classes),
        "train_size": int(len(idx_train)),
        "test_size": int(len(idx_test)),
    }
    return model, report


@torch.no_grad()
def extract(
    model: FeatureNet, images: np.ndarray, *, batch_size: int = 512, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, C), or float in [0, 1] (unquantised samples) -> (features float64 (N, D),
    predicted labels int64 (N,)), in eval mode."""
    images = np.asarray(images)
    if images.ndim != 4 or not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise ValueError(f"images must be uint8 or float (N, H, W, C), got {images.dtype} {images.shape}")
    was_training = model.training
    model.eval().to(device)
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(to_model_range(images[i : i + batch_size]).to(device))  # (B, D)
        feats.append(f.double().cpu().numpy())
        preds.append(model.head(f).argmax(1).cpu().numpy())
    model.train(was_training)
    d = model.config["feature_dim"]
    return (
        np.concatenate(feats) if feats else np.zeros((0, d)),
        np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, np.int64),
    )


def save_feature_net(model: FeatureNet, report: dict, path: str | os.PathLike) -> None:
    """Write {"config", "state_dict", "report"} to ``path`` atomically."""
    io.save_torch(path, {
        "config": dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "report": report,
    })


def load_feature_net(path: str | os.PathLike) -> tuple[FeatureNet, dict]:
    """Rebuild a saved :class:`FeatureNet` (eval mode, CPU) and return it with its report.

    Raises CorruptFileError naming ``path`` if the file is corrupt, truncated or not a feature net.
    """
    payload = io.load_torch(path)
    try:
        model = FeatureNet(**payload["config"])
        model.load_state_dict(payload["state_dict"])
        report = payload["report"]
    except Exception as e:  # a readable checkpoint of something else
        raise io.CorruptFileError(f"{path}: not a feature network ({type(e).__name__}: {e})") from None
    return model.eval(), report
