"""Image files to uint8 arrays, optionally brought to one square size (imagefolder, imagenet_lt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cm.errors import DataError


def read_image(path: Path, size: int | None) -> np.ndarray:
    """One image file as uint8 RGB (H, W, 3).

    With `size`, the largest centred square is cropped first (no stretching) and then resized to
    size x size with PIL's box filter: an area average, antialiased when shrinking, as in the
    downsampled ImageNet of Chrabaszcz et al. (2017). Without `size`, the native pixels are kept.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")  # ImageNet holds a few grayscale and CMYK JPEGs
    except OSError as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    if size:
        rgb = ImageOps.fit(rgb, (size, size), method=Image.Resampling.BOX, centering=(0.5, 0.5))
    return np.asarray(rgb, dtype=np.uint8)


def image_shape(path: Path, size: int | None) -> tuple[int, int, int]:
    """(H, W, 3) that `read_image` gives for a file, from its header only (no decoding)."""
    if size:
        return (size, size, 3)
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
    except OSError as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    return (height, width, 3)


def read_images(paths: list[Path], size: int | None) -> np.ndarray:
    """uint8 (N, H, W, 3) of image files; without `size` they must all have one size."""
    images = []
    for path in paths:
        array = read_image(path, size)
        first = images[0].shape if images else array.shape
        if array.shape != first:
            raise DataError(f"{path}: {array.shape[1]}x{array.shape[0]} pixels, the first image was "
                            f"{first[1]}x{first[0]}; all images must have one size: set data.image_size "
                            "to crop and resize them to one square size")
        images.append(array)
    return np.stack(images)
