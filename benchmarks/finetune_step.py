"""Cost of CM when fine-tuning with LoRA (cm/finetune): one `lora+cm` step against one plain `lora` step,
and merged-model inference against the pretrained model's, on the same model, batch and machine, one run.

    python benchmarks/finetune_step.py [--batch 64] [--rank 8] [--rounds 7] [--steps 3] [--threads 1]
                                       [--sd-widths] [--sd-batch 8]

`lora`: the `general` adapter only, DDPM loss (one forward pass). `lora+cm`: `general` and `expert`,
CM's loss on DDPM (two forward passes: theta_g+e, then theta_g with `expert` off). Both on the
project's U-Net preset "small" with 8x8x1 digits-sized batches, and on a small UNet2DConditionModel
(latent-sized 4x8x8 inputs, per-class prompt embeddings) through ClassConditionedUNet. Inference:
the merged model (both adapters folded into W_f) against the pretrained model, with equal parameter
counts asserted. `--sd-widths` adds a U-Net of Stable Diffusion v1.5's first two widths (320, 640;
cross-attention 768) with the `sd15_artbench_*` entries' LoRA (rank 4 on to_q, to_k, to_v, to_out.0),
where an adapter is a small share of its layer, as in the paper's setting. Repetitions are
interleaved so that machine noise hits both alike; the figures to read are the medians' ratios.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics

import torch
from step_time import time_interleaved

from cm.data.profiles import exponential_counts
from cm.diffusion import GaussianDiffusion
from cm.finetune import GENERAL, ExpertAdapters, LoraSettings, attach, merged
from cm.methods.cm import CapacityManipulation
from cm.methods.ddpm import DDPM
from cm.models import build_unet

NUM_CLASSES = 10


SD_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the sd15_artbench_* entries' LoRA targets


def cond_unet(num_classes: int, widths=(32, 64), cross: int = 32):
    """A Stable-Diffusion-shaped U-Net (random weights) behind the project's net(x, t, y) call."""
    from diffusers import UNet2DConditionModel

    from cm.finetune.diffusers_models import ClassConditionedUNet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=widths, layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross,
                                norm_num_groups=8 if widths[0] < 320 else 32, attention_head_dim=8)
    return ClassConditionedUNet(unet, num_classes, torch.randn(num_classes + 1, 16, cross)), 4


def train_step(net, method, x0, y):
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = method(net, x0, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def infer_step(net, x, t, y):
    net.eval()

    @torch.no_grad()
    def step():
        net(x, t, y)
    return step


def make_steps(label: str, pretrained, channels: int, batch: int, settings: LoraSettings,
               counts) -> tuple[dict, dict]:
    """The four timed functions of one model, and facts to print (parameter counts, merge gap)."""
    diffusion = GaussianDiffusion(1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, channels, 8, 8, generator=gen) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)

    lora = copy.deepcopy(pretrained)
    attach(lora, settings, (GENERAL,))
    cm_net = copy.deepcopy(pretrained)
    cm = CapacityManipulation(DDPM(diffusion, 0.1), counts, reservation=ExpertAdapters(settings))
    cm.prepare(cm_net)
    with torch.no_grad():  # B = 0 at attach; training makes it non-zero, which the merge check needs
        for name, p in cm_net.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02, generator=gen)
    plain = merged(cm_net)
    count = sum(p.numel() for p in pretrained.parameters())
    assert sum(p.numel() for p in plain.parameters()) == count, "merging must give the pretrained size"
    with torch.no_grad():
        cm_net.eval()
        adapted = cm_net(x0, t, y)
        gap = ((plain.eval()(x0, t, y) - adapted).abs().max() / adapted.abs().max()).item()
        cm_net.train()
    adapters = sum(p.numel() for p in cm_net.parameters() if p.requires_grad)
    steps = {f"{label} lora": train_step(lora.train(), DDPM(diffusion, 0.1), x0, y),
             f"{label} lora+cm": train_step(cm_net.train(), cm, x0, y),
             f"{label} pretrained infer": infer_step(pretrained, x0, t, y),
             f"{label} merged infer": infer_step(plain, x0, t, y)}
    return steps, {"batch": batch, "rank": settings.rank, "params": count, "adapter params (both)": adapters,
                   "float32 max|merged - adapted| / max|adapted|": gap}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sd-widths", action="store_true", help="add the U-Net of SD v1.5's widths (slow)")
    parser.add_argument("--sd-batch", type=int, default=8, help="its batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = exponential_counts(5000, NUM_CLASSES, 100)
    torch.manual_seed(0)
    settings = LoraSettings(rank=args.rank)
    models = {"unet-small": (build_unet("small", num_classes=NUM_CLASSES, in_channels=1, image_size=8), 1,
                             args.batch, settings),
              "sd-small": (*cond_unet(NUM_CLASSES), args.batch, settings)}
    if args.sd_widths:
        models["sd-widths"] = (*cond_unet(NUM_CLASSES, widths=(320, 640), cross=768), args.sd_batch,
                               LoraSettings(rank=4, target_modules=SD_TARGETS))
    steps, facts = {}, {}
    for label, (net, channels, batch, lora) in models.items():
        s, f = make_steps(label, net, channels, batch, lora, counts)
        steps.update(s)
        facts[label] = f
    times = time_interleaved(steps, args.rounds, args.steps)
    median = {name: statistics.median(v) for name, v in times.items()}
    print(f"{platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), {args.rounds} rounds x {args.steps} calls, medians")
    for label in models:
        print(f"{label}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v:,}"
                                       for k, v in facts[label].items()))
        m = {name.removeprefix(f"{label} "): v for name, v in median.items() if name.startswith(f"{label} ")}
        for name, value in m.items():
            print(f"  {name:18s} {value * 1000:8.2f} ms")
        print(f"  lora+cm / lora step          x{m['lora+cm'] / m['lora']:.2f}")
        print(f"  merged / pretrained infer    x{m['merged infer'] / m['pretrained infer']:.2f}")


if __name__ == "__main__":
    main()
