"""Long-tailed datasets: sources, imbalance profiles and the manifest that pins a subset."""

from __future__ import annotations

import hashlib

import numpy as np

from cm.data.profiles import many_medium_few, profile_counts, select_long_tailed
from cm.data.sources import DataError, LabeledImages, load_reference, load_source

__all__ = ["DataError", "LabeledImages", "build_manifest", "load_reference", "load_source", "load_training_set"]

# The `data` keys that rebuild a source's images (the manifest's `source`; reference_list is read only
# by the evaluation stages). A manifest without one of them reads it as null.
SOURCE_KEYS = ("path", "split_list", "image_size")
OPTIONAL_SOURCE_KEYS = ("shift",)  # in a manifest only when set: an unshifted manifest has no `shift` key


def content_hash(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over the pixels and labels of a set, in order."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def build_manifest(data: dict) -> dict:
    """Choose the long-tailed subset described by an experiment's `data` settings.

    The manifest is everything needed to rebuild and verify the training set: the source
    settings, the profile, the chosen indices, per-class counts, the many/medium/few split and
    a content hash of the selected images.
    """
    full = load_source(data)
    try:
        counts = profile_counts(data, np.bincount(full.labels, minlength=full.num_classes))
    except ValueError as err:
        raise DataError(str(err)) from None
    # `listed` draws nothing: it keeps every image, class by class in the source's order.
    listed = data["profile"] == "listed"
    if listed:
        indices = np.argsort(full.labels, kind="stable")
    else:
        indices = select_long_tailed(full.labels, counts, data["seed"])
    return {
        "source": {"name": data["source"], **{key: data.get(key) for key in SOURCE_KEYS},
                   **{key: data[key] for key in OPTIONAL_SOURCE_KEYS if data.get(key) is not None}},
        "profile": data["profile"],
        # `listed` keeps the source's own imbalance: record it rather than the unused setting.
        "imbalance_ratio": max(counts) / min(counts) if listed else data["imbalance_ratio"],
        "seed": data["seed"],
        "num_classes": full.num_classes,
        "class_names": full.class_names,
        "image_shape": list(full.images.shape[1:]),
        "class_counts": counts,
        "num_images": int(sum(counts)),
        "splits": many_medium_few(counts),
        "content_sha256": content_hash(full.images[indices], full.labels[indices]),
        "indices": indices.tolist(),
    }


def load_training_set(manifest: dict) -> LabeledImages:
    """Rebuild the long-tailed training set of a manifest and check it is the same content."""
    source = manifest["source"]
    settings = {key: source.get(key) for key in SOURCE_KEYS + OPTIONAL_SOURCE_KEYS}
    full = load_source({"source": source["name"], **settings})
    indices = np.asarray(manifest["indices"], dtype=np.int64)
    if len(indices) and indices.max() >= len(full.labels):
        raise DataError(f"the manifest's indices exceed the source's {len(full.labels)} images")
    subset = LabeledImages(full.images[indices], full.labels[indices], full.class_names)
    if content_hash(subset.images, subset.labels) != manifest["content_sha256"]:
        raise DataError(
            "the training images differ from those the manifest was built from "
            "(the source changed); run prepare_data again"
        )
    return subset
