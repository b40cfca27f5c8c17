"""The evaluation at CIFAR scale: the local classifier on balanced CIFAR-10, and the peak memory
and time of evaluating 50,000 images against the 50,000-image reference.

    python benchmarks/evaluate_cifar.py --npz ../shared/data/cifar10/train.npz [--steps 300]

The "generated" set is the real test set (10,000) tiled to 50,000 class-balanced images: the
point is the cost of the real code path (`cm.evaluate`: batched feature extraction, cached
per-class statistics, precision/recall in blocks, split-half floors), not the values.
"""

from __future__ import annotations

import argparse
import copy
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cm import config as cfg
from cm import io
from cm.data import build_manifest
from cm.evaluate import evaluate, reference_features, train_evaluator


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", required=True, help="CIFAR-10 training set as .npz (images, labels)")
    parser.add_argument("--test-npz", help="images to tile into the generated set (default: --npz)")
    parser.add_argument("--steps", type=int, default=300, help="classifier training steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = cfg.load_params()
    experiment = copy.deepcopy(params["experiments"]["cifar10lt_ir100"])
    experiment["data"].update(source="npz", path=args.npz)
    experiment["evaluate"].update(feature_extractor="local")
    experiment["evaluate"]["feature_net"].update(steps=args.steps, batch_size=128, feature_dim=128)
    manifest = build_manifest(experiment["data"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        report = train_evaluator(experiment=experiment, out=tmp / "net.pt", report_out=tmp / "net.json",
                                 progress=False)
        t_train = time.perf_counter() - start
        start = time.perf_counter()
        reference_features(experiment=experiment, evaluator=tmp / "net.pt", out=tmp / "ref.npz",
                           stats_out=tmp / "stats.npz")
        t_ref = time.perf_counter() - start
        source = io.load_npz(args.test_npz or args.npz, required=("images", "labels"))
        order = np.argsort(source["labels"], kind="stable")
        per_class = 5000
        picks = np.concatenate([np.resize(order[source["labels"][order] == c], per_class) for c in range(10)])
        io.save_npz(tmp / "gen.npz", images=source["images"][picks], labels=source["labels"][picks])
        del source
        start = time.perf_counter()
        metrics = evaluate(samples=tmp / "gen.npz", evaluator=tmp / "net.pt", reference=tmp / "ref.npz",
                           stats=tmp / "stats.npz", manifest=manifest, experiment=experiment,
                           out=tmp / "metrics.json", features_out=tmp / "features.npz")
        t_eval = time.perf_counter() - start
    print(f"CPU, {args.threads} thread(s); local classifier: {args.steps} steps x batch 128 on balanced CIFAR-10")
    print(f"classifier held-out accuracy {report['test_accuracy']:.3f} ({report['test_size']} images), "
          f"trained in {t_train:.0f} s")
    print(f"reference features + per-class statistics of 50,000 images: {t_ref:.0f} s")
    print(f"evaluate 50,000 generated images (features, FID, KID, precision/recall, per-class and group FID, "
          f"floors): {t_eval:.0f} s")
    print(f"fid {metrics['fid']:.3f} (floor {metrics['fid_floor']:.3f}), precision {metrics['precision']:.3f}, "
          f"recall {metrics['recall']:.3f}")
    print(f"peak resident memory of the whole run: {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
