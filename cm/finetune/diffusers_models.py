"""Pretrained diffusers U-Nets as class-conditional eps networks `net(x, t, y)` for fine-tuning.

`load_pretrained_unet` reads a folder written by `save_pretrained`; `ClassConditionedUNet` makes
the model take the project's class labels (a class embedding for UNet2DModel, a per-class prompt
for UNet2DConditionModel); `save_merged_pretrained` writes the adapters-merged plain U-Net back.
Nothing here downloads: folders are local. For a latent model (Stable Diffusion) `x` is the VAE
latent: encoding images with the VAE is the caller's (this module loads no VAE).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from cm.finetune.adapters import merged, tuner_layers
from cm.models.unet import NULL_LABEL

UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
EXPECTED = ("a diffusers UNet saved with save_pretrained (config.json with _class_name UNet2DModel or "
            "UNet2DConditionModel), or a Stable Diffusion pipeline folder (model_index.json, unet/, text_encoder/, "
            "tokenizer/)")


class PretrainedUNet(NamedTuple):
    """What `load_pretrained_unet` found: the U-Net, and the text encoder and tokenizer of a pipeline
    folder that lists them (None otherwise)."""

    unet: UNet2DModel | UNet2DConditionModel
    text_encoder: nn.Module | None = None
    tokenizer: object | None = None


def _read_json(path: Path, folder: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder} is not a diffusers model: {path.name} is unreadable ({err}); expected {EXPECTED}")


def _load_unet_folder(folder: Path, root: Path) -> UNet2DModel | UNet2DConditionModel:
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"{root} is not a diffusers model: no {config.relative_to(root.parent)}; expected {EXPECTED}")
    name = _read_json(config, root).get("_class_name")
    if name not in UNET_CLASSES:
        raise ValueError(f"{root} holds a {name!r}, not a U-Net this project fine-tunes: "
                         f"one of {', '.join(UNET_CLASSES)}")
    return UNET_CLASSES[name].from_pretrained(folder, local_files_only=True)


def _load_transformers_part(root: Path, part: str, entry) -> object:
    """`text_encoder` or `tokenizer` of a pipeline folder, by the class model_index.json names."""
    import transformers

    library, cls = entry if isinstance(entry, (list, tuple)) and len(entry) == 2 else (None, None)
    if library != "transformers" or not hasattr(transformers, cls or ""):
        raise ValueError(f"{root}/model_index.json lists {part} = {entry!r}: expected a transformers class, "
                         f"e.g. ['transformers', 'CLIPTextModel']")
    if not (root / part).is_dir():
        raise ValueError(f"{root} is not a complete pipeline: model_index.json lists {part} but {part}/ is missing")
    return getattr(transformers, cls).from_pretrained(root / part, local_files_only=True)


def load_pretrained_unet(folder) -> PretrainedUNet:
    """Load a pretrained U-Net from a local folder.

    A U-Net folder (config.json): the UNet2DModel or UNet2DConditionModel its `_class_name` names.
    A pipeline folder (model_index.json, as Stable Diffusion's): its unet/, plus text_encoder/ and
    tokenizer/ when model_index.json lists them (needed to turn class names into prompts), loaded
    with the transformers classes it names. Anything else raises ValueError.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"pretrained model folder {root} does not exist; expected {EXPECTED}")
    index = root / "model_index.json"
    if not index.is_file():
        return PretrainedUNet(_load_unet_folder(root, root))
    parts = _read_json(index, root)
    if "unet" not in parts:
        raise ValueError(f"{root}/model_index.json lists no unet: expected {EXPECTED}")
    unet = _load_unet_folder(root / "unet", root)
    if "text_encoder" in parts and "tokenizer" in parts:
        return PretrainedUNet(unet, _load_transformers_part(root, "text_encoder", parts["text_encoder"]),
                              _load_transformers_part(root, "tokenizer", parts["tokenizer"]))
    return PretrainedUNet(unet)


def check_matches(unet: nn.Module, image_size: int, channels: int) -> None:
    """ValueError unless the U-Net's config takes (and returns) `channels` x `image_size` x `image_size`
    inputs. For a latent model these are the latents' size and channels."""
    config = unet.config
    size = config.sample_size
    sizes = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if sizes != (image_size, image_size) or config.in_channels != channels or config.out_channels != channels:
        raise ValueError(f"{type(unet).__name__} takes {config.in_channels}-channel {sizes[0]}x{sizes[1]} inputs "
                         f"(out_channels {config.out_channels}), the data is {channels}-channel "
                         f"{image_size}x{image_size}: use a pretrained model of the data's shape")


@torch.no_grad()
def prompt_embeddings(text_encoder: nn.Module, tokenizer, class_names, template: str) -> torch.Tensor:
    """The frozen text encoder's embeddings (C + 1, L, D) of `template` with `{class}` replaced by each
    class name, then of the empty prompt "" (the last row: Stable Diffusion's unconditional prompt
    for classifier-free guidance). Tokenised as Stable Diffusion pipelines do: padded to the
    tokenizer's max length (at most the encoder's positions), truncated."""
    if "{class}" not in template:
        raise ValueError(f"prompt template {template!r} is not allowed: it must contain {{class}}, "
                         f"e.g. 'a painting in the style of {{class}}'")
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("class_names is empty: one name per class is needed for the prompts")
    prompts = [template.replace("{class}", n) for n in names] + [""]
    length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    was_training = text_encoder.training
    text_encoder.eval()
    embeds = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]  # last hidden state
    text_encoder.train(was_training)
    return embeds


class ClassConditionedUNet(nn.Module):
    """A diffusers U-Net called as the project's networks are: `net(x, t, y)` -> eps, x's shape.

    y is a LongTensor of class labels in [0, num_classes), with NULL_LABEL (-1) rows unconditional,
    or None for a wholly unconditional batch (classifier-free guidance's label drop). The
    unconditional input is the extra "null" class `num_classes`:

    - UNet2DModel: `class_labels`; its config's num_class_embeds must be num_classes + 1.
    - UNet2DConditionModel: the text prompt of each class (`from_prompts`), embedded once by the frozen
      text encoder and kept as the buffer `prompt_embeds` (num_classes + 1, L, D); the last row is the
      empty prompt "", which is how Stable Diffusion forms the unconditional half of guidance.
    """

    def __init__(self, unet: UNet2DModel | UNet2DConditionModel, num_classes: int,
                 prompt_embeds: torch.Tensor | None = None):
        super().__init__()
        if isinstance(unet, UNet2DModel):
            slots = unet.config.num_class_embeds
            if slots != num_classes + 1:
                raise ValueError(f"UNet2DModel has num_class_embeds = {slots}, not allowed for {num_classes} classes: "
                                 f"num_classes + 1 = {num_classes + 1} (the last is the unconditional class)")
            if prompt_embeds is not None:
                raise ValueError("prompt_embeds given for a UNet2DModel: it takes class labels, not prompts")
        elif isinstance(unet, UNet2DConditionModel):
            dim = unet.config.cross_attention_dim
            shape = None if prompt_embeds is None else tuple(prompt_embeds.shape)
            if shape is None or len(shape) != 3 or (shape[0], shape[2]) != (num_classes + 1, dim):
                raise ValueError(f"prompt_embeds of shape {shape} is not allowed for UNet2DConditionModel with "
                                 f"{num_classes} classes: (num_classes + 1, tokens, cross_attention_dim {dim}) "
                                 f"(see ClassConditionedUNet.from_prompts)")
        else:
            raise ValueError(f"unet of type {type(unet).__name__} is not allowed: UNet2DModel or UNet2DConditionModel")
        self.unet, self.num_classes = unet, num_classes
        embeds = None if prompt_embeds is None else prompt_embeds.detach().clone()
        self.register_buffer("prompt_embeds", embeds)  # saved with the wrapper: sampling needs no text encoder

    @classmethod
    def from_prompts(cls, unet: UNet2DConditionModel, text_encoder: nn.Module, tokenizer, class_names,
                     template: str = "a photo of a {class}") -> ClassConditionedUNet:
        """Condition a UNet2DConditionModel on class `c` through the prompt `template` with `{class}`
        replaced by `class_names[c]` (see `prompt_embeddings`)."""
        embeds = prompt_embeddings(text_encoder, tokenizer, class_names, template)
        return cls(unet, len(class_names), embeds.to(unet.dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """eps for x (N, C, H, W) at timesteps t (N,) with labels y (N,) or None."""
        null = self.num_classes
        idx = torch.full((len(x),), null, device=x.device) if y is None else torch.where(y == NULL_LABEL, null, y)
        if self.prompt_embeds is None:
            return self.unet(x, t, class_labels=idx).sample
        return self.unet(x, t, encoder_hidden_states=self.prompt_embeds[idx]).sample


def save_merged_pretrained(net: nn.Module, folder, drop=()) -> Path:
    """Save the plain diffusers U-Net of `net` (a ClassConditionedUNet or the U-Net itself) with
    `save_pretrained`: its adapters, if any, merged first (`merged(net, drop)`; `net` is not
    modified), so `from_pretrained` loads a model of the pretrained architecture with no adapter
    keys. Only the U-Net is written: a pipeline's text encoder is unchanged by fine-tuning."""
    plain = merged(net, drop) if drop or any(True for _ in tuner_layers(net)) else net
    unet = plain.unet if isinstance(plain, ClassConditionedUNet) else plain
    if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
        raise ValueError(f"net of type {type(net).__name__} is not allowed: a ClassConditionedUNet, "
                         f"UNet2DModel or UNet2DConditionModel")
    folder = Path(folder)
    unet.save_pretrained(folder)
    return folder


__all__ = ["ClassConditionedUNet", "PretrainedUNet", "check_matches", "load_pretrained_unet", "prompt_embeddings",
           "save_merged_pretrained"]
