"""Thm. 2.1 on the embedded data: does the majority-dominated share of parameter matrices grow with
the imbalance ratio?

    python benchmarks/dominance_vs_ratio.py [--ratios 1 3 10] [--steps 400] [--seeds 0 1]

For each ratio and seed: the digits set with the exponential profile at that ratio, DDPM trained
`--steps` steps (the default experiment's settings otherwise, `small` U-Net, one thread), then the
probe stage's gradient dominance (cm/probe) with the default probe settings. Prints the share
per block and overall, and the mean over seeds per ratio. A fixed budget for every ratio, so only
the class balance differs (the set is smaller at higher ratios: the head class keeps its images).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cm import config as cfg
from cm.checkpoint import load_trained
from cm.data import build_manifest, load_training_set
from cm.diffusion import GaussianDiffusion
from cm.probe import as_model_inputs, gradient_dominance
from cm.train import train

ROOT = Path(__file__).resolve().parent.parent


def measure(ratio: float, seed: int, steps: int, params: dict, folder: Path) -> dict:
    experiment = copy.deepcopy(params["experiments"]["digits_lt"])
    experiment["data"]["imbalance_ratio"] = ratio
    experiment["train"].update(steps=steps, checkpoint_every=steps, log_every=steps)
    manifest = build_manifest(experiment["data"])
    out = folder / f"r{ratio}_s{seed}"
    train(manifest=manifest, experiment=experiment, method_name="ddpm", method_params=params["method_params"],
          seed=seed, out=out / "model.pt", checkpoint_root=out / "ckpt", history_out=out / "history.csv",
          device="cpu", progress=False)
    net, _ = load_trained(out / "model.pt")
    data = load_training_set(manifest)
    images, labels = as_model_inputs(data.images, data.labels)
    probe = experiment["probe"]
    result = gradient_dominance(net, images, labels, manifest["splits"], GaussianDiffusion(**experiment["diffusion"]),
                                batches=probe["dominance_batches"], batch_size=probe["batch_size"], seed=probe["seed"])
    shares = {block: result["by_block"][block]["fraction"] for block in ("encoder", "middle", "decoder")}
    return {"ratio": ratio, "seed": seed, "images": manifest["num_images"], "overall": result["overall"]["fraction"],
            **shares}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1, 3, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = cfg.load_params(ROOT / "params.yaml")
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            for seed in args.seeds:
                rows.append(measure(ratio, seed, args.steps, params, Path(tmp)))
                r = rows[-1]
                print(f"ratio {ratio:>5g} seed {seed}: {r['images']:4d} images, majority-dominated share "
                      f"{r['overall']:.3f} (encoder {r['encoder']:.3f}, middle {r['middle']:.3f}, "
                      f"decoder {r['decoder']:.3f})", flush=True)
    print(f"\nDDPM, digits, {args.steps} steps, seeds {args.seeds}: mean share of majority-dominated matrices")
    print(f"{'ratio':>6} {'overall':>8} {'encoder':>8} {'middle':>8} {'decoder':>8}")
    for ratio in args.ratios:
        mine = [r for r in rows if r["ratio"] == ratio]
        means = {k: np.mean([r[k] for r in mine]) for k in ("overall", "encoder", "middle", "decoder")}
        spread = np.ptp([r["overall"] for r in mine])
        print(f"{ratio:>6g} {means['overall']:>8.3f} {means['encoder']:>8.3f} {means['middle']:>8.3f} "
              f"{means['decoder']:>8.3f}   (overall range over seeds {spread:.3f})")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
