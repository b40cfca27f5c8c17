"""Thm. 2.1 on the embedded data: does the majority-dominated share of parameter matrices grow with
the imbalance ratio?

    python benchmarks/dominance_vs_ratio.py [--ratios 1 3 10] [--steps 400] [--seeds 0 1]

For each ratio and seed: the digits set with the exponential profile at that ratio, DDPM trained
`--steps` steps (the default experiment's settings otherwise, `small` U-Net, one thread), then the
probe stage's gradient dominance (cm/probe) with the default probe settings. Prints the share
per block and overall and beside it the graded margin cos(G_all, G_many) - cos(G_all, G_few) (with
its std over the probe batches), and the means over seeds per ratio. A fixed budget for every ratio, so only
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
BLOCKS = ("encoder", "middle", "decoder")


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
    shares = {block: result["by_block"][block]["fraction"] for block in BLOCKS}
    margins = {f"{block}.margin": result["by_block"][block]["margin"] for block in BLOCKS}
    return {"ratio": ratio, "seed": seed, "images": manifest["num_images"], "overall": result["overall"]["fraction"],
            **shares, "overall.margin": result["overall"]["margin"],
            "overall.margin_batch_std": result["overall"]["margin_batch_std"], **margins}


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
                batch_std = r["overall.margin_batch_std"]
                print(f"ratio {ratio:>5g} seed {seed}: {r['images']:4d} images, majority-dominated share "
                      f"{r['overall']:.3f} (encoder {r['encoder']:.3f}, middle {r['middle']:.3f}, "
                      f"decoder {r['decoder']:.3f}); margin {r['overall.margin']:+.4f}"
                      + ("" if batch_std is None else f" (batch std {batch_std:.4f})")
                      + f" (encoder {r['encoder.margin']:+.4f}, middle {r['middle.margin']:+.4f}, "
                      f"decoder {r['decoder.margin']:+.4f})", flush=True)
    print(f"\nDDPM, digits, {args.steps} steps, seeds {args.seeds}: mean over seeds of the share of "
          "majority-dominated matrices and of the margin cos(G_all, G_many) - cos(G_all, G_few)")
    print(f"{'':>6} {'share':^35} | {'margin':^39}")
    print(f"{'ratio':>6}" + "".join(f" {k:>8}" for k in ("overall", *BLOCKS)) + " |"
          + "".join(f" {k:>9}" for k in ("overall", *BLOCKS)))
    for ratio in args.ratios:
        mine = [r for r in rows if r["ratio"] == ratio]
        keys = ("overall", *BLOCKS, "overall.margin", *(f"{b}.margin" for b in BLOCKS))
        means = {k: np.mean([r[k] for r in mine]) for k in keys}
        spread = np.ptp([r["overall"] for r in mine])
        margin_spread = np.ptp([r["overall.margin"] for r in mine])
        print(f"{ratio:>6g}" + "".join(f" {means[k]:>8.3f}" for k in keys[:4]) + " |"
              + "".join(f" {means[k]:>+9.4f}" for k in keys[4:])
              + f"   (overall range over seeds: share {spread:.3f}, margin {margin_spread:.4f})")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
