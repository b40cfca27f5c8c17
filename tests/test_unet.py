"""Tests for the class-conditional DDPM U-Net and its presets."""

import pytest
import torch
from torch import nn

from cm.models import NULL_LABEL, PRESETS, UNet, build_unet
from tests.helpers import randomize

# (in_channels, image_size) each preset is meant for.
SHAPES = {"ddpm_cifar": (3, 32), "small": (1, 8), "tiny": (3, 16), "cifar_small": (3, 32)}
PYTORCH_DDPM_UNCOND = 35_746_307  # trainable params of pytorch-ddpm's CIFAR-10 model


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_ddpm_cifar_param_counts():
    assert n_params(UNet(**PRESETS["ddpm_cifar"], num_classes=None)) == PYTORCH_DDPM_UNCOND
    for classes, millions in [(10, "35.75"), (100, "35.80")]:
        expected = PYTORCH_DDPM_UNCOND + 512 * classes  # label embedding: classes x tdim(=512)
        model = build_unet("ddpm_cifar", num_classes=classes, in_channels=3, image_size=32)
        assert n_params(model) == expected
        assert f"{n_params(model) / 1e6:.2f}" == millions


@pytest.mark.parametrize("preset", sorted(SHAPES))
def test_output_shape_matches_input(preset):
    c, s = SHAPES[preset]
    model = build_unet(preset, num_classes=10, in_channels=c, image_size=s).eval()
    x = torch.randn(2, c, s, s)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]), torch.tensor([3, NULL_LABEL]))
    assert out.shape == x.shape


def test_null_label_matches_unconditional_per_sample():
    model = randomize(build_unet("small", num_classes=10, in_channels=1, image_size=8)).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 500, 900])
    y = torch.tensor([NULL_LABEL, 2, NULL_LABEL, 7])
    with torch.no_grad():
        mixed, uncond, cond = model(x, t, y), model(x, t), model(x, t, y.clamp(min=0))
    null = y == NULL_LABEL
    torch.testing.assert_close(mixed[null], uncond[null], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[~null], cond[~null], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed[~null], uncond[~null], atol=1e-3)


def test_different_labels_give_different_outputs():
    model = randomize(build_unet("tiny", num_classes=10, in_channels=3, image_size=16)).eval()
    x, t = torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1), torch.tensor([100, 100])
    with torch.no_grad():
        out = model(x, t, torch.tensor([1, 2]))
    assert (out[0] - out[1]).abs().max() > 1e-2


def test_labels_rejected_by_unconditional_model():
    model = UNet(**PRESETS["tiny"], num_classes=None, image_size=16)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([0]), torch.tensor([0]))


def test_bad_preset_names_allowed():
    with pytest.raises(ValueError, match="huge") as err:
        build_unet("huge", num_classes=10, in_channels=3, image_size=32)
    for name in PRESETS:
        assert name in str(err.value)


def test_bad_image_size():
    # ddpm_cifar downsamples 3 times: 32 is fine, 12 is not divisible by 8.
    with pytest.raises(ValueError, match="divisible"):
        build_unet("ddpm_cifar", num_classes=10, in_channels=3, image_size=12)


# The public code's initialisation (pytorch-ddpm's model.py, reused by CBDM, OC and the released
# CM code): every Conv2d/Linear gets xavier_uniform_ and zero bias, then ResBlock.initialize
# re-draws block2's conv with gain 1e-5 and UNet.initialize the output conv with gain 1e-5.
# AttnBlock.initialize's gain 1e-5 on proj runs first and is overwritten by its parent ResBlock's
# loop over self.modules(), so proj ends at gain 1. xavier_uniform_ draws U(-a, a) with
# a = gain * sqrt(6 / (fan_in + fan_out)), std = gain * sqrt(2 / (fan_in + fan_out)),
# fan = channels * k * k. Values for ddpm_cifar (stated, not computed from the model):
PUBLIC_INIT_STD = {
    "head": (3 * 9, 128 * 9, 1.0),                 # 0.04119
    "time_mlp.0": (128, 512, 1.0),                 # 0.05590
    "time_mlp.2": (512, 512, 1.0),                 # 0.04419
    "tail.2": (128 * 9, 3 * 9, 1e-5),              # 4.119e-7
    "middleblocks.0.attn.proj": (256, 256, 1.0),   # 0.0625 (not 6.25e-7)
    "middleblocks.0.conv1": (256 * 9, 256 * 9, 1.0),
    "middleblocks.0.conv2": (256 * 9, 256 * 9, 1e-5),
    "downblocks.0.conv1": (128 * 9, 128 * 9, 1.0),  # 0.02946
    "downblocks.3.conv1": (128 * 9, 256 * 9, 1.0),  # level 1: 128 -> 256, with attention
    "downblocks.3.attn.proj": (256, 256, 1.0),
    "upblocks.0.conv1": (512 * 9, 256 * 9, 1.0),    # decoder: concat of skip and path
    "upblocks.0.skip": (512, 256, 1.0),
    "upblocks.0.temb_proj": (512, 256, 1.0),
}


def test_initialisation_matches_the_public_code_per_module():
    torch.manual_seed(0)
    model = build_unet("ddpm_cifar", num_classes=10, in_channels=3, image_size=32)
    modules = dict(model.named_modules())
    for name, (fan_in, fan_out, gain) in PUBLIC_INIT_STD.items():
        expected = gain * (2 / (fan_in + fan_out)) ** 0.5
        std = modules[name].weight.double().std().item()
        assert abs(std / expected - 1) < 0.02, (name, std, expected)
        assert not modules[name].bias.any()
    projections = [m.proj for m in model.modules() if type(m).__name__ == "AttnBlock"]
    assert len(projections) == 6  # two encoder, three decoder and one middle block at 16x16
    for proj in projections:
        assert abs(proj.weight.std().item() / 0.0625 - 1) < 0.02


def test_a_preset_with_another_width_scales_every_level_and_keeps_group_norm_valid():
    narrow = build_unet({"preset": "small", "ch": 8}, num_classes=10, in_channels=1, image_size=8)
    default = build_unet("small", num_classes=10, in_channels=1, image_size=8)
    assert narrow.head.out_channels == 8 and default.head.out_channels == PRESETS["small"]["ch"]
    norms = [m for m in narrow.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert {m.num_groups for m in norms if m.num_channels < 32} == {8, 16}  # 32 groups cannot divide 8 or 16
    assert {m.num_groups for m in default.modules() if isinstance(m, torch.nn.GroupNorm)} == {32}
    # Parameters grow about as width^2: 4x the width, between 8x and 16x the parameters.
    ratio = sum(p.numel() for p in default.parameters()) / sum(p.numel() for p in narrow.parameters())
    assert 8 < ratio < 16, ratio
    out = narrow(torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 9]))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="model.depth is not allowed"):
        build_unet({"preset": "small", "ch": 8, "depth": 2}, num_classes=10, in_channels=1, image_size=8)


# --------------------------------------------------------------------------- attention

def _attention_inputs(monkeypatch):
    """Wraps scaled_dot_product_attention and records the (query, key, value) each call receives."""
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return seen


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_gives_sdpa_the_inputs_its_fused_kernels_take(monkeypatch, channels_last):
    """Flash, memory-efficient and cuDNN attention take 4-D (batch, heads, tokens, dim) inputs with a
    contiguous last dimension; 3-D or strided inputs fall back to the math kernel on CUDA."""
    seen = _attention_inputs(monkeypatch)
    net = build_unet("small", num_classes=3, in_channels=1, image_size=8)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    x = torch.randn(5, 1, 8, 8)
    net(x, torch.arange(5), torch.tensor([0, 1, 2, 0, 1]))
    assert len(seen) == sum(type(m).__name__ == "AttnBlock" for m in net.modules()) > 0
    for q, k, v in seen:
        for a in (q, k, v):
            assert a.dim() == 4 and a.shape[:2] == (5, 1) and a.stride(-1) == 1, (a.shape, a.stride())
            assert a.dtype == q.dtype and a.device == q.device and a.shape == q.shape


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_equals_the_math_kernel_and_the_formula(channels_last):
    """The block against SDPA's math kernel in float32 (torch.testing's float32 tolerances, rtol 1.3e-6
    and atol 1e-5: the rounding of another summation order) and against
    softmax(q k^T / sqrt(C)) v written out in float64 (1e-12)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cm.models.unet import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(64)
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.2)
            nn.init.normal_(m.bias, std=0.1)
    x = torch.randn(3, 64, 4, 4)
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    out = block(x)
    with sdpa_kernel([SDPBackend.MATH]):
        math = block(x)
    torch.testing.assert_close(out, math, rtol=1.3e-6, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    b64, x64 = block.double(), x.double()
    hn = b64.norm(x64)
    q, k, v = (m(hn).flatten(2).transpose(1, 2) for m in (b64.q, b64.k, b64.v))  # (N, HW, C)
    attn = torch.softmax(q @ k.transpose(1, 2) / 64 ** 0.5, dim=-1)
    reference = x64 + b64.proj((attn @ v).transpose(1, 2).reshape(x64.shape))
    torch.testing.assert_close(b64(x64), reference, rtol=1e-12, atol=1e-12)
