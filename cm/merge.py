"""Fold every low-rank branch into its base weight: a plain U-Net, so CM costs nothing at inference.

The merged checkpoint's state-dict keys and shapes are exactly those of the DDPM baseline; for
methods without branches merging is a copy. Before writing, merged and unmerged models are run
on the same random batch and must agree (float64 to 1e-8, float32 to a stated tolerance).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from cm import checkpoint
from cm.checkpoint import build_network, has_reserved_capacity
from cm.errors import ConfigError
from cm.lowrank import branches_disabled, merge_lowrank

FLOAT64_TOL = 1e-10   # relative to the output's scale
FLOAT32_TOL = 1e-5    # the branch forward already convolves with W_g + BA, so float32 agrees closely


def _relative_gap(net_a, net_b, config: dict, seed: int = 0) -> float:
    """max |a - b| / max |a| of two networks' outputs on one random batch (in their own dtype)."""
    dtype = next(net_a.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    size, ch, n = config["image_size"], config["in_channels"], 4
    x = torch.randn(n, ch, size, size, generator=gen).to(dtype)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, config["num_classes"], (n,), generator=gen)
    with torch.no_grad():
        out_a, out_b = net_a.eval()(x, t, y), net_b.eval()(x, t, y)
    return ((out_a - out_b).abs().max() / out_a.abs().max().clamp_min(1e-30)).item()


def _merged_plain(net: torch.nn.Module, config: dict, drop_branches: bool) -> torch.nn.Module:
    plain = build_network(config, with_branches=False).to(next(net.parameters()).dtype)
    if config.get("lora"):  # both adapters, or theta_g: the general one only
        from cm.finetune import merged

        weights = merged(net, drop=("expert",) if drop_branches else ()).state_dict()
    else:
        weights = merge_lowrank(net, drop_branches) if config.get("rank_ratio") else net.state_dict()
    plain.load_state_dict(weights)
    return plain


def _as_merged(net: torch.nn.Module, config: dict, drop_branches: bool):
    """The context in which the trained `net` computes what its merge must: itself, or for a theta_g-only
    merge with its reserved capacity off (the branches, or the `expert` adapter)."""
    if not drop_branches:
        return contextlib.nullcontext(net)
    if config.get("lora"):
        from cm.finetune import ExpertAdapters

        return ExpertAdapters().disabled(net)
    return branches_disabled(net)


def merge(model_path: str | Path, out: str | Path, *, drop_branches: bool = False) -> dict:
    """Merge the EMA weights of a trained checkpoint into a plain U-Net checkpoint `out`."""
    state = checkpoint.load_model(model_path)
    config = state["config"]
    has_branches = bool(config.get("rank_ratio") or config.get("lora"))  # anything to merge
    if drop_branches and not has_reserved_capacity(config):
        raise ConfigError(f"{model_path}: a {state['method']!r} checkpoint has no low-rank branches to drop; "
                          f"a theta_g-only model needs a CM variant's checkpoint")
    net = build_network(config)
    net.load_state_dict(state["ema"])
    plain = _merged_plain(net, config, drop_branches)

    report = {"had_branches": has_branches, "drop_branches": drop_branches}
    if has_branches:  # every merge is checked: against the full model, or theta_g's against it with the expert off
        net64 = copy.deepcopy(net).double()
        plain64 = _merged_plain(net64, config, drop_branches)
        with _as_merged(net64, config, drop_branches) as reference64, _as_merged(net, config, drop_branches) as ref:
            report["gap_float64"] = _relative_gap(reference64, plain64, config)
            report["gap_float32"] = _relative_gap(ref, plain, config)
        if report["gap_float64"] > FLOAT64_TOL or report["gap_float32"] > FLOAT32_TOL:
            raise RuntimeError(f"{model_path}: merged and unmerged outputs differ: {report}")
    plain_config = {k: v for k, v in config.items() if k != "lora"}  # a plain U-Net, whatever trained it
    checkpoint.save_merged(out, config={**plain_config, "rank_ratio": None}, method=state["method"],
                           step=state["step"], state_dict=plain.state_dict(), merge=report,
                           codec=state.get("codec"))  # a latent model's VAE, for sampling
    return report
