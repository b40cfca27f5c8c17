"""What a pretrained diffusers folder holds, read from its JSON configs alone (no weights, no diffusers
import): the checks an experiment's `finetune.diffusers` gets when params.yaml is read, before any job.

A folder is a U-Net saved with `save_pretrained` (config.json), or a pipeline folder such as Stable
Diffusion's (model_index.json with unet/, and text_encoder/ + tokenizer/ for prompts, vae/ for a latent
model). A pipeline with a VAE is a latent diffusion model: its U-Net sees the VAE's latents, of
`latent_channels` channels and the image size divided by 2 per VAE down-sampling block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

UNET_CLASS_NAMES = ("UNet2DModel", "UNet2DConditionModel")
UNET_FIELDS = ("in_channels", "sample_size")  # what the fit to the data is read from
EXPECTED = ("a diffusers UNet saved with save_pretrained (config.json with _class_name UNet2DModel or "
            "UNet2DConditionModel), or a Stable Diffusion pipeline folder (model_index.json, unet/, text_encoder/, "
            "tokenizer/, vae/)")


@dataclass(frozen=True)
class FolderSpec:
    """A pretrained folder's parts: the U-Net's config, whether it has the text encoder and tokenizer that
    turn class names into prompts, and its VAE's config (None: the U-Net works on pixels)."""

    root: Path
    unet: dict
    text: bool = False
    vae: dict | None = None

    @property
    def unet_class(self) -> str:
        return self.unet["_class_name"]

    def network_shape(self) -> tuple[int, int]:
        """(channels, size) of what the U-Net denoises: the latents for a latent model, else the images."""
        size = self.unet.get("sample_size")
        size = size[0] if isinstance(size, (list, tuple)) else size
        return self.unet.get("in_channels"), size

    def image_shape(self) -> tuple[int, int]:
        """(channels, size) of the images this model makes (through its VAE, if it has one)."""
        channels, size = self.network_shape()
        if self.vae is None:
            return channels, size
        factor = 2 ** (len(self.vae.get("block_out_channels", ())) - 1)
        return self.vae.get("in_channels", 3), size * factor


def _read_json(path: Path, root: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{root} is not a diffusers model: {path.name} is unreadable ({err}); expected {EXPECTED}")
    if not isinstance(found, dict):
        raise ValueError(f"{root} is not a diffusers model: {path.name} holds no mapping; expected {EXPECTED}")
    return found


def unet_config(folder: Path, root: Path) -> dict:
    """The config.json of a U-Net folder; ValueError unless it names a U-Net class fine-tuned here."""
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{root} is not a diffusers model: no {config.relative_to(root.parent)}; expected {EXPECTED}")
    found = _read_json(config, root)
    if found.get("_class_name") not in UNET_CLASS_NAMES:
        raise ValueError(f"{root} holds a {found.get('_class_name')!r}, not a U-Net this project fine-tunes: "
                         f"one of {', '.join(UNET_CLASS_NAMES)}")
    missing = [key for key in UNET_FIELDS if found.get(key) is None]
    if missing:
        raise ValueError(f"{config}: the U-Net's config lacks {', '.join(missing)}, which say what it denoises "
                         f"(a save_pretrained config.json has them)")
    return found


def describe(folder) -> FolderSpec:
    """The FolderSpec of a local folder; ValueError (one line) if it is missing or not a diffusers model."""
    root = Path(folder)
    if root.is_file():
        raise ValueError(f"pretrained model folder {root} is a file, not a folder; expected {EXPECTED}")
    if not root.is_dir():
        raise ValueError(f"pretrained model folder {root} does not exist; expected {EXPECTED}")
    index = root / "model_index.json"
    if not index.is_file():
        return FolderSpec(root, unet_config(root, root))
    parts = _read_json(index, root)
    if "unet" not in parts:
        raise ValueError(f"{root}/model_index.json lists no unet: expected {EXPECTED}")
    for part in ("text_encoder", "tokenizer", "vae"):
        if part in parts and parts[part] is not None and not (root / part).is_dir():
            raise ValueError(f"{root} is not a complete pipeline: model_index.json lists {part} but {part}/ is missing")
    vae = None
    if parts.get("vae") is not None:
        vae = _read_json(root / "vae" / "config.json", root) if (root / "vae" / "config.json").is_file() else None
        if vae is None or vae.get("_class_name") != "AutoencoderKL":
            raise ValueError(f"{root}/vae is not an AutoencoderKL folder (vae/config.json with _class_name "
                             f"AutoencoderKL): the VAE of a latent model")
    text = parts.get("text_encoder") is not None and parts.get("tokenizer") is not None
    return FolderSpec(root, unet_config(root / "unet", root), text=text, vae=vae)


def check_fits(spec: FolderSpec, *, image_shape: tuple[int, int], num_classes: int, prompt: str | None) -> None:
    """ValueError (one line) unless the folder's model makes images of `image_shape` (channels, size) for
    `num_classes` classes: a class embedding of num_classes + 1 slots, or prompts from a template with
    {class} and the pipeline's text encoder."""
    made = spec.image_shape()
    if tuple(made) != tuple(image_shape):
        via = " through its VAE" if spec.vae is not None else ""
        raise ValueError(f"{spec.root}: the model makes {made[0]}-channel {made[1]}x{made[1]} images{via}, "
                         f"the data is {image_shape[0]}-channel {image_shape[1]}x{image_shape[1]}: use a pretrained "
                         f"model of the data's shape (or set data.image_size)")
    if spec.unet_class == "UNet2DModel":
        slots = spec.unet.get("num_class_embeds")
        if slots != num_classes + 1:
            raise ValueError(f"{spec.root}: UNet2DModel has num_class_embeds = {slots}, not allowed for {num_classes} "
                             f"classes: num_classes + 1 = {num_classes + 1} (the last is the unconditional class)")
        return
    if not spec.text:
        raise ValueError(f"{spec.root}: a UNet2DConditionModel needs prompts: give a pipeline folder with "
                         f"text_encoder/ and tokenizer/ (model_index.json listing them)")
    check_template(prompt)


def check_template(template: str | None) -> None:
    """ValueError unless a class-to-prompt template contains {class}."""
    if template is None or "{class}" not in template:
        raise ValueError(f"prompt template {template!r} is not allowed: it must contain {{class}}, "
                         f"e.g. 'a painting in the style of {{class}}'")
