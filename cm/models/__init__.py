"""Model zoo: the class-conditional DDPM U-Net and its named size presets; `build_model` rebuilds a
checkpoint's network (a diffusers one too, for fine-tuning)."""

from __future__ import annotations

from .unet import NULL_LABEL, UNet

PRESETS: dict[str, dict] = {
    # The DDPM CIFAR-10 model used in the paper (35.75 M parameters with 10 classes).
    "ddpm_cifar": dict(
        ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), num_res_blocks=2, dropout=0.1
    ),
    # Default for the embedded 8x8 single-channel digits data.
    "small": dict(ch=32, ch_mult=(1, 2, 2), attn_resolutions=(4,), num_res_blocks=1, dropout=0.1),
    # Unit tests only.
    "tiny": dict(ch=32, ch_mult=(1, 2), attn_resolutions=(), num_res_blocks=1, dropout=0.0),
    # CIFAR-sized images on CPU budgets (1.1 M parameters; about 0.6 s per batch-32 step on one core).
    "cifar_small": dict(ch=32, ch_mult=(1, 2, 2), attn_resolutions=(8,), num_res_blocks=1, dropout=0.1),
}


def build_unet(model: str | dict, *, num_classes: int, in_channels: int, image_size: int) -> UNet:
    """Build the class-conditional U-Net of a named preset (see ``PRESETS``), or of a mapping
    ``{"preset": name, "ch": width}`` that changes the preset's base width (the capacity sweep)."""
    spec = {"preset": model} if isinstance(model, str) else dict(model)
    preset = spec.pop("preset", None)
    if preset not in PRESETS:
        raise ValueError(f"unknown U-Net preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = sorted(set(spec) - {"ch"})
    if unknown:
        raise ValueError(f"model.{unknown[0]} is not allowed: a model mapping has preset and ch")
    return UNet(**{**PRESETS[preset], **spec}, num_classes=num_classes, in_channels=in_channels,
                image_size=image_size)


def build_model(config: dict):
    """The network a checkpoint's config describes, with initial weights (no low-rank branches or
    adapters: cm/checkpoint.py's build_network adds those): this project's U-Net, or for a fine-tuning that
    starts from a diffusers folder (`config["diffusers"]`) its class-conditioned diffusers U-Net."""
    if config.get("diffusers"):
        from cm.finetune.diffusers_models import network_from_config  # the optional finetune extra

        return network_from_config(config)
    return build_unet(config["preset"], num_classes=config["num_classes"], in_channels=config["in_channels"],
                      image_size=config["image_size"])


__all__ = ["NULL_LABEL", "PRESETS", "UNet", "build_model", "build_unet"]
