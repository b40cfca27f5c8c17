"""Pretrained diffusers U-Nets as class-conditional eps networks `net(x, t, y)` for fine-tuning.

`load_pretrained_unet` reads a folder written by `save_pretrained`; `ClassConditionedUNet` makes
the model take the project's class labels (a class embedding for UNet2DModel, a per-class prompt
for UNet2DConditionModel); `save_merged_pretrained` writes the adapters-merged plain U-Net back.
Nothing here downloads: folders are local. For a latent model (Stable Diffusion) `x` is the VAE
latent; `LatentCodec` encodes images and decodes samples. `starting_model` turns a folder into the
pipeline's pretrained-model record, and `network_from_config` rebuilds its network in later stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from torch import nn

from cm.data.images import scale
from cm.finetune.adapters import merged, tuner_layers
from cm.finetune.folders import check_fits, check_template, describe
from cm.models.unet import NULL_LABEL

UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}


class PretrainedUNet(NamedTuple):
    """What `load_pretrained_unet` found: the U-Net, the text encoder and tokenizer of a pipeline folder
    that lists them, and its VAE (each None otherwise)."""

    unet: UNet2DModel | UNet2DConditionModel
    text_encoder: nn.Module | None = None
    tokenizer: object | None = None
    vae: AutoencoderKL | None = None


def _load_transformers_part(root: Path, part: str, entry) -> object:
    """`text_encoder` or `tokenizer` of a pipeline folder, by the class model_index.json names."""
    import transformers

    library, cls = entry if isinstance(entry, (list, tuple)) and len(entry) == 2 else (None, None)
    if library != "transformers" or not hasattr(transformers, cls or ""):
        raise ValueError(f"{root}/model_index.json lists {part} = {entry!r}: expected a transformers class, "
                         f"e.g. ['transformers', 'CLIPTextModel']")
    return getattr(transformers, cls).from_pretrained(root / part, local_files_only=True)


def load_pretrained_unet(folder) -> PretrainedUNet:
    """Load a pretrained U-Net from a local folder (see cm/finetune/folders.py for what is accepted).

    A U-Net folder (config.json): the UNet2DModel or UNet2DConditionModel its `_class_name` names.
    A pipeline folder (model_index.json, as Stable Diffusion's): its unet/, plus text_encoder/ and
    tokenizer/ when model_index.json lists them (needed to turn class names into prompts), loaded
    with the transformers classes it names, and vae/ when listed. Anything else raises ValueError.
    """
    spec = describe(folder)
    root = spec.root
    if not (root / "model_index.json").is_file():
        return PretrainedUNet(UNET_CLASSES[spec.unet_class].from_pretrained(root, local_files_only=True))
    parts = json.loads((root / "model_index.json").read_text())
    unet = UNET_CLASSES[spec.unet_class].from_pretrained(root / "unet", local_files_only=True)
    text = [_load_transformers_part(root, part, parts[part]) for part in ("text_encoder", "tokenizer")] if spec.text \
        else [None, None]
    vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True) if spec.vae is not None else None
    return PretrainedUNet(unet, *text, vae)


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
    check_template(template)
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


def plain_config(model) -> dict:
    """A diffusers model's config as JSON types (its own serialisation): checkpoints load with
    weights_only, which refuses the paths and tuples of the live config."""
    return json.loads(model.to_json_string())


class LatentCodec:
    """The frozen VAE of a latent diffusion model (Stable Diffusion): images in [-1, 1] <-> the latents
    its U-Net denoises, z = (E(x) - shift) * scaling_factor with E's posterior mode (deterministic, so a
    training set is encoded once), and the decoder's images clamped to [-1, 1]."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae.eval().requires_grad_(False)
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0

    @classmethod
    def from_state(cls, state: dict) -> LatentCodec:
        """The codec of `state()`'s output (kept in pretrained, trained and merged checkpoints)."""
        vae = AutoencoderKL.from_config(state["config"])
        vae.load_state_dict(state["state_dict"])
        return cls(vae)

    def state(self) -> dict:
        return {"config": plain_config(self.vae), "state_dict": self.vae.state_dict()}

    def to(self, device) -> LatentCodec:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        return torch.cat([(self.vae.encode(chunk).latent_dist.mode() - self.shift) * self.scale
                          for chunk in images.split(batch_size)])

    def encode_stored(self, images: torch.Tensor, mirror: bool = False, chunk: int = 256) -> torch.Tensor:
        """`encode` of stored uint8 (N, C, H, W) images (mirrored left to right if `mirror`), scaled to
        [-1, 1] a chunk at a time: a 256 px image takes 0.8 MB as floats, a whole set many GB."""
        return torch.cat([self.encode(scale(part.flip(3) if mirror else part)) for part in images.split(chunk)])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        return torch.cat([self.vae.decode(chunk / self.scale + self.shift).sample.float().clamp(-1, 1)
                          for chunk in latents.split(batch_size)])


def load_codec(state: dict | None) -> LatentCodec | None:
    """The latent codec a checkpoint carries (`codec`), or None for a model that works on pixels."""
    return None if state is None else LatentCodec.from_state(state)


def starting_model(folder, *, class_names, prompt: str | None, image_shape: tuple[int, int]) -> dict:
    """A diffusers folder as the pretrain stage's output (cm/pretrain.py): the ClassConditionedUNet's
    weights as `ema` (prompt embeddings included: later stages need no text encoder), the `config` that
    rebuilds it (`network_from_config`) and, for a latent model, the VAE as `codec`."""
    spec = describe(folder)
    check_fits(spec, image_shape=image_shape, num_classes=len(class_names), prompt=prompt)
    found = load_pretrained_unet(folder)
    if spec.unet_class == "UNet2DConditionModel":
        net = ClassConditionedUNet.from_prompts(found.unet, found.text_encoder, found.tokenizer, class_names, prompt)
    else:
        net = ClassConditionedUNet(found.unet, len(class_names))
    channels, size = spec.network_shape()
    embeds = net.prompt_embeds
    config = {"diffusers": {"unet": plain_config(found.unet),
                            "prompt_shape": None if embeds is None else list(embeds.shape)},
              "num_classes": len(class_names), "in_channels": channels, "image_size": size}
    codec = None if found.vae is None else LatentCodec(found.vae).state()
    return {"config": config, "ema": net.state_dict(), "codec": codec}


def network_from_config(config: dict) -> ClassConditionedUNet:
    """The ClassConditionedUNet a `starting_model` config describes, with initial weights (load a
    state dict into it): the U-Net from its diffusers config, a placeholder for the prompt embeddings."""
    unet_config = config["diffusers"]["unet"]
    unet = UNET_CLASSES[unet_config["_class_name"]].from_config(unet_config)
    shape = config["diffusers"]["prompt_shape"]
    return ClassConditionedUNet(unet, config["num_classes"], None if shape is None else torch.zeros(shape))


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


__all__ = ["ClassConditionedUNet", "LatentCodec", "PretrainedUNet", "check_matches", "load_codec",
           "load_pretrained_unet", "network_from_config", "prompt_embeddings", "save_merged_pretrained",
           "starting_model"]
