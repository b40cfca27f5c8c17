"""Conversions between stored images (uint8, NHWC) and model tensors (float, NCHW, [-1, 1])."""

from __future__ import annotations

import numpy as np
import torch


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, C, H, W), a view: a quarter of float32's memory on a GPU."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def scale(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C), or float in [0, 1] (unquantised samples) -> float32 (N, C, H, W) in [-1, 1]."""
    x = to_nchw(images)
    return scale(x) if x.dtype == torch.uint8 else x.float() * 2 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), rounded and clipped."""
    x = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()
