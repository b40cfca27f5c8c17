"""Tests for the class-conditional DDPM U-Net and its presets."""

import pytest
import torch
from torch import nn

from cm.models import NULL_LABEL, PRESETS, UNet, build_unet

# (in_channels, image_size) each preset is meant for.
SHAPES = {"ddpm_cifar": (3, 32), "small": (1, 8), "tiny": (3, 16), "cifar_small": (3, 32)}
PYTORCH_DDPM_UNCOND = 35_746_307  # trainable params of pytorch-ddpm's CIFAR-10 model


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def randomize(model, seed=0):
    """Undo the 1e-5 residual/tail init so conditioning has a visible effect."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias, std=0.1)
    return model


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
