"""Method names and their grammar, without importing torch (the Snakefile and the config
check read them at parse time). The objectives themselves are in cm/methods.

A name is a base objective (`ddpm`, `cbdm`, `oc`) or a CM variant stacked on a base,
`VARIANT+BASE`, where a bare `VARIANT` means `VARIANT+ddpm`.
"""

from __future__ import annotations

from typing import NamedTuple

BASE_NAMES = ("ddpm", "cbdm", "oc")
# CM variants: the CM parameters each one fixes, whatever method_params.cm says.
CM_VARIANTS = {"cm": {}, "lowrank_only": {"lambda": 0.0}, "cm_no_con": {"w_con": 0.0},
               "cm_no_div": {"w_div": 0.0}}


class MethodSpec(NamedTuple):
    """A parsed method name: the CM variant (None for a plain base objective), the base, and whether
    it fine-tunes through LoRA adapters on frozen pretrained weights (cm/finetune)."""

    variant: str | None
    base: str
    lora: bool = False


METHODS: dict[str, MethodSpec] = {name: MethodSpec(None, name) for name in BASE_NAMES}
for _variant in CM_VARIANTS:
    METHODS[_variant] = MethodSpec(_variant, "ddpm")
    METHODS.update({f"{_variant}+{base}": MethodSpec(_variant, base) for base in BASE_NAMES})
# Fine-tuning (paper section 3.3, an experiment with `finetune`): a `general` adapter trained with DDPM
# (the paper's LoRA row) or OC, or CM with an `expert` adapter beside it as the reserved capacity.
LORA_METHODS = {"lora": MethodSpec(None, "ddpm", True), "lora+oc": MethodSpec(None, "oc", True),
                "lora+cm": MethodSpec("cm", "ddpm", True)}
METHODS.update(LORA_METHODS)
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

# Evaluation-only models -> the training method whose checkpoint they reuse: `<method>_gonly` is the
# theta_g-only model of a run with low-rank branches (merged with the branches dropped; paper Table 7).
GONLY_SUFFIX = "_gonly"
MERGE_ONLY: dict[str, str] = {f"{name}{GONLY_SUFFIX}": name for name, spec in METHODS.items() if spec.variant}


def evaluated_methods(params: dict) -> list[str]:
    """Every model a run samples and evaluates: `methods`, then the theta_g-only models it asks for."""
    return [*params["methods"], *(f"{name}{GONLY_SUFFIX}" for name in params.get("theta_g_only", []))]


def parse_method(name: str) -> MethodSpec:
    """(variant, base) of a method name; ValueError naming the value and what is allowed."""
    if name in METHODS:
        return METHODS[name]
    if name in MERGE_ONLY:
        raise ValueError(f"method = {name!r} is not a training method: it merges the checkpoint of "
                         f"{MERGE_ONLY[name]!r} with its branches dropped")
    raise ValueError(
        f"method = {name!r} is not allowed: one of {', '.join(METHOD_NAMES)} "
        f"(a base {', '.join(BASE_NAMES)}, a CM variant {', '.join(CM_VARIANTS)} optionally followed "
        f"by +base, or to fine-tune {', '.join(LORA_METHODS)})")


def param_sections(name: str) -> tuple[str, ...]:
    """The `method_params` sections a method reads (for fingerprints and DVC param deps)."""
    spec = parse_method(name)
    return (spec.base,) if spec.variant is None else ("cm", spec.base)
