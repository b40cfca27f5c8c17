"""LoRA fine-tuning with Capacity Manipulation (paper section 3.3), through peft.

A pretrained model's weights W_f stay frozen; two LoRA adapters are trained, `general` and
`expert` (the reserved capacity): W = W_f + B_g A_g + B_e A_e. `ExpertAdapters` is CM's
reservation for `CapacityManipulation(..., reservation=...)`; `merged` folds the adapters back into
a plain model of the pretrained architecture. `diffusers_models` (imported on first use: diffusers
takes seconds to import) loads diffusers U-Nets and calls them as `net(x, t, y)`.

Needs the optional extra `.[finetune]` (peft, diffusers, transformers).
"""

from __future__ import annotations

from cm.finetune.adapters import (
    EXPERT,
    GENERAL,
    ExpertAdapters,
    LoraSettings,
    adapter_names,
    adapter_parameters,
    adapter_state_dict,
    attach,
    load_adapter_state_dict,
    merged,
)

_DIFFUSERS = ("ClassConditionedUNet", "LatentCodec", "PretrainedUNet", "check_matches", "load_codec",
              "load_pretrained_unet", "network_from_config", "prompt_embeddings", "save_merged_pretrained",
              "starting_model")


def __getattr__(name: str):
    if name in _DIFFUSERS:
        from cm.finetune import diffusers_models

        return getattr(diffusers_models, name)
    raise AttributeError(f"module 'cm.finetune' has no attribute {name!r}")


__all__ = ["EXPERT", "GENERAL", "ExpertAdapters", "LoraSettings", "adapter_names", "adapter_parameters",
           "adapter_state_dict", "attach", "load_adapter_state_dict", "merged", *_DIFFUSERS]
