"""One optimisation step of the training loop (forward, backward, clipping, Adam, EMA) and the
running sums the loop logs, every number left on the device until the loop reads them.

A non-finite loss is skipped on the device by fused Adam's `found_inf` flag and counted there
(cm/accel.py); under torchrun the gradient norm is the all-reduced one, so every rank decides alike
(cm/distributed.py).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cm import accel, distributed

log = logging.getLogger(__name__)


class Objective(nn.Module):
    """A method's loss on a batch as one module call, so that DistributedDataParallel sees every
    network pass of a step (CM's branch-off pass, CBDM's batched pair, the shared encoder) inside
    one forward. The passes run under the precision's autocast; the U-Net returns float32."""

    def __init__(self, net: nn.Module, method, precision: str):
        super().__init__()
        self.net, self.method, self.precision = net, method, precision

    def forward(self, x0: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        with accel.autocast(self.precision, x0.device):
            out = self.method(self.net, x0, y)
        return out.loss, out.stats, out.per_sample


class Trainer:
    """One optimisation step (forward, backward, clipping, Adam, EMA) that leaves every number on
    the device, and the running sums the loop logs.

    NaN guard: a step whose loss is not finite changes neither the weights, nor Adam's state, nor
    the EMA, and is counted. In one process with PyTorch's default Adam the loss is checked on the
    host before the backward pass (on the CPU that read costs nothing).
    Otherwise the check is on the gradient norm after the backward pass (a non-finite loss makes it
    non-finite; under torchrun it is the all-reduced norm, so every rank decides alike), and with
    fused Adam it never leaves the device: `found_inf` skips the update, the EMA lerps by 0.
    """

    def __init__(self, net: nn.Module, method, cfg: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        self.net = net.to(device).train()
        # The EMA copy after the layout change (its tensors have the weights' strides, as the fused
        # _foreach kernels need) and before compiling (a plain module, not compiled wrappers).
        accel.prepare_network(net, channels_last=cfg["channels_last"], compile=False)
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        accel.prepare_network(net, channels_last=cfg["channels_last"], compile=cfg["compile"])
        objective = Objective(net, method, cfg["precision"])
        # Unused parameters exist on some steps (the class embedding when the batch's labels are
        # dropped); their gradients stay None on every rank, as in one process.
        self.objective = (DistributedDataParallel(objective, find_unused_parameters=True)
                          if distributed.world_size() > 1 else objective)
        # Only what trains (every weight, or a fine-tuning's adapters) is optimised and averaged.
        trains = [p.requires_grad for p in net.parameters()]
        self.params = [p for p, t in zip(net.parameters(), trains) if t]
        self.ema_params = [p for p, t in zip(self.ema.parameters(), trains) if t]
        mismatch = foreach_mismatch(self.ema_params, self.params)
        if mismatch:  # still correct, but one kernel launch per tensor and step
            log.warning("the EMA update misses the fused multi-tensor kernels: %s", mismatch)
        self.optimizer = accel.make_adam(self.params, lr=cfg["lr"], kernel=cfg["adam"], device=device)
        self.on_device = accel.skips_on_device(self.optimizer)
        self.loss_check = not self.on_device and distributed.world_size() == 1
        # float64 sums, the precision of a Python float: the logged means do not depend on where they are summed.
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)  # skipped steps, all so far
        self.last_bad = torch.zeros((), device=device)  # the latest skipped step's loss, for the message
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the log window's (sum, count)
        # The base loss per class over the window (sum, count): the per-class training loss.
        classes = getattr(net, "num_classes", None) or 0
        self.class_sums = torch.zeros((2, classes), dtype=torch.float64, device=device)

    def step(self, x0: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats, per_sample = self.objective(accel.to_layout(x0, self.cfg["channels_last"]), y)
        if self.loss_check and not torch.isfinite(loss):
            self._count_bad(torch.ones((), dtype=torch.bool, device=self.device), loss)
            return
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg["grad_clip"])
        bad = ~torch.isfinite(grad_norm)
        self._count_bad(bad, loss)
        if self.on_device:
            self.optimizer.found_inf = bad.float()  # fused Adam skips the update (GradScaler's protocol)
        elif not self.loss_check and bad:           # under torchrun without fused Adam: a host read
            return
        self.optimizer.step()
        ema_update(self.ema_params, self.params, 1.0 - self.cfg["ema_decay"], bad if self.on_device else None)
        good = (~bad).double()
        for key, value in {"loss": loss, "grad_norm": grad_norm, **stats}.items():
            value = torch.where(bad, 0.0, value.detach().double())  # a skipped step adds nothing
            # (sum, count) per key: a statistic may exist on some steps only (CBDM's on conditional ones).
            total, count = self.sums.get(key, (0.0, 0.0))
            self.sums[key] = (value + total, good + count)
        if per_sample is not None and self.class_sums.shape[1]:
            per_sample = per_sample.double()
            self.class_sums.index_add_(1, y, torch.stack([per_sample, torch.ones_like(per_sample)]) * good)

    def _count_bad(self, bad: torch.Tensor, loss: torch.Tensor) -> None:
        self.nonfinite += bad
        self.last_bad = torch.where(bad, loss.detach(), self.last_bad)

    def read_window(self) -> tuple[dict[str, float], int]:
        """The log window's means over its finite steps (and over the ranks; empty if none) and the
        count of skipped steps so far: one read from the device. The window starts again."""
        keys = list(self.sums)
        values = torch.cat([torch.stack([self.nonfinite, *(part for k in keys for part in self.sums[k])]),
                            self.class_sums.flatten()])
        nonfinite, *sums = distributed.mean_over_ranks(values).tolist()
        classes = self.class_sums.shape[1]
        n = 2 * len(keys)
        sums, class_totals, class_counts = sums[:n], sums[n:n + classes], sums[n + classes:]
        self.sums.clear()
        self.class_sums.zero_()
        means = {k: total / count for k, total, count in zip(keys, sums[::2], sums[1::2]) if count}
        if means and classes:
            means.update({f"loss_class_{c}": total / count
                          for c, (total, count) in enumerate(zip(class_totals, class_counts)) if count})
        return means, int(nonfinite)


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], weight: float,
               skip: torch.Tensor | None = None) -> None:
    """ema <- ema + weight (params - ema), in multi-tensor kernels over the whole list.

    weight is a Python float: the fused _foreach kernels take one host scalar for every tensor
    (a list of 0-dim tensor weights fails their same-shape condition and runs one lerp per tensor).
    skip: a 0-dim device bool (the step was not finite) that makes the update a no-op without a host
    read; the weight then is a device tensor, applied by _foreach_mul_'s one-tensor form.
    """
    if skip is None:
        torch._foreach_lerp_(ema, params, weight)
        return
    delta = torch._foreach_sub(params, ema)
    torch._foreach_mul_(delta, torch.where(skip, 0.0, weight).to(ema[0].dtype))
    torch._foreach_add_(ema, delta)


def foreach_mismatch(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    """Why two tensor lists would miss the fused _foreach kernels' fast path (the same device,
    dtype and strides pairwise, dense tensors, one device and dtype per list), or "" when they meet it."""
    if len(a) != len(b):
        return f"{len(a)} tensors against {len(b)}"
    kinds = {(x.device, x.dtype) for x in (*a, *b)}
    if len(kinds) > 1:
        return f"more than one device/dtype: {sorted(map(str, kinds))}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.stride() != y.stride():
            return f"tensor {i}: shape {tuple(x.shape)} strides {x.stride()} against {tuple(y.shape)} {y.stride()}"
        if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
            return f"tensor {i}: not dense (strides {x.stride()})"
    return ""
