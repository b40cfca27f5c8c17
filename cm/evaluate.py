"""Evaluation stages: the local classifier, the real reference (features and per-class statistics)
and the metrics of a generated set, overall, per class and many/medium/few, each beside its
noise floor.

Two networks serve two purposes. The *feature extractor* (`evaluate.feature_extractor`: `local`,
the classifier's penultimate layer, or `inception` in clean-fid's mode `evaluate.fid_mode`) gives
the space for FID, KID and precision/recall. The local *classifier* always gives the per-class
accuracy of generated samples.

Generated images are uint8, or float32 in [0, 1] when the sample stage did not quantise them
(`sample.quantize: false`, as the papers fed their FID code); both networks take either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cm import io
from cm.data import load_reference
from cm.metrics import distances
from cm.metrics.bootstrap import bootstrap_intervals
from cm.metrics.feature_net import extract, load_feature_net, save_feature_net, train_feature_net
from cm.metrics.floors import half_sizes, split_halves
from cm.metrics.frechet import ReferenceStats
from cm.metrics.prdc import precision_recall


def dataset_id(data: dict) -> str:
    """Names the real reference, so statistics of another dataset are never used by mistake. The
    optional keys are appended only when set, so the names of existing references stay valid."""
    extra = "".join(f":{key}={data[key]}" for key in ("image_size", "reference_list") if data.get(key))
    return f"{data['source']}:{data['path'] or ''}{extra}"


def train_evaluator(*, experiment: dict, out: str | Path, report_out: str | Path, seed: int = 0,
                    device: str = "cpu", progress: bool = True) -> dict:
    """Train the local classifier on the balanced real reference (`load_reference`); record its
    held-out accuracy."""
    cfg = experiment["evaluate"]["feature_net"]
    full = load_reference(experiment["data"])
    model, report = train_feature_net(
        full.images, full.labels, num_classes=full.num_classes, steps=cfg["steps"],
        batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed, test_fraction=cfg["test_fraction"],
        feature_dim=cfg["feature_dim"], device=device, progress=progress)
    report = {"classifier": "local", **report}
    save_feature_net(model, report, out)
    io.write_json(report_out, report)
    return report


def extractor_id(cfg: dict) -> str:
    """Names the feature space in the files beside the features (reference statistics included):
    `local`, or `inception/<fid_mode>/sha256=<first 16 hex digits of the mode's weights file>`, so
    features of another network, preprocessing or weights are never compared by mistake."""
    if cfg["feature_extractor"] == "local":
        return "local"
    from cm.metrics.inception import WEIGHTS  # load_inception accepts no other file for the mode

    return f"inception/{cfg['fid_mode']}/sha256={WEIGHTS[cfg['fid_mode']].sha256[:16]}"


def _check_generated(path, images: np.ndarray) -> None:
    """Generated images are uint8 NHWC, or float in [0, 1]; anything else is refused in one line."""
    ok = images.ndim == 4 and (images.dtype == np.uint8 or (
        np.issubdtype(images.dtype, np.floating) and (images.size == 0 or (images.min() >= 0 and images.max() <= 1))))
    if not ok:
        low, high = (images.min(), images.max()) if images.size else (None, None)
        raise io.CorruptFileError(f"{path}: images are {images.dtype} {images.shape} with values in [{low}, {high}]; "
                                  "expected uint8 NHWC, or float in [0, 1] (sample.quantize: false)")


def features(experiment: dict, classifier, images: np.ndarray,
             device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """Features in the configured extractor's space (extracted in batches), the local classifier's
    predicted labels, Inception's logits (None for the local extractor), and what made the features
    (extractor, fid_mode, weights file and sha256; None where they do not apply)."""
    cfg = experiment["evaluate"]
    local_feats, pred = extract(classifier, images, device=device)
    info = {"feature_extractor": cfg["feature_extractor"], "fid_mode": None, "inception_weights": None,
            "inception_weights_sha256": None}
    if cfg["feature_extractor"] == "local":
        return local_feats, pred, None, info
    from cm.metrics.inception import inception_features, load_inception

    # Never falls back silently; refuses a file whose sha256 is not the mode's published one.
    extractor = load_inception(cfg["inception_weights"], device=device, mode=cfg["fid_mode"])
    # The resize runs on the stage's CPU threads (resources.evaluate.threads, which cm/threads.py gives
    # torch); each image is resized alone, so the count changes no number.
    feats, logits = inception_features(extractor, images, device=device, logits=True,
                                       num_workers=torch.get_num_threads())
    info.update(fid_mode=extractor.fid_mode, inception_weights=Path(extractor.weights_file).name,
                inception_weights_sha256=extractor.weights_sha256)
    return feats, pred, logits, info


def _provenance(info: dict) -> dict[str, np.ndarray]:
    """The feature files' record of what made them (empty strings where nothing applies)."""
    return {"fid_mode": np.array(info["fid_mode"] or ""),
            "weights_sha256": np.array(info["inception_weights_sha256"] or "")}


def reference_features(*, experiment: dict, evaluator: str | Path, out: str | Path, stats_out: str | Path,
                       device: str = "cpu") -> dict:
    """Features of the balanced real reference (`load_reference`: the full source, or
    data.reference_list) and its per-class statistics, computed once per dataset and extractor and
    reused by every method and seed."""
    cfg, data = experiment["evaluate"], experiment["data"]
    full = load_reference(data)
    classifier, _ = load_feature_net(evaluator)
    feats, pred, _, info = features(experiment, classifier, full.images, device)
    io.save_npz(out, features=feats, labels=full.labels, predictions=pred,
                extractor=np.array(extractor_id(cfg)), dataset=np.array(dataset_id(data)), **_provenance(info))
    ReferenceStats.from_features(feats, full.labels, full.num_classes, extractor=extractor_id(cfg),
                                 dataset=dataset_id(data)).save(stats_out)
    return {"num_images": int(len(full.labels)), "feature_dim": int(feats.shape[1])}


def distances_between(gen: np.ndarray, gen_labels: np.ndarray, ref: np.ndarray, stats: ReferenceStats,
                      splits: dict[str, list[int]], cfg: dict) -> dict:
    """FID, KID, precision/recall, per-class FID and FID of each class group."""
    in_group = {name: np.isin(gen_labels, classes) for name, classes in splits.items()}
    return {
        "fid": distances.fid(gen, ref),
        "kid": distances.kid(gen, ref, num_subsets=cfg["kid_subsets"], max_subset_size=cfg["kid_subset_size"]),
        **precision_recall(ref, gen, k=cfg["prdc_k"]),
        **{f"fid_{name}": stats.fid_to(gen[mask], splits[name]) for name, mask in in_group.items()},
        "fid_per_class": stats.per_class_fid(gen, gen_labels),
    }


def noise_floor(ref: np.ndarray, ref_labels: np.ndarray, gen_labels: np.ndarray, num_classes: int,
                splits: dict[str, list[int]], cfg: dict) -> dict:
    """The same distances between two disjoint random halves of the real reference, each half as
    large per class as the generated set (or half the class, when the class is smaller)."""
    ref_counts = np.bincount(ref_labels, minlength=num_classes)
    sizes = half_sizes(np.minimum(np.bincount(gen_labels, minlength=num_classes), ref_counts // 2), ref_counts)
    a, b = split_halves(ref_labels, sizes, cfg["floor_seed"])
    stats = ReferenceStats.from_features(ref[b], ref_labels[b], num_classes)
    floor = distances_between(ref[a], ref_labels[a], ref[b], stats, splits, cfg)
    return {**floor, "half_size_per_class": sizes.tolist()}


def evaluate(*, samples: str | Path, evaluator: str | Path, reference: str | Path, stats: str | Path,
             manifest: dict, experiment: dict, out: str | Path, features_out: str | Path,
             device: str = "cpu") -> dict:
    """Metrics of a generated set against the real reference, with their floors. The generated
    set's features are saved (`features_out`) so metrics can be recomputed without extracting them
    again."""
    cfg, data = experiment["evaluate"], experiment["data"]
    gen = io.load_npz(samples, required=("images", "labels"))
    _check_generated(samples, gen["images"])
    ref = io.load_npz(reference, required=("features", "labels", "extractor", "dataset"))
    for key, expected in (("extractor", extractor_id(cfg)), ("dataset", dataset_id(data))):
        if str(ref[key]) != expected:
            raise io.CorruptFileError(f"{reference}: features of {key} {str(ref[key])!r}, this experiment "
                                      f"needs {expected!r}; run reference_features again")
    ref_stats = ReferenceStats.load(stats, extractor=extractor_id(cfg), dataset=dataset_id(data))
    classifier, _ = load_feature_net(evaluator)
    feats, pred, logits, info = features(experiment, classifier, gen["images"], device)
    labels, num_classes, splits = gen["labels"], manifest["num_classes"], manifest["splits"]
    io.save_npz(features_out, features=feats, labels=labels, predictions=pred,
                extractor=np.array(extractor_id(cfg)), dataset=np.array(dataset_id(data)), **_provenance(info))

    measured = distances_between(feats, labels, ref["features"], ref_stats, splits, cfg)
    floor = noise_floor(ref["features"], ref["labels"], labels, num_classes, splits, cfg)
    # How far another generated set of this size could move them (seeded by floor_seed: reproducible).
    spread = bootstrap_intervals(gen=feats, labels=labels, ref=ref["features"], ref_stats=ref_stats, splits=splits,
                                 estimates=measured, replicates=cfg["bootstrap"], seed=cfg["floor_seed"])
    accuracy = distances.per_class_accuracy(pred, labels, num_classes)
    per_class = {"fid": measured.pop("fid_per_class"), "fid_floor": floor.pop("fid_per_class"),
                 "acc": accuracy, "train_count": manifest["class_counts"]}
    metrics = {
        **info,  # feature_extractor, fid_mode, inception_weights, inception_weights_sha256
        "generated_dtype": str(gen["images"].dtype),  # uint8, or float32 when sampling did not quantise
        "num_generated": int(len(labels)),
        "num_reference": int(len(ref["labels"])),
        **measured,
        **{f"{key}_floor": value for key, value in floor.items() if key != "half_size_per_class"},
        "bootstrap_replicates": cfg["bootstrap"],
        **{f"{key}_{part}": value for key, parts in spread.items() for part, value in parts.items()},
        "floor_half_size_per_class": floor["half_size_per_class"],
        "acc": float(np.mean(pred == labels)),
        **{f"acc_{name}": float(np.mean([accuracy[c] for c in classes])) for name, classes in splits.items()},
        "per_class": per_class,
    }
    if logits is not None:  # the Inception Score needs Inception's own class posteriors
        from cm.metrics.inception import inception_score

        metrics["is"], metrics["is_std"] = inception_score(logits, splits=10, from_logits=True)
    io.write_json(out, metrics)
    return metrics
