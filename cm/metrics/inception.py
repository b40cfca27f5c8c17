"""Inception-v3 feature extractors in clean-fid's two PyTorch modes, from local weights files, plus
the Inception Score.

``evaluate.fid_mode`` picks the network and its preprocessing, with clean-fid's own mode names
and pieces (``cleanfid.resize.build_resizer(mode)`` for the resize, clean-fid's networks):

- ``clean`` (modern FID): the TorchScript translation of TensorFlow's ``inception-2015-12-05``
  graph that clean-fid and StyleGAN2-ADA use (``inception-2015-12-05.pt``), wrapped by
  ``cleanfid.inception_torchscript.InceptionV3W``. Each image is resized to 299x299 per channel
  with PIL bicubic on float32 values in [0, 255]; the wrapper normalises to [-1, 1].
- ``legacy_pytorch`` (FID as CBDM, OC and CM computed it): pytorch-fid's TF-ported weights
  (``pt_inception-2015-12-05-6726825d.pth``) in clean-fid's copy of pytorch-fid's network
  (``cleanfid.inception_pytorch.InceptionV3``), after a bilinear resize (``F.interpolate``,
  ``align_corners=False``) of float images; the network divides by 255 and maps to [-1, 1], as
  clean-fid's ``feature_extractor("pytorch_inception")`` does.

Both take uint8 images, or float images in [0, 1] (unquantised samples, as the papers fed them;
scaled to [0, 255] without rounding), and give the 2,048-d pool features.

Weights are never downloaded and nothing falls back to another network: the caller names the
file (params key ``evaluate.inception_weights``), or it must sit where the tool that owns it looks
(clean-fid: ``/tmp/inception-2015-12-05.pt``; pytorch-fid: torch hub's ``checkpoints`` folder).
Its sha256 must be the published file's, else :func:`load_inception` stops with one line naming
the file, the expected hash and where to get the right one.

Precision: the network runs in float32 with TF32 off (`float32_only`), also on a GPU and whatever
the training or sampling precision set. pytorch-fid's and clean-fid's numbers are float32 ones:
neither sets a TF32 flag, and on Ampere and later GPUs PyTorch's cuDNN default would round their
convolutions' inputs to TF32 (10-bit mantissas), a device-dependent change of every feature.

The Inception Score needs the 1008-way classifier output. We compute logits from the resized
images' pool features as ``features @ W.T`` without the bias, as the original TF implementation
and StyleGAN2-ADA (``no_output_bias=True``) do: ``W`` is the TorchScript model's ``base.output``
layer (``base(img)`` itself would re-resize with bilinear sampling), or pytorch-fid's ``fc`` layer.
"""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from cleanfid import inception_pytorch
from cleanfid.downloads_helper import inception_url as WEIGHTS_URL
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from scipy.special import log_softmax, rel_entr
from torch import nn

from cm import io

WEIGHTS_NAME = "inception-2015-12-05.pt"  # InceptionV3W hard-codes this file name
PARAMS_KEY = "evaluate.inception_weights"
MODE_KEY = "evaluate.fid_mode"
FEATURE_DIM, NUM_LOGITS = 2048, 1008
# Where clean-fid's own feature_extractor() keeps the file (cleanfid/features.py).
CLEANFID_WEIGHTS = Path("./" if platform.system() == "Windows" else "/tmp") / WEIGHTS_NAME


@dataclass(frozen=True)
class Weights:
    """The published weights file of one mode: its name, sha256, source and description."""

    name: str
    sha256: str
    url: str
    what: str
    owner: str  # the tool whose default location we also accept


# Full sha256 of each published file, as projects that verify their downloads record it
# (clean-fid's file: k-diffusion's evaluation module, among others; pytorch-fid's: genforce-style
# Inception model stores, among others; it starts with the 6726825d that the file name carries).
WEIGHTS = {
    "clean": Weights(WEIGHTS_NAME, "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4",
                     WEIGHTS_URL, "clean-fid's TorchScript Inception", "clean-fid"),
    "legacy_pytorch": Weights("pt_inception-2015-12-05-6726825d.pth",
                              "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
                              inception_pytorch.FID_WEIGHTS_URL, "pytorch-fid's Inception weights",
                              "pytorch-fid"),
}
MODES = tuple(WEIGHTS)


def _check_mode(mode: str) -> Weights:
    if mode not in WEIGHTS:
        raise ValueError(f"{MODE_KEY} = {mode!r} is not allowed: must be one of {', '.join(MODES)}")
    return WEIGHTS[mode]


def default_location(mode: str = "clean") -> Path:
    """Where the owning tool keeps the mode's file: clean-fid's fixed folder, or torch hub's
    checkpoints folder (pytorch-fid's ``load_state_dict_from_url``; read when called, so
    ``TORCH_HOME`` counts)."""
    _check_mode(mode)
    if mode == "clean":
        return CLEANFID_WEIGHTS
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS[mode].name


def _how_to_get(problem: str, mode: str = "clean") -> str:
    w = WEIGHTS[mode]
    return (
        f"{problem}. Download {w.what} from {w.url} (e.g. `curl -L -o {w.name} {w.url}` on a machine "
        f"with network access; sha256 {w.sha256}) and either set the params key `{PARAMS_KEY}` to the file "
        f"(or to the folder holding it) or place it at {default_location(mode)}, where {w.owner} looks. "
        "Nothing is downloaded or substituted automatically."
    )


def resolve_weights(weights_path: str | os.PathLike | None, mode: str = "clean") -> Path:
    """The weights file named by ``weights_path`` (a file, or a folder holding the mode's file name).

    None means the owning tool's standard location. Raises FileNotFoundError saying how to get it.
    """
    w = _check_mode(mode)
    if weights_path is None:
        default = default_location(mode)
        if default.is_file():
            return default
        raise FileNotFoundError(_how_to_get(
            f"Inception weights for {MODE_KEY} {mode} not found: no path given and {w.owner}'s standard "
            f"file {default} does not exist", mode))
    path = Path(weights_path).expanduser()
    file = path / w.name if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(_how_to_get(
            f"Inception weights for {MODE_KEY} {mode} not found: {file} does not exist", mode))
    return file


def _file_kind(path: Path) -> str:
    """What a file is, from its first bytes or zip listing, to say what was given instead."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a damaged zip archive"
        if any("/code/" in name for name in names):
            return "a TorchScript model"
        if any(name.endswith("data.pkl") for name in names):
            return "a torch.save file"
        return "a zip archive that is not a PyTorch file"
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save's legacy format starts with its magic number, pickled with protocol 2.
    return "a torch.save file (legacy format)" if head == b"\x80\x02\x8a\x0a" else "not a PyTorch file"


def check_weights(file: Path, mode: str) -> str:
    """The file's sha256, if it is the mode's published file; otherwise CorruptFileError in one line
    naming the file, what it is instead, the expected hash and where the right file comes from."""
    w = _check_mode(mode)
    digest = io.file_sha256(file)
    if digest == w.sha256:
        return digest
    other = [m for m, o in WEIGHTS.items() if o.sha256 == digest]
    kind = (f"{WEIGHTS[other[0]].what}, the file of {MODE_KEY} {other[0]}" if other
            else f"{_file_kind(file)}, sha256 {digest[:16]}...")
    raise io.CorruptFileError(
        f"{file}: not {w.what} for {MODE_KEY} {mode} ({kind}; expected {w.name} with sha256 {w.sha256}); "
        f"download it from {w.url} and set `{PARAMS_KEY}` to it (or place it at {default_location(mode)})")


class PytorchFIDInception(nn.Module):
    """pytorch-fid's network (clean-fid's ``InceptionV3``, pool3 block) with the weights given, run
    as clean-fid's ``feature_extractor("pytorch_inception")`` runs it: float32 (B, 3, 299, 299) in
    [0, 255] -> (B, 2048). ``fc`` keeps the 1008-way classifier for the Inception Score."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        calls = []

        def local_weights(*args, **kwargs):  # replaces the download inside fid_inception_v3()
            calls.append(args)
            return state_dict

        with mock.patch.object(inception_pytorch, "load_state_dict_from_url", local_weights), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision: `pretrained=` is deprecated
            self.net = inception_pytorch.InceptionV3(output_blocks=[3], resize_input=False)
        if len(calls) != 1:  # a clean-fid that loads its weights another way could download them
            raise RuntimeError("clean-fid's InceptionV3 did not load its weights through "
                               "load_state_dict_from_url; check the pinned clean-fid version")
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)
        self.fc.load_state_dict({"weight": state_dict["fc.weight"], "bias": state_dict["fc.bias"]})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 255)[0].squeeze(-1).squeeze(-1)


def _load_torchscript(file: Path) -> nn.Module:
    with warnings.catch_warnings():
        # torch >= 2.10 flags torch.jit.load (called by clean-fid) as deprecated; it still works.
        warnings.simplefilter("ignore", FutureWarning)
        if file.name == WEIGHTS_NAME:
            return InceptionV3W(str(file.parent), download=False, resize_inside=False)
        with tempfile.TemporaryDirectory() as tmp:  # InceptionV3W only takes a folder: show it the file
            os.symlink(file.resolve(), Path(tmp) / WEIGHTS_NAME)
            return InceptionV3W(tmp, download=False, resize_inside=False)  # loads into memory


def load_inception(weights_path: str | os.PathLike | None, device: str | torch.device = "cpu",
                   mode: str = "clean") -> nn.Module:
    """The Inception-v3 of ``mode`` (see the module docstring) in eval mode, from a local file.

    ``weights_path``: the weights file (any name), the folder holding the mode's file name, or None
    for the owning tool's standard location. Raises FileNotFoundError (with instructions) if it is
    missing and CorruptFileError naming the file if its sha256 is not the published file's. The
    network carries ``fid_mode``, ``weights_file`` and ``weights_sha256``.
    """
    file = resolve_weights(weights_path, mode)
    digest = check_weights(file, mode)
    try:
        if mode == "clean":
            net = _load_torchscript(file)
        else:
            net = PytorchFIDInception(torch.load(file, map_location="cpu", weights_only=True))
    except Exception as err:  # the right bytes, but this torch/clean-fid cannot read them
        raise io.CorruptFileError(
            f"{file}: {WEIGHTS[mode].what} (sha256 matches) could not be loaded ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    net.fid_mode, net.weights_file, net.weights_sha256 = mode, str(file), digest
    return net.eval().to(device)


def _output_weight(extractor: torch.nn.Module) -> torch.Tensor:
    """(num_logits, D) weight of the network's final classifier layer."""
    for path in (("base", "output"), ("fc",)):  # TorchScript InceptionV3W; PytorchFIDInception
        layer = extractor
        for name in path:
            layer = getattr(layer, name, None)
        if layer is not None and hasattr(layer, "weight"):
            return layer.weight
    raise ValueError("this extractor has no classifier layer `base.output` or `fc` (clean-fid's InceptionV3W "
                     "and pytorch-fid's network have one); logits for the Inception Score cannot be computed")


def resizer(mode: str = "clean"):
    """clean-fid's resize of one (H, W, 3) image to float32 (299, 299, 3) for ``mode``."""
    _check_mode(mode)
    with warnings.catch_warnings():  # its PyTorch resizer silences every warning of the process
        return build_resizer(mode)


def _as_float255(batch: np.ndarray) -> np.ndarray:
    """uint8 as is (clean-fid's resizers convert it to float32 themselves); float [0, 1] -> float32
    [0, 255], not rounded."""
    return batch if batch.dtype == np.uint8 else np.asarray(batch, dtype=np.float32) * np.float32(255)


def _resized_batch(images: np.ndarray, resize, pool: ThreadPoolExecutor | None) -> torch.Tensor:
    """(B, H, W, 3) -> float32 (B, 3, 299, 299) in [0, 255], clean-fid's resize of the mode."""
    images = _as_float255(images)
    out = list(pool.map(resize, images)) if pool else [resize(x) for x in images]  # each (299, 299, 3)
    return torch.from_numpy(np.stack(out).astype(np.float32, copy=False)).permute(0, 3, 1, 2).contiguous()


@contextlib.contextmanager
def float32_only():
    """TF32 off for cuDNN convolutions and CUDA matmuls inside the block (the flags only act on
    CUDA); the previous settings come back after it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """uint8 (N, H, W, C), or float in [0, 1], with C in {1, 3}; ValueError in one line otherwise."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or not (
            images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
        raise ValueError(f"{what} must be uint8 or float (N, H, W, C) with C in (1, 3), "
                         f"got {images.dtype} {images.shape}")
    if images.dtype != np.uint8 and images.size and not (images.min() >= 0 and images.max() <= 1):
        raise ValueError(f"{what}: float images must lie in [0, 1] (NaN and inf are not allowed), "
                         f"got values in [{images.min()}, {images.max()}]")
    return images


@torch.no_grad()
def inception_features(
    extractor: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    *,
    logits: bool = False,
    num_workers: int = 0,
    mode: str | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Pool features float64 (N, D) of (N, H, W, C) images, C in {1, 3}: uint8, or float in [0, 1].

    ``mode`` chooses clean-fid's resize (``clean``: PIL bicubic; ``legacy_pytorch``: bilinear); None
    takes the network's own ``fid_mode`` (set by :func:`load_inception`), else ``clean``. Float
    images are scaled to [0, 255] without rounding. Grayscale images are repeated to RGB (as
    clean-fid's PIL ``convert('RGB')`` does). With ``logits=True`` also returns the bias-free
    1008-way logits (N, 1008) for the Inception Score. ``num_workers`` threads run the resizing
    (the CPU bottleneck: ~5 ms per image; each image on its own, so the count changes no number).
    The network runs with TF32 off (`float32_only`, see the module docstring).
    """
    images = check_images(images)
    own = getattr(extractor, "fid_mode", None)
    mode = mode or own or "clean"
    if own is not None and own != mode:
        raise ValueError(f"the network was loaded for {MODE_KEY} {own}, but resizing for {mode} was asked")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    weight = _output_weight(extractor).to(device) if logits else None
    resize = resizer(mode)
    was_training = extractor.training
    extractor.eval()
    feats, outs = [], []
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        with float32_only():
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
