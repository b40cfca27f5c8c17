"""Evaluation metrics: a local feature network and distances on its features.

``feature_net`` trains/persists the small classifier whose penultimate features define the
space for FID/KID; ``distances`` computes FID, KID, per-class/group FID and per-class accuracy
on plain numpy feature arrays.
"""

from cm.metrics.distances import fid, group_fid, kid, per_class_accuracy, per_class_fid
from cm.metrics.feature_net import (
    FeatureNet,
    extract,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)

__all__ = [
    "FeatureNet",
    "extract",
    "fid",
    "group_fid",
    "kid",
    "load_feature_net",
    "per_class_accuracy",
    "per_class_fid",
    "save_feature_net",
    "train_feature_net",
]
