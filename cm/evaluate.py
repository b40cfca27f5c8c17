"""Evaluation stages: the local feature network, the real reference features, and the metrics of a
generated set (overall, per class and many/medium/few), all in one feature space."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cm import io
from cm.data import load_source
from cm.metrics import distances
from cm.metrics.feature_net import extract, load_feature_net, save_feature_net, train_feature_net


def train_evaluator(*, experiment: dict, out: str | Path, report_out: str | Path, seed: int = 0,
                    device: str = "cpu", progress: bool = True) -> dict:
    """Train the `local` feature network on the full balanced source; record its test accuracy."""
    cfg = experiment["evaluate"]["feature_net"]
    full = load_source(experiment["data"])
    model, report = train_feature_net(
        full.images, full.labels, num_classes=full.num_classes, steps=cfg["steps"],
        batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed, test_fraction=cfg["test_fraction"],
        feature_dim=cfg["feature_dim"], device=device, progress=progress)
    report = {"feature_extractor": "local", **report}
    save_feature_net(model, report, out)
    io.write_json(report_out, report)
    return report


def reference_features(*, experiment: dict, evaluator: str | Path, out: str | Path,
                       device: str = "cpu") -> dict:
    """Features of the full balanced real set: the reference every generated set is compared with."""
    full = load_source(experiment["data"])
    model, _ = load_feature_net(evaluator)
    feats, pred = extract(model, full.images, device=device)
    io.save_npz(out, features=feats, labels=full.labels, predictions=pred,
                extractor=np.array("local"))
    return {"num_images": int(len(full.labels)), "feature_dim": int(feats.shape[1])}


def _mean(values: list[float], classes: list[int]) -> float:
    return float(np.mean([values[c] for c in classes]))


def evaluate(*, samples: str | Path, evaluator: str | Path, reference: str | Path, manifest: dict,
             experiment: dict, out: str | Path, device: str = "cpu") -> dict:
    """FID, KID, per-class and many/medium/few FID, and per-class accuracy of a generated set."""
    cfg = experiment["evaluate"]
    gen = io.load_npz(samples, required=("images", "labels"))
    ref = io.load_npz(reference, required=("features", "labels", "extractor"))
    if str(ref["extractor"]) != cfg["feature_extractor"]:
        raise io.CorruptFileError(
            f"{reference}: features come from extractor {str(ref['extractor'])!r}, "
            f"this experiment evaluates with {cfg['feature_extractor']!r}; run reference_features again")
    model, _ = load_feature_net(evaluator)
    feats, pred = extract(model, gen["images"], device=device)
    labels, num_classes, splits = gen["labels"], manifest["num_classes"], manifest["splits"]

    per_class = distances.per_class_fid(feats, labels, ref["features"], ref["labels"], num_classes)
    accuracy = distances.per_class_accuracy(pred, labels, num_classes)
    groups = distances.group_fid(feats, labels, ref["features"], ref["labels"], splits)
    metrics = {
        "feature_extractor": cfg["feature_extractor"],
        "num_generated": int(len(labels)),
        "num_reference": int(len(ref["labels"])),
        "fid": distances.fid(feats, ref["features"]),
        "kid": distances.kid(feats, ref["features"], num_subsets=cfg["kid_subsets"],
                             max_subset_size=cfg["kid_subset_size"]),
        **{f"fid_{name}": value for name, value in groups.items()},
        "acc": float(np.mean(pred == labels)),
        **{f"acc_{name}": _mean(accuracy, classes) for name, classes in splits.items()},
        "per_class": {"fid": per_class, "acc": accuracy, "train_count": manifest["class_counts"]},
    }
    io.write_json(out, metrics)
    return metrics
