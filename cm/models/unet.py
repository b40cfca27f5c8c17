"""Class-conditional DDPM U-Net (Ho et al. 2020, CIFAR-10 architecture).

The layout follows the well-known PyTorch re-implementation of the DDPM
CIFAR-10 model (w86763777/pytorch-ddpm); the only addition is a learned
class embedding that is added to the time embedding. A label equal to
``NULL_LABEL`` drops the class embedding for that sample, so the conditional
and unconditional halves of classifier-free guidance share one forward pass.

``forward`` is ``decode(encode(...))``: the split lets CM's fast mode run the encoder and middle
block once and the decoder twice (cm/methods/passes.py); weights and outputs are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

NULL_LABEL = -1
"""Label value meaning "unconditional" for one sample of a batch."""


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t`` (N,) -> (N, dim)."""
    if dim % 2:
        raise ValueError(f"timestep embedding width must be even, got {dim}")
    half = dim // 2
    # Geometric frequencies from 1 down to 1/10000, as in "Attention is all you need".
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (N, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Encoding(NamedTuple):
    """The encoder's output: the middle block's activation, the skip activations (encoder order)
    and the time(+class) embedding. Every entry is per sample, so rows can be selected."""

    h: torch.Tensor
    skips: tuple[torch.Tensor, ...]
    temb: torch.Tensor

    def rows(self, n: int) -> Encoding:
        """The encoding of the first `n` samples (every layer of the U-Net acts per sample)."""
        return Encoding(self.h[:n], tuple(s[:n] for s in self.skips), self.temb[:n])


def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored so (and not also NCHW-contiguous), else NCHW."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _norm(ch: int) -> nn.GroupNorm:
    # 32 groups as in DDPM; narrower models (the capacity sweep's) take the largest divisor of 32 that fits.
    return nn.GroupNorm(math.gcd(32, ch), ch)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        hn = self.norm(x)
        # (N, C, H, W) -> (N, 1, HW, C): one head, one token per pixel. The fused kernels (flash,
        # memory-efficient, cuDNN) take only 4-D (batch, heads, tokens, dim) inputs whose last
        # dimension is contiguous; anything else falls back to the math kernel.
        q, k, v = (m(hn).flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        # Back to (N, C, H, W) in x's memory layout, so proj and the residual sum see one layout.
        out = out.squeeze(1).transpose(1, 2).reshape(n, c, h, w).contiguous(memory_format=_layout(x))
        return x + self.proj(out)


class ResBlock(nn.Module):
    """Pre-activation residual block with an additive time(+class) projection."""

    def __init__(self, in_ch: int, out_ch: int, tdim: int, dropout: float, attn: bool):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(tdim, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(h + self.skip(x))


class UNet(nn.Module):
    """Class-conditional DDPM U-Net.

    Args:
        in_channels: image channels (input and output).
        image_size: spatial side of the (square) input; decides where attention sits.
        ch: base channel width; the time embedding has width ``4 * ch``.
        ch_mult: channel multiplier of each resolution level.
        attn_resolutions: feature-map sides at which ResBlocks get self-attention.
        num_res_blocks: ResBlocks per level on the down path (one more on the up path).
        dropout: dropout rate inside ResBlocks.
        num_classes: size of the label embedding; ``None`` builds an unconditional model.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        image_size: int = 32,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        attn_resolutions: Sequence[int] = (16,),
        num_res_blocks: int = 2,
        dropout: float = 0.1,
        num_classes: int | None = None,
    ):
        super().__init__()
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(ch_mult)-1)={factor} "
                f"for ch_mult={tuple(ch_mult)}"
            )
        self.ch = ch
        self.num_classes = num_classes
        tdim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.label_emb = nn.Embedding(num_classes, tdim) if num_classes is not None else None
        self.head = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Down path; `skips` records the channels of every activation pushed on the stack.
        self.downblocks = nn.ModuleList()
        skips, now, res = [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            out = ch * mult
            for _ in range(num_res_blocks):
                self.downblocks.append(ResBlock(now, out, tdim, dropout, res in attn_resolutions))
                now = out
                skips.append(now)
            if level != len(ch_mult) - 1:
                self.downblocks.append(Downsample(now))
                skips.append(now)
                res //= 2

        self.middleblocks = nn.ModuleList(
            [ResBlock(now, now, tdim, dropout, attn=True), ResBlock(now, now, tdim, dropout, attn=False)]
        )

        # Up path: each ResBlock consumes one skip activation (channel concat).
        self.upblocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            out = ch * mult
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(
                    ResBlock(skips.pop() + now, out, tdim, dropout, res in attn_resolutions)
                )
                now = out
            if level != 0:
                self.upblocks.append(Upsample(now))
                res *= 2
        assert not skips

        self.tail = nn.Sequential(_norm(now), nn.SiLU(), nn.Conv2d(now, in_channels, 3, padding=1))
        self._initialize()

    def _initialize(self) -> None:
        # The public DDPM code's init (pytorch-ddpm, reused by CBDM, OC and the released CM code):
        # xavier-uniform weights, zero biases, and gain 1e-5 on each residual block's second conv
        # and on the output conv, so the net starts near identity. The attention block's own 1e-5
        # gain on its output projection does not survive there: its parent residual block
        # re-initialises every child conv afterwards, so it ends at gain 1, and so it does here.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.xavier_uniform_(m.conv2.weight, gain=1e-5)
        nn.init.xavier_uniform_(self.tail[-1].weight, gain=1e-5)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Time (+ class) embedding (N, 4*ch); entries ``y == NULL_LABEL`` get no class term."""
        # Follow the parameters' dtype so .double()/.half() models work.
        emb = self.time_mlp(timestep_embedding(t, self.ch).to(self.time_mlp[0].weight.dtype))
        if y is None:
            return emb
        if self.label_emb is None:
            raise ValueError("labels given to an unconditional UNet (num_classes=None)")
        keep = y != NULL_LABEL  # (N,) bool
        # Index 0 is a placeholder for null rows; the mask zeroes its contribution.
        lab = self.label_emb(torch.where(keep, y, torch.zeros_like(y)))
        return emb + lab * keep[:, None].to(lab.dtype)

    def encode(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Encoding:
        """The encoder and middle block: everything the decoder needs (see `Encoding`)."""
        temb = self.embed(t, y)
        h = self.head(x)
        hs = [h]
        for block in self.downblocks:
            h = block(h, temb)
            hs.append(h)
        for block in self.middleblocks:
            h = block(h, temb)
        return Encoding(h, tuple(hs), temb)

    def decode(self, enc: Encoding) -> torch.Tensor:
        """The decoder and output head on an encoding; it leaves `enc` intact, so one encoding
        can be decoded more than once (CM's fast mode)."""
        h, skips = enc.h, list(enc.skips)
        for block in self.upblocks:
            if isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, enc.temb)
        # The parameters' dtype out (float32) whatever autocast ran inside, so every loss term is float32.
        return self.tail(h).to(self.time_mlp[0].weight.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict noise for x (N, C, H, W) at timesteps t (N,) with labels y (N,) or None."""
        return self.decode(self.encode(x, t, y))
