"""Tiny diffusers models with random weights, built from configs as diffusers' own tests do (no network),
and a Stable Diffusion-like pipeline folder of them: U-Net, CLIP text encoder and tokenizer, VAE.

The CLIP tokenizer is built in memory from a word-level vocabulary and merges (transformers 5 takes
them as a dict and a list), then saved into a folder like a real pipeline's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def tiny_tokenizer(words) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell each of `words` left to right."""
    vocab, merges = {"<|startoftext|>": 0, "<|endoftext|>": 1}, []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        head = pieces[0]
        for piece in pieces[1:]:
            if (head, piece) not in merges:
                merges.append((head, piece))
            head += piece
            vocab.setdefault(head, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


def tiny_text_encoder(vocab_size: int) -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=12, intermediate_size=24,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


def tiny_cond_unet(sample_size: int = 8, channels: int = 4) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size,
                                in_channels=channels, out_channels=channels,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                norm_num_groups=4, attention_head_dim=2)


def tiny_class_unet(num_class_embeds: int, sample_size: int = 8, channels: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                       num_class_embeds=num_class_embeds)


def tiny_vae(image_channels: int = 1, blocks: int = 2) -> AutoencoderKL:
    """A VAE into 4 latent channels, as SD's, that halves the image size blocks - 1 times (SD's: 4 blocks,
    256 px -> 32)."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=image_channels, out_channels=image_channels, latent_channels=4,
                         block_out_channels=(8,) * blocks, layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=8).eval()


@torch.no_grad()
def pretend_pretrained(net: nn.Module) -> nn.Module:
    """Perturb every weight: the project's U-Net starts near the identity (1e-5 output gains),
    and a trained model does not."""
    gen = torch.Generator().manual_seed(1)
    for p in net.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def save_pipeline(folder: Path, words, *, unet: nn.Module | None = None, vae: AutoencoderKL | None = None) -> Path:
    """A Stable Diffusion-like pipeline folder (model_index.json, unet/, text_encoder/, tokenizer/ and,
    given one, vae/) with a tokenizer that knows `words`."""
    tokenizer = tiny_tokenizer(words)
    parts = {"unet": unet if unet is not None else pretend_pretrained(tiny_cond_unet()),
             "text_encoder": tiny_text_encoder(len(tokenizer)), "tokenizer": tokenizer}
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if vae is not None:
        parts["vae"], index["vae"] = vae, ["diffusers", "AutoencoderKL"]
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
