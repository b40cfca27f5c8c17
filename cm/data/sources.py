"""Image sources: each returns the full (balanced) labelled set as uint8 NHWC arrays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm.errors import DataError


@dataclass(frozen=True)
class LabeledImages:
    images: np.ndarray        # uint8 (N, H, W, C)
    labels: np.ndarray        # int64 (N,), classes 0..C-1
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _digits(_: dict) -> LabeledImages:
    """scikit-learn's embedded handwritten digits: 1,797 images 8x8 with values 0..16."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return LabeledImages(images, digits.target.astype(np.int64), [str(c) for c in range(10)])


def _npz(data: dict) -> LabeledImages:
    """An .npz file with `images` (uint8 NHWC), `labels` and optionally `classes`."""
    path = Path(data["path"])
    if not path.is_file():
        raise DataError(f"data.path = {str(path)!r}: file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"images", "labels"} - set(archive.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}; found {archive.files}")
            images, labels = archive["images"], archive["labels"].astype(np.int64)
            names = [str(c) for c in archive["classes"]] if "classes" in archive.files else None
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise DataError(
            f"{path}: images must be uint8 of shape (N, H, W, C) matching labels (N,); "
            f"got {images.dtype} {images.shape} and labels {labels.shape}"
        )
    num_classes = int(labels.max()) + 1
    if labels.min() < 0 or set(np.unique(labels)) != set(range(num_classes)):
        raise DataError(f"{path}: labels must cover 0..C-1 without gaps")
    return LabeledImages(images, labels, names or [str(c) for c in range(num_classes)])


def _cifar(data: dict) -> LabeledImages:
    """CIFAR-10/100 training set through torchvision: a local copy under data.path, or a download."""
    from torchvision import datasets

    dataset = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[data["source"]]
    root = data["path"] or "data/torchvision"
    try:
        ds = dataset(root, train=True, download=data["download"])
    except (RuntimeError, OSError) as err:  # torchvision's "not found or corrupted", or no network
        folder = "cifar-10-batches-py" if data["source"] == "cifar10" else "cifar-100-python"
        raise DataError(
            f"data.path = {root!r}: no readable {data['source']} copy ({err}). Put the python version "
            f"('{folder}/') under data.path, or set data.download: true on a machine with network access"
        ) from None
    return LabeledImages(np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64),
                         list(ds.classes))


def _imagefolder(data: dict) -> LabeledImages:
    """One sub-folder per class, images of one size (e.g. imbalanced CelebA-HQ, users' own data).
    Classes are the sorted folder names, as torchvision's ImageFolder orders them."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(data["path"] or "")
    if not root.is_dir():
        raise DataError(f"data.path = {str(root)!r}: not a folder (imagefolder needs one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folder(s); imagefolder needs at least 2")
    images, labels, size = [], [], None
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise DataError(f"{root / name}: no images ({', '.join(IMG_EXTENSIONS)})")
        for path in files:
            try:
                with Image.open(path) as img:
                    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
            except OSError as err:
                raise DataError(f"{path}: not a readable image ({err})") from None
            size = size or array.shape
            if array.shape != size:
                raise DataError(f"{path}: {array.shape[1]}x{array.shape[0]} pixels, the first image was "
                                f"{size[1]}x{size[0]}; all images must have one size (resize them first)")
            images.append(array)
            labels.append(label)
    return LabeledImages(np.stack(images), np.asarray(labels, dtype=np.int64), classes)


SOURCES = {"digits": _digits, "npz": _npz, "cifar10": _cifar, "cifar100": _cifar, "imagefolder": _imagefolder}


def load_source(data: dict) -> LabeledImages:
    """Load the full labelled set named by an experiment's `data` settings."""
    if data["source"] not in SOURCES:
        raise DataError(f"data.source = {data['source']!r} is not allowed: one of {', '.join(SOURCES)}")
    return SOURCES[data["source"]](data)


def source_summary(data: dict) -> tuple[np.ndarray, tuple[int, ...]]:
    """(images per class, image shape) of a source without decoding its images, for checks that
    run before any job starts."""
    if data["source"] == "npz":
        import zipfile

        path = Path(data["path"])
        try:
            with np.load(path, allow_pickle=False) as archive:
                labels = archive["labels"].astype(np.int64)
            with zipfile.ZipFile(path) as zf, zf.open("images.npy") as fh:
                major, _ = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(fh)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: not a readable .npz file with images and labels ({err})") from None
        return np.bincount(labels), tuple(shape[1:])
    full = load_source(data)
    return np.bincount(full.labels, minlength=full.num_classes), full.images.shape[1:]
