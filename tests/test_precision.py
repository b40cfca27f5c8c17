"""bf16 autocast and torch.compile compute the step fp32 eager computes, to the stated tolerance.

bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 % per operation); through the
U-Net's few dozen layers the loss and the gradient stay within a few per cent of float32. The
tolerances below allow that and would fail on a real mistake (a loss term left in bf16 loses
its small differences, e.g. CM's D_i; a wrong cast breaks the gradient's direction).
"""

from __future__ import annotations

import pytest
import torch

from cm import accel
from cm.diffusion import GaussianDiffusion
from cm.methods import build_method
from cm.models import build_unet
from cm.trainer import Objective

COUNTS = [60, 30, 15, 8, 4]  # long-tailed, 5 classes
FAMILIES = ["ddpm", "cbdm", "oc", "cm", "cm+oc"]


def make(method_name: str, preset: str = "small", seed: int = 0):
    torch.manual_seed(seed)
    diffusion = GaussianDiffusion(timesteps=1000)
    method = build_method(method_name, diffusion=diffusion, train={"label_drop": 0.0}, all_params={},
                          class_counts=COUNTS)
    net = build_unet(preset, num_classes=len(COUNTS), in_channels=1, image_size=8)
    method.prepare(net)
    with torch.no_grad():  # trained-looking weights: B != 0 (so D_i > 0), no near-zero init layers
        for name, p in net.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.eval()  # no dropout: both precisions see the same network
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    y = torch.arange(16) % len(COUNTS)
    return net, method, x0, y


def loss_and_grad(net, method, x0, y, precision: str, seed: int = 1):
    torch.manual_seed(seed)  # the same t, eps and labels in both precisions
    net.zero_grad(set_to_none=True)
    loss, stats, _ = Objective(net, method, precision)(x0, y)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    return loss.detach(), stats, grad


@pytest.mark.parametrize("method_name", FAMILIES)
def test_bf16_step_is_close_to_fp32(method_name):
    net, method, x0, y = make(method_name)
    loss32, stats32, grad32 = loss_and_grad(net, method, x0, y, "fp32")
    loss16, stats16, grad16 = loss_and_grad(net, method, x0, y, "bf16")
    assert loss16.dtype == torch.float32  # the loss is float32 whatever ran inside
    assert abs(loss16 - loss32) <= 0.02 * loss32
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert cosine > 0.995, f"gradient direction: cosine {cosine:.5f}"
    assert abs(grad16.norm() / grad32.norm() - 1) < 0.03
    if "gap" in stats32:  # CM's D_i: a difference of two predictions, computed in float32
        assert stats16["gap"].dtype == torch.float32 and stats32["gap"] > 0
        assert abs(stats16["gap"] / stats32["gap"] - 1) < 0.1


def test_the_network_returns_float32_under_autocast():
    net, _, x0, y = make("cm")
    with accel.autocast("bf16", torch.device("cpu")):
        out = net(x0, torch.zeros(16, dtype=torch.long), y)
        inner = net.head(x0)
    assert inner.dtype == torch.bfloat16 and out.dtype == torch.float32


def test_bf16_is_not_a_no_op():
    """The forward passes do run in bf16 (else the test above would prove nothing)."""
    net, method, x0, y = make("ddpm")
    loss32, _, grad32 = loss_and_grad(net, method, x0, y, "fp32")
    loss16, _, grad16 = loss_and_grad(net, method, x0, y, "bf16")
    assert not torch.equal(grad32, grad16) and loss32 != loss16



def test_compiled_network_gives_the_eager_loss_and_gradient(monkeypatch):
    """compile: true through CM's two passes (branches on, then off: two compiled variants of
    decode). The graphs are captured as on a GPU; aot_eager runs them without inductor's code
    generation, which takes minutes on a 2-core CPU (benchmarks/gpu.sh compiles with inductor)."""
    monkeypatch.setenv("CM_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    net, method, x0, y = make("cm", preset="tiny")
    loss_eager, _, grad_eager = loss_and_grad(net, method, x0, y, "fp32")
    accel.prepare_network(net, channels_last=False, compile=True)
    loss_compiled, _, grad_compiled = loss_and_grad(net, method, x0, y, "fp32")
    assert torch.allclose(loss_compiled, loss_eager, rtol=1e-5, atol=1e-7)
    assert torch.allclose(grad_compiled, grad_eager, rtol=1e-3, atol=1e-6)
    fresh, _, _, _ = make("cm", preset="tiny")
    assert list(net.state_dict()) == list(fresh.state_dict())  # checkpoints load into eager networks


def test_bf16_guided_ddim_is_close_to_fp32():
    """Sampling under autocast: the DDIM updates stay float32, the images move by little."""
    net, _, _, _ = make("ddpm", preset="tiny")
    diffusion = GaussianDiffusion(timesteps=100)
    y = torch.arange(10) % len(COUNTS)
    images = {}
    for precision in ("fp32", "bf16"):
        with accel.autocast(precision, torch.device("cpu")):
            images[precision] = diffusion.ddim_sample(net, y, (10, 1, 8, 8), steps=10, guidance=1.5,
                                                      generator=torch.Generator().manual_seed(0))
    assert images["bf16"].dtype == torch.float32
    difference = (images["bf16"] - images["fp32"]).abs()
    assert 0 < difference.mean() < 0.02 and difference.max() < 0.2  # of a [-1, 1] range
