"""Tests for the low-rank reserved-capacity branches of the U-Net decoder."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cm.lowrank import (
    LowRankConv2d,
    add_lowrank_branches,
    branches,
    branches_disabled,
    lowrank_parameters,
    merge_lowrank,
    merged_model,
    rank_for,
)
from cm.models import build_unet

# Merge reuses the forward pass's W_g + B@A, so outputs were bitwise equal when
# measured; f32 round-off vs a float64 reference is ~1e-6 relative, hence this margin.
F32_RTOL, F32_ATOL = 1e-5, 1e-6


def tiny(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = build_unet("tiny", num_classes=10, in_channels=3, image_size=16).to(dtype)
    # Break the 1e-5 residual/tail init so decoder convs visibly affect the output.
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
    return model.eval()


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g, dtype=dtype)
    return x, torch.tensor([1, 400, 999]), torch.tensor([0, 4, -1])


def randomize_B(model, std=0.05, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in branches(model):
            m.B.copy_(torch.randn(m.B.shape, generator=g, dtype=m.B.dtype) * std)


def expected_decoder_convs(ch_mult, num_res_blocks):
    """Names of decoder 3x3 convs, derived from the architecture description."""
    names, i = [], 0
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            names += [f"upblocks.{i}.conv1", f"upblocks.{i}.conv2"]
            i += 1
        if level != 0:
            names.append(f"upblocks.{i}.conv")
            i += 1
    return names


def test_rank_for():
    assert rank_for(128, 128, 0.1) == 12
    assert rank_for(256, 512, 0.1) == 25
    assert rank_for(32, 64, 0.1) == 3
    assert rank_for(4, 4, 0.1) == 1  # floor at 1
    assert rank_for(64, 64, 1.0) == 64
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="rank_ratio"):
            rank_for(64, 64, bad)


def test_branch_rank_after_randomising_B():
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 40, 3, padding=1).double()
    lr, r, k = LowRankConv2d(conv, rank=2), 2, 3
    assert lr.A.shape == (r * k, 48 * k) and lr.B.shape == (40 * k, r * k)
    randomize_B(lr)
    # loralib ConvLoRA: B@A is an (out*k, in*k) matrix of rank r*k; viewed as the
    # conv's (out, in*k*k) kernel matrix its rank is r*k*k (not r).
    assert torch.linalg.matrix_rank(lr.B @ lr.A).item() == r * k
    delta = (lr.B @ lr.A).reshape(40, 48, k, k)
    torch.testing.assert_close(lr.delta_weight(), delta, rtol=0, atol=0)
    assert torch.linalg.matrix_rank(delta.reshape(40, -1)).item() == min(40, r * k * k)


def test_single_layer_forward_is_base_plus_delta_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1).double()
    lr = LowRankConv2d(conv, rank=2)
    randomize_B(lr, std=0.3)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    delta = (lr.B @ lr.A).reshape(6, 8, 3, 3)
    want = conv(x) + F.conv2d(x, delta, stride=2, padding=1)  # conv is linear in W
    torch.testing.assert_close(lr(x), want, rtol=1e-10, atol=1e-10)
    lr.enabled = False
    torch.testing.assert_close(lr(x), conv(x), rtol=0, atol=0)


def test_rejects_grouped_conv():
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d(nn.Conv2d(4, 4, 3, groups=2), rank=1)


def test_wrapped_equals_plain_at_init():
    plain = tiny()
    wrapped = copy.deepcopy(plain)
    add_lowrank_branches(wrapped, 0.1)
    assert all((m.B == 0).all() for m in branches(wrapped))
    with torch.no_grad():
        assert torch.equal(wrapped(*inputs()), plain(*inputs()))


@pytest.mark.parametrize(
    "preset,ch_mult,nrb,count", [("tiny", (1, 2), 1, 9), ("ddpm_cifar", (1, 2, 2, 2), 2, 27)]
)
def test_only_decoder_3x3_convs_wrapped(preset, ch_mult, nrb, count):
    model = build_unet(preset, num_classes=10, in_channels=3, image_size=32)
    n_conv_before = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    names = add_lowrank_branches(model, 0.1)
    assert names == expected_decoder_convs(ch_mult, nrb) and len(names) == count
    assert [n for n, m in model.named_modules() if isinstance(m, LowRankConv2d)] == names
    for name in names:
        m = model.get_submodule(name)
        assert m.base.kernel_size == (3, 3)
        assert m.rank == max(1, int(0.1 * min(m.base.in_channels, m.base.out_channels)))
    # Every other conv (encoder, middle, head, tail, 1x1 skips, attention) untouched.
    plain_convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and not n.endswith(".base")]
    assert len(plain_convs) + count == n_conv_before
    decoder_3x3 = ("conv1", "conv2", ".conv")
    assert not any(n.startswith("upblocks.") and n.endswith(decoder_3x3) for n in plain_convs)
    assert len(lowrank_parameters(model)) == 2 * count


def test_merged_state_dict_keys_and_shapes():
    fresh = tiny()
    wrapped = copy.deepcopy(fresh)
    add_lowrank_branches(wrapped, 0.1)
    randomize_B(wrapped)
    for drop in (False, True):
        sd = merge_lowrank(wrapped, drop_branches=drop)
        assert list(sd) == list(fresh.state_dict())
        assert [v.shape for v in sd.values()] == [v.shape for v in fresh.state_dict().values()]


@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float64, 1e-10, 1e-10), (torch.float32, F32_RTOL, F32_ATOL)]
)
def test_merged_model_matches_wrapped(dtype, rtol, atol):
    plain = tiny(dtype)
    wrapped = copy.deepcopy(plain)
    add_lowrank_branches(wrapped, 0.1)
    randomize_B(wrapped)
    before = copy.deepcopy(wrapped.state_dict())
    x, t, y = inputs(dtype)
    with torch.no_grad():
        out_wrapped = wrapped(x, t, y)
        assert (out_wrapped - plain(x, t, y)).abs().max() > 1e-3  # branches matter
        # Independent merge: load W_g + B@A into a freshly built plain model.
        sd = wrapped.state_dict()
        target = tiny(dtype, seed=123)
        merged_sd = merge_lowrank(wrapped)
        for name in expected_decoder_convs((1, 2), 1):
            shape = sd[f"{name}.base.weight"].shape
            w = sd[f"{name}.base.weight"] + (sd[f"{name}.B"] @ sd[f"{name}.A"]).reshape(shape)
            torch.testing.assert_close(merged_sd[f"{name}.weight"], w, rtol=rtol, atol=atol)
        target.load_state_dict(merged_sd)
        torch.testing.assert_close(target(x, t, y), out_wrapped, rtol=rtol, atol=atol)
        torch.testing.assert_close(merged_model(wrapped)(x, t, y), out_wrapped, rtol=rtol, atol=atol)
        # drop_branches: the theta_g-only model is the original plain model.
        target.load_state_dict(merge_lowrank(wrapped, drop_branches=True))
        torch.testing.assert_close(target(x, t, y), plain(x, t, y), rtol=0, atol=0)
    # The input model is untouched.
    names = expected_decoder_convs((1, 2), 1)
    assert all(isinstance(wrapped.get_submodule(n), LowRankConv2d) for n in names)
    after = wrapped.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_branches_disabled_gives_base_output_and_restores():
    plain = tiny()
    wrapped = copy.deepcopy(plain)
    add_lowrank_branches(wrapped, 0.1)
    randomize_B(wrapped)
    first = next(branches(wrapped))
    first.enabled = False  # a pre-existing False must survive the context
    with torch.no_grad(), branches_disabled(wrapped):
        assert not any(m.enabled for m in branches(wrapped))
        torch.testing.assert_close(wrapped(*inputs()), plain(*inputs()), rtol=0, atol=0)
    assert [m.enabled for m in branches(wrapped)] == [False] + [True] * 8
    with pytest.raises(RuntimeError), branches_disabled(wrapped):
        raise RuntimeError("restores on error too")
    assert [m.enabled for m in branches(wrapped)] == [False] + [True] * 8


def test_gradients_reach_A_and_B():
    wrapped = tiny()
    add_lowrank_branches(wrapped, 0.1)
    randomize_B(wrapped)
    wrapped(*inputs()).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lowrank_parameters(wrapped))


def test_branch_scale_and_all_layers_merge_exactly():
    """branch_scale s multiplies B A, branch_layers="all" wraps every 3x3 conv (encoder, middle,
    head and tail too); merging W_g + s B A stays exact in float64."""
    plain = tiny(torch.float64)
    n_3x3 = sum(type(m) is nn.Conv2d and m.kernel_size == (3, 3) for m in plain.modules())
    wrapped = copy.deepcopy(plain)
    names = add_lowrank_branches(wrapped, 0.1, scale=2.5, layers="all")
    assert len(names) == n_3x3 > len(expected_decoder_convs((1, 2), 1))
    randomize_B(wrapped)
    sd = wrapped.state_dict()
    merged_sd = merge_lowrank(wrapped)
    for name in names:
        shape = sd[f"{name}.base.weight"].shape
        w = sd[f"{name}.base.weight"] + 2.5 * (sd[f"{name}.B"] @ sd[f"{name}.A"]).reshape(shape)
        torch.testing.assert_close(merged_sd[f"{name}.weight"], w, rtol=1e-12, atol=1e-12)
    target = tiny(torch.float64, seed=123)
    target.load_state_dict(merged_sd)
    x, t, y = inputs(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(target(x, t, y), wrapped(x, t, y), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="layers = 'encoder' is not allowed: one of decoder, all"):
        add_lowrank_branches(tiny(), 0.1, layers="encoder")


def test_A_is_drawn_as_released_kaiming_normal():
    """Released: kaiming_normal_(A, a=sqrt(5)), std = sqrt(2 / (1 + 5)) / sqrt(fan_in), fan_in = in * k;
    normal, not the uniform of the same std (excess kurtosis 0, not -1.2)."""
    torch.manual_seed(0)
    conv = LowRankConv2d(nn.Conv2d(256, 256, 3, padding=1), rank=64)  # A: (192, 768)
    a = conv.A.detach().double().flatten()
    assert abs(a.std().item() / (1 / 3 / 768) ** 0.5 - 1) < 0.02
    excess_kurtosis = ((a - a.mean()) ** 4).mean() / a.var() ** 2 - 3
    assert abs(excess_kurtosis.item()) < 0.1
