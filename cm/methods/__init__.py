"""Training objectives by name. Adding a method means adding a module and a line here."""

from __future__ import annotations

from cm.diffusion import GaussianDiffusion
from cm.methods.base import LossOutput, Method
from cm.methods.cm import CapacityManipulation
from cm.methods.ddpm import DDPM

__all__ = ["LossOutput", "Method", "METHODS", "build_method"]


def _ddpm(diffusion, train, params, class_counts):
    return DDPM(diffusion, train["label_drop"])


def _cm(diffusion, train, params, class_counts):
    return CapacityManipulation(_ddpm(diffusion, train, {}, class_counts), class_counts, **params)


METHODS = {"ddpm": _ddpm, "cm": _cm}


def build_method(name: str, *, diffusion: GaussianDiffusion, train: dict, params: dict,
                 class_counts: list[int]) -> Method:
    """The objective `name` with its hyper-parameters (params.yaml: method_params.<name>)."""
    if name not in METHODS:
        raise ValueError(f"method = {name!r} is not allowed: one of {', '.join(METHODS)}")
    return METHODS[name](diffusion, train, params, class_counts)
