"""clean-fid's Inception-v3 feature extractor, from a local weights file, plus the Inception Score.

The network is the TorchScript translation of TensorFlow's ``inception-2015-12-05`` graph that
clean-fid (and StyleGAN2-ADA) use, wrapped by ``cleanfid.inception_torchscript.InceptionV3W``.
Its weights are never downloaded here and nothing falls back to another network: the caller
names the file (params key ``evaluate.inception_weights``) or it must sit where clean-fid looks
(``/tmp/inception-2015-12-05.pt``); otherwise :func:`load_inception` says how to get it.

Preprocessing is clean-fid's mode "clean": each uint8 image is resized to 299x299 per channel
with PIL bicubic on float32 values (``cleanfid.resize.build_resizer("clean")``), giving float32
NCHW in [0, 255]; InceptionV3W normalises to [-1, 1] and returns the 2,048-d pool features.

The Inception Score needs the 1008-way classifier output. ``InceptionV3W`` only exposes the pool
features, but the TorchScript model it wraps (``extractor.base``) keeps its final layer as
``base.output`` (Linear 2048 -> 1008); ``base(img)`` itself would return softmax probabilities
but re-resizes internally with bilinear sampling. We therefore compute logits from the
clean-resized features as ``features @ base.output.weight.T`` without the bias, as the original
TF implementation and StyleGAN2-ADA (``no_output_bias=True``) do.
"""

from __future__ import annotations

import os
import platform
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from cleanfid.downloads_helper import inception_url as WEIGHTS_URL
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from scipy.special import log_softmax, rel_entr

from cm import io

WEIGHTS_NAME = "inception-2015-12-05.pt"  # InceptionV3W hard-codes this file name
PARAMS_KEY = "evaluate.inception_weights"
FEATURE_DIM, NUM_LOGITS = 2048, 1008
# Where clean-fid's own feature_extractor() keeps the file (cleanfid/features.py).
CLEANFID_WEIGHTS = Path("./" if platform.system() == "Windows" else "/tmp") / WEIGHTS_NAME


def _how_to_get(problem: str) -> str:
    return (
        f"{problem}. Download the weights clean-fid uses from {WEIGHTS_URL} (e.g. "
        f"`curl -L -o {WEIGHTS_NAME} {WEIGHTS_URL}` on a machine with network access) and either "
        f"set the params key `{PARAMS_KEY}` to the file (or to the folder holding it) or place it at "
        f"{CLEANFID_WEIGHTS}, where clean-fid looks. Nothing is downloaded or substituted automatically."
    )


def resolve_weights(weights_path: str | os.PathLike | None) -> Path:
    """The weights file named by ``weights_path`` (a file, or a folder holding WEIGHTS_NAME).

    None means clean-fid's standard location. Raises FileNotFoundError saying how to get it.
    """
    if weights_path is None:
        if CLEANFID_WEIGHTS.is_file():
            return CLEANFID_WEIGHTS
        raise FileNotFoundError(_how_to_get(
            f"Inception weights not found: no path given and clean-fid's standard file {CLEANFID_WEIGHTS} "
            "does not exist"))
    path = Path(weights_path).expanduser()
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(_how_to_get(f"Inception weights not found: {file} does not exist"))
    return file


def load_inception(weights_path: str | os.PathLike | None, device: str | torch.device = "cpu") -> InceptionV3W:
    """clean-fid's ``InceptionV3W(folder, download=False, resize_inside=False)`` in eval mode.

    ``weights_path``: the weights file (any name), the folder holding ``inception-2015-12-05.pt``,
    or None for clean-fid's standard location. Raises FileNotFoundError (with instructions) if
    it is missing and CorruptFileError naming the file if it is not the expected TorchScript model.
    """
    file = resolve_weights(weights_path)
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 flags torch.jit.load (called by clean-fid) as deprecated; it still works.
            warnings.simplefilter("ignore", FutureWarning)
            if file.name == WEIGHTS_NAME:
                net = InceptionV3W(str(file.parent), download=False, resize_inside=False)
            else:  # InceptionV3W only takes a folder: show it the file under the expected name
                with tempfile.TemporaryDirectory() as tmp:
                    os.symlink(file.resolve(), Path(tmp) / WEIGHTS_NAME)
                    net = InceptionV3W(tmp, download=False, resize_inside=False)  # loads into memory
    except Exception as err:  # zip/pickle errors, or a TorchScript file of another model
        raise io.CorruptFileError(
            f"{file}: not clean-fid's TorchScript Inception model ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); download it again from {WEIGHTS_URL}"
        ) from None
    return net.eval().to(device)


def _output_weight(extractor: torch.nn.Module) -> torch.Tensor:
    """(num_logits, D) weight of the TorchScript model's final classifier layer."""
    try:
        return extractor.base.output.weight
    except AttributeError:
        raise ValueError("this extractor has no classifier layer `base.output` (clean-fid's InceptionV3W "
                         "has one); logits for the Inception Score cannot be computed") from None


def _resized_batch(images: np.ndarray, resize, pool: ThreadPoolExecutor | None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, 299, 299) in [0, 255], clean-fid's 'clean' resize."""
    out = list(pool.map(resize, images)) if pool else [resize(x) for x in images]  # each (299, 299, 3)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def inception_features(
    extractor: torch.nn.Module,
    images_uint8_nhwc: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    *,
    logits: bool = False,
    num_workers: int = 0,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Pool features float64 (N, 2048) of uint8 (N, H, W, C) images, C in {1, 3}.

    Grayscale images are repeated to RGB (as clean-fid's PIL ``convert('RGB')`` does). With
    ``logits=True`` also returns the bias-free 1008-way logits (N, 1008) for the Inception
    Score. ``num_workers`` threads run the PIL resizing (the CPU bottleneck: ~5 ms per image).
    """
    images = np.asarray(images_uint8_nhwc)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, H, W, C) with C in (1, 3), got {images.dtype} {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    weight = _output_weight(extractor).to(device) if logits else None
    resize = build_resizer("clean")
    was_training = extractor.training
    extractor.eval()
    feats, outs = [], []
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            if batch.shape[-1] == 1:
                batch = np.repeat(batch, 3, axis=-1)  # (B, H, W, 3)
            f = extractor(_resized_batch(batch, resize, pool).to(device))  # (B, D)
            feats.append(f.double().cpu().numpy())
            if logits:
                outs.append(torch.nn.functional.linear(f, weight).double().cpu().numpy())  # (B, 1008)
    finally:
        if pool:
            pool.shutdown()
        extractor.train(was_training)
    if not feats:
        raise ValueError("no images given")
    feats = np.concatenate(feats)
    return (feats, np.concatenate(outs)) if logits else feats


def inception_score(scores: np.ndarray, splits: int = 10, *, from_logits: bool = False) -> tuple[float, float]:
    """(mean, std) over ``splits`` of exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016).

    ``scores`` are class probabilities (N, C) or, with ``from_logits=True``, logits (N, C).
    Splits are contiguous blocks of rows, as in the reference implementations; ``p(y)`` is the
    mean of each split. Uniform predictions give 1; confident predictions spread evenly over
    C classes within each split give C.
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"scores must be a finite (N, C) array, got shape {x.shape}")
    if not 1 <= splits <= len(x):
        raise ValueError(f"splits must be in [1, N={len(x)}], got {splits}")
    if from_logits:
        p = np.exp(log_softmax(x, axis=1))
    else:
        if (x < 0).any() or not np.allclose(x.sum(1), 1.0, atol=1e-4):
            raise ValueError("probabilities must be non-negative rows summing to 1 (pass from_logits=True for logits)")
        p = x
    n = len(p)
    values = []
    for s in range(splits):
        part = p[s * n // splits : (s + 1) * n // splits]  # (n/splits, C)
        kl = rel_entr(part, part.mean(0, keepdims=True)).sum(1).mean()  # 0 log 0 = 0
        values.append(np.exp(kl))
    return float(np.mean(values)), float(np.std(values))
