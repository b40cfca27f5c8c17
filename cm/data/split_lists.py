"""Split lists over an image folder: ImageNet-LT (Liu et al. 2019) as published.

A list has one line per image, e.g. `train/n01440764/n01440764_10026.JPEG 0`: a path relative to
the ImageNet folder (data.path) and an integer label 0..C-1. The list *is* the long-tailed set
(ImageNet_LT_train.txt: 115,846 images, 1,280 down to 5 per class); ImageNet_LT_test.txt (50 per
class, from ImageNet's validation images) is a class-balanced set for the evaluation reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm.errors import DataError

EXAMPLE = "'train/n01440764/n01440764_10026.JPEG 0'"


@dataclass(frozen=True)
class Listing:
    paths: list[Path]        # image files under data.path, in list order
    labels: np.ndarray       # int64 (N,), classes 0..C-1
    class_names: list[str]   # each class's folder (its WordNet id for ImageNet)


def parse_list(data: dict, key: str) -> tuple[list[str], np.ndarray]:
    """The relative paths and labels of the list file named by data[key], line by line."""
    list_file = Path(data[key])
    if not list_file.is_file():
        raise DataError(f"data.{key} = {data[key]!r}: file not found; must be a split list such as "
                        f"ImageNet_LT_train.txt, one line per image like {EXAMPLE}")
    relative, labels = [], []
    with list_file.open() as fh:
        for number, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:  # blank lines, e.g. a trailing one, carry no image
                continue
            if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
                raise DataError(f"data.{key} = {data[key]!r}, line {number}: {line.strip()!r} is not allowed: must "
                                f"be a path under data.path and an integer label >= 0, like {EXAMPLE}")
            relative.append(parts[0])
            labels.append(int(parts[1]))
    if not labels:
        raise DataError(f"data.{key} = {data[key]!r}: lists no image; must have one line per image like {EXAMPLE}")
    return relative, np.asarray(labels, dtype=np.int64)


def check_labels(data: dict, key: str, labels: np.ndarray, num_classes: int | None) -> None:
    """Labels must cover 0..C-1, C the split list's classes when `num_classes` is given."""
    num_classes = num_classes or int(labels.max()) + 1
    outside = labels[labels >= num_classes]
    if len(outside):
        raise DataError(f"data.{key} = {data[key]!r}: label {int(outside[0])} is not allowed: must be "
                        f"0..{num_classes - 1}, the classes of data.split_list")
    missing = np.setdiff1d(np.arange(num_classes), labels)
    if len(missing):
        raise DataError(f"data.{key} = {data[key]!r}: labels must cover 0..{num_classes - 1} (every class at "
                        f"least one image); {len(missing)} missing, the first {int(missing[0])}")


def check_files(data: dict, key: str, relative: list[str]) -> list[Path]:
    """The listed files under data.path; all must exist."""
    root = Path(data["path"] or "")
    if not data["path"] or not root.is_dir():
        raise DataError(f"data.path = {data['path']!r}: not a folder; source imagenet_lt needs the ImageNet "
                        f"folder that the paths of data.{key} are relative to (holding train/ and val/)")
    paths = [root / rel for rel in relative]
    missing = [rel for rel, path in zip(relative, paths) if not path.is_file()]
    if missing:
        raise DataError(f"data.path = {data['path']!r}: {len(missing)} of the {len(paths)} images listed in "
                        f"data.{key} do not exist, the first {missing[0]!r}; data.path must be the folder "
                        "the list's paths are relative to")
    return paths


def read_listing(data: dict, key: str, num_classes: int | None = None) -> Listing:
    """The checked listing of data[key] ('split_list' or 'reference_list'); nothing is decoded."""
    relative, labels = parse_list(data, key)
    check_labels(data, key, labels, num_classes)
    paths = check_files(data, key, relative)
    first = {}
    for path, label in zip(paths, labels.tolist()):
        first.setdefault(label, path)
    return Listing(paths, labels, [first[c].parent.name for c in range(len(first))])
