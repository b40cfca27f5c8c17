"""Training objectives by name. Adding a method means adding a module and a line here.

Names (`METHOD_NAMES`): a base objective, `ddpm`, `cbdm` or `oc`; or a CM variant stacked on a
base, `VARIANT+BASE`, where a bare `VARIANT` means `VARIANT+ddpm`:

    cm             Capacity Manipulation (docs/methods.md, cm)
    lowrank_only   reserved low-rank branches trained without L_CM (lambda = 0, one pass)
    cm_no_con      CM without the consistency term (w_con = 0)
    cm_no_div      CM without the diversity term (w_div = 0)

`MERGE_ONLY` names evaluation-only models that reuse another method's checkpoint (the theta_g
model of a CM run, merged with its branches dropped); they are not training methods.

Parameters come from params.yaml's `method_params`: a base objective reads its own section; a CM
variant reads `method_params.cm` (with the variant's fixed override on top) and
`method_params.<base>` for its base. `resolve_params` gives the effective, defaulted values:
flat for a base, and for a CM variant the CM keys plus a `base` sub-dict.
"""

from __future__ import annotations

from cm.diffusion import GaussianDiffusion
from cm.method_names import (  # noqa: F401 - the registry's public names
    CM_VARIANTS,
    MERGE_ONLY,
    METHOD_NAMES,
    METHODS,
    MethodSpec,
    param_sections,
    parse_method,
)
from cm.methods.base import LossOutput, Method
from cm.methods.cbdm import CBDM
from cm.methods.cm import CM_DEFAULTS, CapacityManipulation
from cm.methods.ddpm import DDPM
from cm.methods.lora import GeneralAdapter, lora_settings
from cm.methods.oc import OC

__all__ = ["LossOutput", "Method", "METHODS", "METHOD_NAMES", "MERGE_ONLY", "PARAM_DEFAULTS",
           "build_method", "param_sections", "parse_method", "resolve_params"]


def _ddpm(diffusion, train, params, class_counts):
    return DDPM(diffusion, train["label_drop"])


def _cbdm(diffusion, train, params, class_counts):
    return CBDM(diffusion, train["label_drop"], class_counts, **params)


def _oc(diffusion, train, params, class_counts):
    return OC(diffusion, train["label_drop"], class_counts)


BASES = {"ddpm": _ddpm, "cbdm": _cbdm, "oc": _oc}
# CM variants: the CM parameters each one fixes, whatever method_params.cm says.
# Defaults: the released-code values (docs/methods.md); the schema's defaults must agree.
PARAM_DEFAULTS = {
    "ddpm": {},
    "cbdm": {"tau": 1.0, "gamma": 0.25, "label_prior": "frequency"},
    "oc": {},
    "cm": dict(CM_DEFAULTS),
}


def _checked(name: str, section: str, values: dict) -> dict:
    allowed = PARAM_DEFAULTS[section]
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise ValueError(f"method {name!r}: parameter {unknown[0]!r} of method_params.{section} is not "
                         f"allowed: one of {', '.join(allowed) or '(none)'}")
    return {**allowed, **values}


def resolve_params(name: str, method_params: dict | None = None, own: dict | None = None) -> dict:
    """The effective parameters of method `name`, defaults filled in.

    method_params: the whole `method_params` mapping of params.yaml (sections may be missing).
    own: explicit values that win over it: for a base, its keys; for a CM variant, CM keys plus
    an optional `base` sub-dict of the base's keys. A CM variant's fixed values (e.g. w_con = 0
    for cm_no_con) win over method_params.cm; an `own` value contradicting one is an error.
    """
    spec = parse_method(name)
    method_params, own = method_params or {}, dict(own or {})
    if spec.variant is None:
        return _checked(name, spec.base, {**method_params.get(spec.base, {}), **own})
    own_base = own.pop("base", {})
    fixed = CM_VARIANTS[spec.variant]
    for key, value in fixed.items():
        if key in own and own[key] != value:
            raise ValueError(f"method {name!r}: {key} = {own[key]!r} is not allowed: {spec.variant} "
                             f"fixes {key} = {value}")
    cm = _checked(name, "cm", {**method_params.get("cm", {}), **own, **fixed})
    base = _checked(name, spec.base, {**method_params.get(spec.base, {}), **own_base})
    return {**cm, "base": base}


def build_method(name: str, *, diffusion: GaussianDiffusion, train: dict, params: dict | None = None,
                 class_counts: list[int], all_params: dict | None = None, lora: dict | None = None) -> Method:
    """The objective `name` with its hyper-parameters.

    params: `method_params.<name>` (the method's own section; for a CM variant it may instead
    carry the CM keys and a `base` sub-dict). all_params: the whole `method_params` mapping, from
    which a CM variant takes `cm` and its base's section. Pass both from params.yaml:
    `build_method(name, ..., params=method_params.get(name, {}), all_params=method_params)`.
    lora: the experiment's `finetune.lora` settings, which the lora methods need.
    """
    spec = parse_method(name)
    values = resolve_params(name, all_params, params)
    if spec.lora and lora is None:
        raise ValueError(f"method {name!r} fine-tunes adapters on a pretrained model: the experiment needs a "
                         f"finetune section")
    if spec.variant is None:
        base = BASES[spec.base](diffusion, train, values, class_counts)
        return GeneralAdapter(base, lora, name) if spec.lora else base
    base = BASES[spec.base](diffusion, train, values.pop("base"), class_counts)
    if not spec.lora:
        return CapacityManipulation(base, class_counts, name=name, **values)
    from cm.finetune import ExpertAdapters  # the optional extra, only for fine-tuning

    method = CapacityManipulation(base, class_counts, name=name, reservation=ExpertAdapters(lora_settings(lora)),
                                  **values)
    method.lora = {**lora, "adapters": ["general", "expert"]}  # what merging rebuilds
    return method
