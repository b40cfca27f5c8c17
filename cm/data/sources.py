"""Image sources: each returns its full labelled set as uint8 NHWC arrays (balanced, except imagenet_lt,
whose split list is the long-tailed set itself)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm.data.files import image_shape, read_images
from cm.data.split_lists import Listing, parse_list, read_listing
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


IMAGEFOLDER = "a folder with one sub-folder of images per class (e.g. female/ and male/)"


def class_folders(data: dict) -> list[tuple[str, list[Path]]]:
    """(class name, image files) of each class folder, sorted by name as torchvision's ImageFolder
    orders them; folders whose name starts with a dot (.ipynb_checkpoints, ...) are not classes."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(data["path"] or "")
    if not data["path"] or not root.is_dir():
        raise DataError(f"data.path = {data['path']!r}: not a folder; imagefolder needs {IMAGEFOLDER}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        files = sum(1 for p in root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        raise DataError(f"data.path = {data['path']!r}: {files} image file(s) but no class sub-folders; "
                        f"imagefolder needs {IMAGEFOLDER}")
    if len(folders) < 2:
        raise DataError(f"data.path = {data['path']!r}: found {len(folders)} class folder(s) ({folders[0].name}/); "
                        "must have at least 2")
    classes = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise DataError(f"{folder}: no images; each class folder must hold at least one file ending in "
                            f"{', '.join(IMG_EXTENSIONS)}")
        classes.append((folder.name, files))
    return classes


def _imagefolder(data: dict) -> LabeledImages:
    """One sub-folder per class (e.g. imbalanced CelebA-HQ, users' own data), resized to
    data.image_size if set (cm.data.files.read_image)."""
    classes = class_folders(data)
    paths = [path for _, files in classes for path in files]
    labels = np.repeat(np.arange(len(classes)), [len(files) for _, files in classes])
    return LabeledImages(read_images(paths, data.get("image_size")), labels.astype(np.int64),
                         [name for name, _ in classes])


def _listed_images(data: dict, listing: Listing) -> LabeledImages:
    """The images of a checked split list, in list order, resized to data.image_size if set."""
    return LabeledImages(read_images(listing.paths, data.get("image_size")), listing.labels, listing.class_names)


def _imagenet_lt(data: dict) -> LabeledImages:
    """ImageNet-LT: the images of data.split_list under the ImageNet folder data.path."""
    return _listed_images(data, read_listing(data, "split_list"))


SOURCES = {"digits": _digits, "npz": _npz, "cifar10": _cifar, "cifar100": _cifar, "imagefolder": _imagefolder,
           "imagenet_lt": _imagenet_lt}
# Keys only some sources read: set for another source they are refused, never silently ignored.
READ_BY = {"split_list": ("imagenet_lt",), "reference_list": ("imagenet_lt",),
           "image_size": ("imagefolder", "imagenet_lt")}


def check_settings(data: dict) -> None:
    """The source is known, reads every key that is set, and has what it needs."""
    source = data["source"]
    if source not in SOURCES:
        raise DataError(f"data.source = {source!r} is not allowed: one of {', '.join(SOURCES)}")
    for key, readers in READ_BY.items():
        if data.get(key) is not None and source not in readers:
            raise DataError(f"data.{key} = {data[key]!r} is not allowed with data.source = {source!r}: must be "
                            f"null (only {' and '.join(readers)} read it)")
    if source == "imagenet_lt" and not data.get("split_list"):
        raise DataError("data.split_list = None is not allowed with data.source = 'imagenet_lt': must name a "
                        "split list file such as ImageNet_LT_train.txt")


SHIFTS = {"invert": lambda images: 255 - images}  # data.shift: a visibly other domain (fine-tuning)


def shifted(images: LabeledImages, data: dict) -> LabeledImages:
    """The images with `data.shift` applied (none when unset)."""
    shift = data.get("shift")
    return images if shift is None else LabeledImages(SHIFTS[shift](images.images), images.labels, images.class_names)


def load_source(data: dict) -> LabeledImages:
    """Load the full labelled set named by an experiment's `data` settings."""
    check_settings(data)
    return shifted(SOURCES[data["source"]](data), data)


def load_reference(data: dict) -> LabeledImages:
    """The real set that evaluation compares with: data.reference_list's images when set (imagenet_lt:
    a class-balanced list such as ImageNet_LT_test.txt), otherwise the full source (docs/evaluation.md)."""
    if not data.get("reference_list"):
        return load_source(data)
    check_settings(data)
    num_classes = int(parse_list(data, "split_list")[1].max()) + 1
    return shifted(_listed_images(data, read_listing(data, "reference_list", num_classes)), data)


def _npz_summary(data: dict) -> tuple[np.ndarray, tuple[int, ...]]:
    """Labels and the images' header of an .npz, without reading the images."""
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


def _imagefolder_summary(data: dict) -> tuple[np.ndarray, tuple[int, ...]]:
    """Files per class folder and the first image's shape (images of other sizes are found at load)."""
    classes = class_folders(data)
    return np.array([len(files) for _, files in classes]), image_shape(classes[0][1][0], data.get("image_size"))


def _imagenet_lt_summary(data: dict) -> tuple[np.ndarray, tuple[int, ...]]:
    """Images per class of the split list and the first one's shape, after checking both lists and
    that every listed file exists."""
    listing = read_listing(data, "split_list")
    counts = np.bincount(listing.labels)
    if data.get("reference_list"):
        read_listing(data, "reference_list", len(counts))
    return counts, image_shape(listing.paths[0], data.get("image_size"))


SUMMARIES = {"npz": _npz_summary, "imagefolder": _imagefolder_summary, "imagenet_lt": _imagenet_lt_summary}


def source_class_names(data: dict) -> list[str]:
    """The class names of a source, in label order; folder and list sources without reading an image."""
    check_settings(data)
    if data["source"] == "imagefolder":
        return [name for name, _ in class_folders(data)]
    if data["source"] == "imagenet_lt":
        return list(read_listing(data, "split_list").class_names)
    return load_source(data).class_names


def source_summary(data: dict) -> tuple[np.ndarray, tuple[int, ...]]:
    """(images per class, image shape) of a source without decoding its images, for checks that
    run before any job starts."""
    check_settings(data)
    if data["source"] in SUMMARIES:
        return SUMMARIES[data["source"]](data)
    full = load_source(data)
    return np.bincount(full.labels, minlength=full.num_classes), full.images.shape[1:]
