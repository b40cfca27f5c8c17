"""Fine-tuning through LoRA on frozen pretrained weights (paper section 3.3; cm/finetune, peft).

`lora` and `lora+oc` train one `general` adapter per targeted layer, W = W_f + B_g A_g, with DDPM's or
OC's loss (the paper's LoRA and OC rows of Table 6). `lora+cm` is CapacityManipulation with an `expert`
adapter beside it as the reserved capacity, W = W_f + B_g A_g + B_e A_e, theta_g having B_e A_e off
(cm/methods/__init__.py builds it). W_f never receives a gradient.
"""

from __future__ import annotations

from cm.methods.base import LossOutput, Method


def lora_settings(lora: dict):
    """peft-backed LoraSettings from an experiment's `finetune.lora` (imports the optional extra)."""
    try:
        from cm.finetune import LoraSettings
    except ImportError as err:
        raise ImportError(f"the lora methods need the finetune extra: pip install -e '.[finetune]' ({err})") from None
    targets = lora.get("target_modules")
    return LoraSettings(rank=lora["rank"], alpha=lora.get("alpha"), target_modules=tuple(targets) if targets else None,
                        train_base=lora.get("train_base", False))


class GeneralAdapter(Method):
    """A base objective trained through a `general` LoRA adapter on frozen weights."""

    def __init__(self, base: Method, lora: dict, name: str):
        self.base, self.name, self.lora = base, name, {**lora, "adapters": ["general"]}

    def prepare(self, net) -> None:
        from cm.finetune import attach

        self.base.prepare(net)
        attach(net, lora_settings(self.lora), ("general",))

    def __call__(self, net, x0, y) -> LossOutput:
        return self.base(net, x0, y)
