"""LoRA adapters through peft on any torch module: CM's reserved capacity when fine-tuning (paper section 3.3).

Each targeted layer keeps its frozen pretrained weight W_f and gets two trainable low-rank adapters,

    W = W_f + s B_g A_g + s B_e A_e,      s = alpha / rank  (1 by default, as CM's released branches),

`general` (B_g A_g) for general / majority knowledge and `expert` (B_e A_e) for the capacity reserved
for minority classes. theta_g is the model with `expert` off and `general` on; CM's loss compares it
with the full model (cm/methods/cm.py, with `reservation=ExpertAdapters(...)`). After training both
adapters are merged into W_f (`merged`): a plain model of exactly the pretrained architecture.

peft does the layers (`peft.tuners.lora`): for nn.Linear A is (r, in) and B (out, r); for nn.Conv2d A
is a conv with the base layer's kernel, stride and padding (r, in, k, k) and B a 1x1 conv (out, r).
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.functional import set_adapter
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

GENERAL, EXPERT = "general", "expert"

# Default target layers, by model family; those the model has are used (attention may be absent).
DIFFUSERS_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")  # attention projections, resnet convs
UNET_TARGETS = ("conv1", "conv2", "q", "k", "v", "proj")  # the same layers of cm.models.UNet
INITS = (True, "gaussian")  # peft inits that leave W_f alone and start B at zero
ADAPTABLE = (nn.Linear, nn.Conv2d)  # what `merged` turns back into plain layers


@dataclass(frozen=True)
class LoraSettings:
    """The adapters' shape, shared by `general` and `expert`.

    rank: r of every adapter. 8: inside the 4-64 range common for Stable Diffusion LoRA, where one
        adapter is ~1-3% of a 3x3 conv's weights (320-1280 channels), and at least CM's from-scratch
        reservation on the project's U-Nets (0.1 x 32-128 channels = 3-12). On those narrow U-Nets
        one adapter is ~10-30% of a conv's weights: lower it there when the checkpoint size matters.
    alpha: LoRA's alpha; None means alpha = rank, i.e. scaling s = 1 (the released CM branches are unscaled).
    target_modules: layer names as peft matches them (the full name, or its ending after a dot);
        None means the model family's defaults that the model has (DIFFUSERS_TARGETS or UNET_TARGETS).
    init: peft's `init_lora_weights`: True (A kaiming-uniform) or "gaussian" (A normal); B starts at
        zero either way, so attaching does not change the function.
    dropout: dropout on the adapters' input (0: the two passes of CM see the same adapters).
    train_base: False (the paper's setting): W_f is frozen and only the adapters train; True: W_f trains
        with them (full fine-tuning, CM's expert adapter still the reserved capacity).
    """

    rank: int = 8
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    init: bool | str = True
    dropout: float = 0.0
    train_base: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank = {self.rank!r} is not allowed: an integer >= 1")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoRA alpha = {self.alpha!r} is not allowed: a number > 0, or None for alpha = rank")
        if not (self.init is True or self.init == "gaussian"):  # `in INITS` would take 1 for True
            raise ValueError(f"LoRA init = {self.init!r} is not allowed: one of {', '.join(map(repr, INITS))} "
                             f"(B starts at zero and W_f is left alone)")
        if not isinstance(self.train_base, bool):
            raise ValueError(f"LoRA train_base = {self.train_base!r} is not allowed: true or false")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout = {self.dropout!r} is not allowed: in [0, 1)")
        if self.target_modules is not None:
            targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"LoRA target_modules = {self.target_modules!r} is not allowed: "
                                 f"non-empty layer names, or None for the defaults")
            object.__setattr__(self, "target_modules", targets)

    @property
    def scaling(self) -> float:
        """s = alpha / rank, the factor on every B A."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def lora_config(self, targets: Sequence[str]) -> LoraConfig:
        """peft's LoraConfig for these settings on the resolved `targets`."""
        return LoraConfig(r=self.rank, lora_alpha=self.rank if self.alpha is None else self.alpha,
                          target_modules=list(targets), lora_dropout=self.dropout,
                          init_lora_weights=self.init, bias="none")


def _matches(name: str, pattern: str) -> bool:
    """peft's rule for a list of target names: the whole qualified name, or its ending after a dot."""
    return name == pattern or name.endswith("." + pattern)


def _short(name: str) -> str:
    """A layer's leaf name, with its parent's when the leaf is an index (`to_out.0`, `tail.2`)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _adaptable(m: nn.Module) -> bool:
    """An nn.Linear / nn.Conv2d, or one that already carries peft adapters (a second `attach`)."""
    return isinstance(m.get_base_layer() if isinstance(m, BaseTunerLayer) else m, ADAPTABLE)


def _adaptable_names(net: nn.Module, limit: int = 40) -> str:
    names = sorted({_short(n) for n, m in net.named_modules() if _adaptable(m) and n and not n.endswith(".base_layer")})
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def default_targets(net: nn.Module) -> tuple[str, ...]:
    """The family's default target names that `net` has: UNET_TARGETS inside a cm.models.UNet,
    DIFFUSERS_TARGETS otherwise (a diffusers UNet without attention blocks gets its convs only)."""
    from cm.models.unet import UNet

    family = UNET_TARGETS if any(isinstance(m, UNet) for m in net.modules()) else DIFFUSERS_TARGETS
    layers = [n for n, m in net.named_modules() if _adaptable(m)]
    found = tuple(p for p in family if any(_matches(n, p) for n in layers))
    if not found:
        raise ValueError(f"no default LoRA target in {type(net).__name__} (looked for {', '.join(family)}): "
                         f"name target_modules among the layers that can carry an adapter: {_adaptable_names(net)}")
    return found


def resolve_targets(net: nn.Module, settings: LoraSettings) -> tuple[str, ...]:
    """The target names for `net`: each must match at least one layer, and only nn.Linear / nn.Conv2d."""
    targets = settings.target_modules or default_targets(net)
    for pattern in targets:
        hits = [(n, m) for n, m in net.named_modules() if _matches(n, pattern)]
        if not hits:
            raise ValueError(f"LoRA target_modules entry {pattern!r} matches no layer of {type(net).__name__}; "
                             f"layers that can carry an adapter: {_adaptable_names(net)}")
        bad = [(n, m) for n, m in hits if not _adaptable(m)]
        if bad:
            raise ValueError(f"LoRA target_modules entry {pattern!r} matches {type(bad[0][1]).__name__} layer "
                             f"{bad[0][0]!r}: only nn.Linear and nn.Conv2d can carry an adapter")
    return targets


def rank_limit(net: nn.Module, settings: LoraSettings) -> tuple[int, str]:
    """The largest rank an adapter can use on every targeted layer, and the layer that sets it: B A
    of a Linear has rank at most min(in, out); a Conv2d's A is a k x k conv to r channels and B a
    1 x 1 conv back, so min(out, in k k). A larger rank adds parameters that add nothing."""
    targets = resolve_targets(net, settings)
    limits = []
    for name, module in net.named_modules():
        if any(_matches(name, pattern) for pattern in targets) and _adaptable(module):
            layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(layer, nn.Linear):
                limits.append((min(layer.in_features, layer.out_features), name))
            else:
                fan_in = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
                limits.append((min(layer.out_channels, fan_in), name))
    return min(limits)


def tuner_layers(net: nn.Module) -> Iterator[tuple[str, BaseTunerLayer]]:
    """(qualified name, peft layer) of every adapted layer of `net`."""
    return ((n, m) for n, m in net.named_modules() if isinstance(m, BaseTunerLayer))


def adapter_names(net: nn.Module) -> tuple[str, ...]:
    """The adapters attached to `net`, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in tuner_layers(net):
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return tuple(names)


def _targeted(net: nn.Module, targets: Sequence[str]) -> set[int]:
    return {id(m) for n, m in net.named_modules() if any(_matches(n, p) for p in targets)}


def _peft_mixin(net: nn.Module, targets: Sequence[str]):
    """The diffusers model with the PeftAdapterMixin API that holds every targeted layer: `net`
    itself, or the one inside a wrapper (ClassConditionedUNet's `unet`); None if there is none.
    diffusers is looked at only when already imported: it takes seconds to import."""
    if "diffusers" not in sys.modules:
        return None
    from diffusers.loaders.peft import PeftAdapterMixin

    if isinstance(net, PeftAdapterMixin):
        return net
    inner = [m for m in net.modules() if isinstance(m, PeftAdapterMixin)]
    if len(inner) == 1 and _targeted(inner[0], targets) == _targeted(net, targets):  # names relative to it match
        return inner[0]
    return None


def attach(net: nn.Module, settings: LoraSettings = LoraSettings(),
           adapters: Sequence[str] = (GENERAL,)) -> list[str]:
    """Freeze every base parameter of `net` (unless `settings.train_base`) and add the named LoRA
    adapters, in place; all of the net's adapters end active and trainable. Returns the qualified
    names of the adapted layers.

    A diffusers model with PeftAdapterMixin (UNet2DConditionModel, also inside a ClassConditionedUNet)
    gets them through its own `add_adapter`, so diffusers' adapter API (`active_adapters`,
    `save_lora_adapter`, ...) knows them; any other module (cm.models.UNet, UNet2DModel) through
    `peft.inject_adapter_in_model`. Either way the layers are peft's LoRA layers.
    """
    adapters = (adapters,) if isinstance(adapters, str) else tuple(adapters)
    present = adapter_names(net)
    if not adapters or len(set(adapters)) != len(adapters) or set(adapters) & set(present):
        raise ValueError(f"adapters = {adapters!r} is not allowed: distinct new names "
                         f"(already attached: {', '.join(present) or 'none'})")
    targets = resolve_targets(net, settings)
    for p in net.parameters():
        p.requires_grad_(False)  # W_f stays as pretrained
    mixin = _peft_mixin(net, targets)
    with warnings.catch_warnings():
        # Several adapters on one model is the point here, not an accident.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for name in adapters:
            config = settings.lora_config(targets)
            if mixin is not None:
                mixin.add_adapter(config, name)
            else:
                inject_adapter_in_model(config, net, adapter_name=name)
    set_adapter(net, list(adapter_names(net)))  # peft: active, and requires_grad on their A and B
    if settings.train_base:
        for p in net.parameters():
            p.requires_grad_(True)
    return [n for n, _ in tuner_layers(net)]


def adapter_parameters(net: nn.Module, names: Sequence[str] | None = None) -> list[nn.Parameter]:
    """The A and B parameters of the named adapters (all when None), layer by layer."""
    return [p for _, layer in tuner_layers(net) for d in (layer.lora_A, layer.lora_B)
            for key, mod in d.items() if names is None or key in names for p in mod.parameters()]


class ExpertAdapters:
    """CM's reserved capacity when fine-tuning: the `reservation` of CapacityManipulation.

    `prepare(net)` freezes W_f and attaches `general` and `expert` (both active and trainable);
    `disabled(net)` is the context in which net is theta_g: `expert` off, `general` on.
    """

    decoder_only = False  # adapters sit in the encoder too: CM's shared-encoder pass cannot serve

    def __init__(self, settings: LoraSettings = LoraSettings()):
        self.settings = settings

    def prepare(self, net: nn.Module) -> None:
        attach(net, self.settings, (GENERAL, EXPERT))

    @contextmanager
    def disabled(self, net: nn.Module) -> Iterator[nn.Module]:
        """Run `net` without `expert` (theta_g), restoring each layer's active adapters afterwards.

        The switch writes each peft layer's active-adapter list (what `active_adapters` reads)
        and nothing else. peft's `set_adapter` would also flip requires_grad on every adapter, at
        ~0.15 ms per layer (12 ms per step on the small digits U-Net, more than its GPU step), and
        an expert left with requires_grad False when backward runs gets no gradient from the full
        pass: autograd reads a leaf's flag at backward time. Here no flag changes, so the full
        pass's graph reaches the expert's A and B whatever happens inside the context.
        """
        layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
        if not any(EXPERT in layer.lora_A for layer in layers):
            raise ValueError(f"cm: no {EXPERT!r} adapter on {type(net).__name__}: call ExpertAdapters.prepare first")
        saved = [layer.active_adapter for layer in layers]
        for layer in layers:
            layer._active_adapter = [a for a in layer.active_adapters if a != EXPERT]
        try:
            yield net
        finally:
            for layer, active in zip(layers, saved):
                layer._active_adapter = active


def _adapter_keys(net: nn.Module) -> list[str]:
    """State-dict keys of the adapters' tensors: `<layer>.lora_A.<adapter>.weight`, ..."""
    prefixes = tuple(f"{n}.{attr}." for n, layer in tuner_layers(net) for attr in layer.adapter_layer_names)
    return [k for k in net.state_dict() if k.startswith(prefixes)]


def adapter_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors (copies), keyed as in net.state_dict(): a small checkpoint."""
    state = net.state_dict()
    return {k: state[k].detach().clone() for k in _adapter_keys(net)}


def load_adapter_state_dict(net: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load `adapter_state_dict` output into a net with the same adapters attached; the keys and
    shapes must be exactly the net's adapter tensors."""
    own = net.state_dict()
    expected = _adapter_keys(net)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter state of {type(net).__name__} does not fit: {len(missing)} missing "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
                         f"attach the same adapters with the same settings first")
    wrong = [k for k in expected if state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"adapter tensor {wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, the net's is "
                         f"{tuple(own[wrong[0]].shape)}: was it saved with another rank?")
    net.load_state_dict(dict(state), strict=False)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    # setattr on an existing child keeps its slot, so state-dict key order is preserved.
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def merged(net: nn.Module, drop: Sequence[str] = ()) -> nn.Module:
    """A copy of `net` with its adapters merged into the base weights, W = W_f + sum s B A (peft's
    `merge`), and every adapted layer replaced by its plain nn.Linear / nn.Conv2d again: the
    state-dict keys and parameter count are those of the model before `attach`. `net` is not modified.

    `drop` names adapters left out of the merge: `drop=("expert",)` gives the theta_g model
    (the ablation). The copy's parameters keep requires_grad False, as W_f had.
    """
    drop = (drop,) if isinstance(drop, str) else tuple(drop)
    names = adapter_names(net)
    unknown = sorted(set(drop) - set(names))
    if unknown:
        raise ValueError(f"drop = {drop!r} is not allowed: names of attached adapters ({', '.join(names) or 'none'})")
    out = copy.deepcopy(net)
    keep = [a for a in names if a not in drop]
    for name, layer in list(tuner_layers(out)):
        if keep:
            layer.merge(safe_merge=True, adapter_names=keep)  # safe_merge: NaN / inf raise instead of merging
        _set_submodule(out, name, layer.get_base_layer())
    for m in out.modules():  # peft's bookkeeping (diffusers' too) goes with the layers
        if "peft_config" in vars(m):
            del m.peft_config
        if "_hf_peft_config_loaded" in vars(m):
            m._hf_peft_config_loaded = False
    return out


__all__ = ["ADAPTABLE", "DIFFUSERS_TARGETS", "EXPERT", "GENERAL", "UNET_TARGETS", "ExpertAdapters", "LoraSettings",
           "adapter_names", "adapter_parameters", "adapter_state_dict", "attach", "default_targets",
           "load_adapter_state_dict", "merged", "resolve_targets", "tuner_layers"]
