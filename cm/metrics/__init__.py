"""Evaluation metrics: feature extractors and distances on their features.

``feature_net`` trains/persists the small classifier whose penultimate features define the
local feature space; ``inception`` loads clean-fid's Inception-v3 from a local file and computes
its features and the Inception Score; ``distances`` computes FID, KID, per-class/group FID and
per-class accuracy on plain numpy feature arrays; ``frechet`` caches per-class reference
statistics so per-class FID stays cheap with many classes; ``prdc`` gives improved precision and
recall; ``floors`` gives split-half noise floors of any of them on the real data; ``checks``
validates the feature arrays and labels they all take.
"""

from cm.metrics.distances import fid, group_fid, kid, per_class_accuracy, per_class_fid
from cm.metrics.feature_net import (
    FeatureNet,
    extract,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from cm.metrics.floors import per_class_floor, split_half_floor
from cm.metrics.frechet import GaussianStats, ReferenceStats, fast_fid
from cm.metrics.inception import inception_features, inception_score, load_inception
from cm.metrics.prdc import precision_recall

__all__ = [
    "FeatureNet",
    "GaussianStats",
    "ReferenceStats",
    "extract",
    "fast_fid",
    "fid",
    "group_fid",
    "inception_features",
    "inception_score",
    "kid",
    "load_feature_net",
    "load_inception",
    "per_class_accuracy",
    "per_class_fid",
    "per_class_floor",
    "precision_recall",
    "save_feature_net",
    "split_half_floor",
    "train_feature_net",
]
