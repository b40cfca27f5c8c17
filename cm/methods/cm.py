"""Capacity Manipulation (Hong et al., ICLR 2026) on top of any base objective.

Reserved capacity: decoder 3x3 convs become W = W_g + B A (cm/lowrank.py); when fine-tuning, an
`expert` LoRA adapter beside a `general` one on frozen weights (cm/finetune, paper section 3.3).
theta_g is the model with the reserved capacity off, theta_g+e the full model. Per batch (docs/methods.md, cm):

    D_i  = mean_pixels (h_full,i - h_g,i)^2
    L_CM = C * mean_i( (w_con p_{y_i} - w_div q_{y_i}) D_i ),  p_y ~ N_y,  q_y ~ 1 / N_y
    L    = L_base(h_full) + lambda * L_CM

`passes` chooses how h_full and h_g are computed: two full forward passes as released, or the fast
mode sharing one encoder pass (cm/methods/passes.py).
"""

from __future__ import annotations

import torch

from cm.lowrank import LowRankBranches
from cm.methods.base import LossOutput, Method
from cm.methods.passes import check_passes, full_and_theta_g


def signed_class_weights(class_counts, w_con: float, w_div: float) -> torch.Tensor:
    """C * (w_con p_y - w_div q_y): > 0 pulls class y toward theta_g (consistency), < 0 pushes it
    onto the reserved branch (diversity). On balanced data with w_con = w_div it is zero."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    p = counts / counts.sum()
    q = (1.0 / counts) / (1.0 / counts).sum()
    return len(counts) * (w_con * p - w_div * q)


CM_DEFAULTS = {"rank_ratio": 0.1, "branch_scale": 1.0, "branch_layers": "decoder",  # released values
               "w_con": 1.0, "w_div": 0.2, "lambda": 1.0, "passes": "two"}


class CapacityManipulation(Method):
    """L = L_base(h_full) + lambda * L_CM, with two full forward passes per step as released
    (`passes = "two"`) or one encoder pass shared by both decoder passes (`"shared_encoder"`).

    `base` is any objective whose LossOutput.pred is the full model's eps on (x_t, t, cond).
    `reservation` adds the reserved capacity (`prepare(net)`) and switches it off for theta_g
    (`disabled(net)`, a context manager); by default the low-rank branches of `rank_ratio` etc.
    With lambda = 0 (the `lowrank_only` ablation) the theta_g pass is skipped: the model is
    then the base objective trained with reserved, but unregularised, low-rank branches.
    """

    def __init__(self, base: Method, class_counts, *, rank_ratio: float = CM_DEFAULTS["rank_ratio"],
                 w_con: float = CM_DEFAULTS["w_con"], w_div: float = CM_DEFAULTS["w_div"],
                 branch_scale: float = CM_DEFAULTS["branch_scale"], branch_layers: str = CM_DEFAULTS["branch_layers"],
                 passes: str = CM_DEFAULTS["passes"], name: str | None = None, reservation=None, **kwargs):
        unknown = set(kwargs) - {"lambda"}
        if unknown:
            raise TypeError(f"CapacityManipulation got unexpected parameters {sorted(unknown)}")
        self.base = base
        self.name = name or ("cm" if base.name == "ddpm" else f"cm+{base.name}")
        self.branch_scale, self.branch_layers = float(branch_scale), branch_layers
        self.rank_ratio = rank_ratio if reservation is None else None  # None: no low-rank branches to rebuild
        self.lam = float(kwargs.get("lambda", CM_DEFAULTS["lambda"]))
        self.w_con, self.w_div = float(w_con), float(w_div)
        self.passes = check_passes(passes)
        self.class_weight = signed_class_weights(class_counts, w_con, w_div).float()
        self.reservation = reservation or LowRankBranches(rank_ratio, scale=self.branch_scale, layers=branch_layers)
        if passes == "shared_encoder" and not getattr(self.reservation, "decoder_only", False):
            where = f"branch_layers = {branch_layers!r}" if reservation is None else type(reservation).__name__
            raise ValueError(f"cm: passes = 'shared_encoder' is not allowed with {where}: it shares the encoder "
                             f"between h_full and h_g, so the reserved capacity must be in the decoder only")

    def prepare(self, net) -> None:
        self.base.prepare(net)
        self.reservation.prepare(net)

    def __call__(self, net, x0: torch.Tensor, y: torch.Tensor) -> LossOutput:
        if self.lam == 0:
            return self.base(net, x0, y)  # L_CM has no weight: spare the theta_g pass
        # h_full = out.pred (the base loss is on it); h_g on the same x_t, t and labels, no stop-gradient.
        out, h_g = full_and_theta_g(self.base, self.passes, net, x0, y, self.reservation.disabled)
        d = (out.pred - h_g).pow(2).flatten(1).mean(1)                 # D_i, (N,), float32 (the U-Net's output)
        if self.class_weight.device != y.device:  # moved once, not copied every step
            self.class_weight = self.class_weight.to(y.device)
        l_cm = (self.class_weight[y] * d).mean()                       # weights use the true label
        out.loss = out.loss + self.lam * l_cm
        out.stats.update(loss_cm=l_cm.detach(), gap=d.detach().mean())
        return out
