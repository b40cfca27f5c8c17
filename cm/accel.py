"""How a network runs on its device: the device, precision, memory layout, torch.compile and the
Adam kernel.

These are params.yaml's `device` and the `precision`, `channels_last`, `compile` (train and sample)
and `adam` (train) settings of an experiment. Their defaults (fp32, false, false, auto) are plain
eager float32 with PyTorch's default Adam on the CPU: the numbers dvc.lock holds, bit for bit.

    precision  fp32  float32 everywhere
               tf32  float32 storage; on CUDA, matmuls and convolutions on TF32 tensor cores
               bf16  the network's forward passes under bfloat16 autocast (TF32 for what stays
                     float32); the network returns float32, so every loss term (CM's D_i
                     included), the gradients, the EMA and Adam's state stay float32
    compile    torch.compile of the U-Net's encode and decode, the two halves every pass goes
               through (plain forward, CM's branch-off pass, the shared-encoder fast mode); each new
               batch shape and each branch state (on, off) compiles once, then is reused
    adam       auto: the fused kernel on CUDA, PyTorch's default elsewhere; fused; foreach

CM_COMPILE_BACKEND names torch.compile's backend (default inductor); `aot_eager` captures the same
graphs without generating code, which the tests use on the CPU, where inductor's C++ build of
the U-Net takes minutes.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

PRECISIONS = ("fp32", "tf32", "bf16")
ADAM_KERNELS = ("auto", "fused", "foreach")


def resolve_device(name: str) -> torch.device:
    """params.yaml's `device` as a torch device: `auto` is CUDA where one is visible, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' is not allowed here: no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def configure_backends(precision: str, device: torch.device) -> None:
    """TF32 on CUDA for `tf32` and `bf16`; plain float32 for `fp32`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision = {precision!r} is not allowed: one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        allow = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once


def autocast(precision: str, device: torch.device):
    """The context the forward passes run in: bfloat16 autocast for `bf16`, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_network(net: nn.Module, *, channels_last: bool, compile: bool) -> nn.Module:
    """Set the memory layout and compile `net` in place (its state dict keys are unchanged).

    Compiling `encode` and `decode` rather than `forward` covers every way a method calls the U-Net
    (forward is decode(encode(...)); the shared-encoder mode calls them itself) and keeps the
    module's parameters and checkpoints exactly those of the eager network.
    """
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if compile:
        if not (hasattr(net, "encode") and hasattr(net, "decode")):
            raise TypeError(f"compile: true needs a network with encode/decode, got {type(net).__name__}")
        # dynamic=False: a few fixed shapes (batch, CBDM's doubled batch, guidance's), each compiled once.
        backend = os.environ.get("CM_COMPILE_BACKEND", "inductor")
        net.encode = torch.compile(net.encode, dynamic=False, backend=backend)
        net.decode = torch.compile(net.decode, dynamic=False, backend=backend)
    return net


def to_layout(x: torch.Tensor, channels_last: bool, *, contiguous: bool = False) -> torch.Tensor:
    """x in channels_last memory when asked; otherwise as it is, or NCHW-contiguous with `contiguous`."""
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous() if contiguous else x


def make_adam(params, *, lr: float, kernel: str, device: torch.device) -> torch.optim.Adam:
    """Adam with the kernel asked for; `auto` = fused on CUDA, PyTorch's default elsewhere (on the CPU
    the numbers dvc.lock holds come from the default kernel; the fused CPU kernel rounds differently)."""
    if kernel not in ADAM_KERNELS:
        raise ValueError(f"adam = {kernel!r} is not allowed: one of {', '.join(ADAM_KERNELS)}")
    if kernel == "auto":
        kernel = "fused" if device.type == "cuda" else "default"
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {}}[kernel]
    return torch.optim.Adam(params, lr=lr, **options)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer can skip a step on a device-side flag (fused Adam reads `found_inf`, the
    protocol of torch.amp.GradScaler), so the loop need not ask the host whether a loss was finite."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))
