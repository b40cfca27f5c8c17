"""LoRA fine-tuning with CM (cm/finetune, paper section 3.3): frozen W_f, the theta_g switch, CM's
loss and gradients against an independent computation, merging, diffusers folders, bad inputs.

Every model is tiny, built from a config with random weights (as diffusers' own tests do); no network.
The tiny models are tests/tiny_diffusers.py's.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from cm.diffusion import GaussianDiffusion  # noqa: E402
from cm.finetune import (  # noqa: E402
    EXPERT,
    GENERAL,
    ExpertAdapters,
    LoraSettings,
    adapter_names,
    adapter_parameters,
    adapter_state_dict,
    attach,
    load_adapter_state_dict,
    merged,
)
from cm.finetune.diffusers_models import (  # noqa: E402
    ClassConditionedUNet,
    check_matches,
    load_pretrained_unet,
    save_merged_pretrained,
)
from cm.methods.cm import CapacityManipulation, signed_class_weights  # noqa: E402
from cm.methods.ddpm import DDPM  # noqa: E402
from cm.models import build_unet  # noqa: E402
from tests import tiny_diffusers  # noqa: E402
from tests.tiny_diffusers import pretend_pretrained, tiny_cond_unet, tiny_text_encoder  # noqa: E402

CLASSES = ("cat", "dog", "owl")
COUNTS = (8, 3, 1)
TEMPLATE = "a painting in the style of {class}"
T = 100
RANK = 2
KINDS = ("cm", "unet2d", "sd")  # the project's U-Net, UNet2DModel with class labels, UNet2DConditionModel + prompts


def tiny_tokenizer() -> CLIPTokenizer:
    return tiny_diffusers.tiny_tokenizer(("a", "painting", "in", "the", "style", "of", *CLASSES))


def tiny_class_unet(num_class_embeds: int = len(CLASSES) + 1) -> UNet2DModel:
    return tiny_diffusers.tiny_class_unet(num_class_embeds)


def make(kind: str) -> tuple[nn.Module, int]:
    """A pretrained-like class-conditional net(x, t, y) of `kind` and its input channels."""
    if kind == "cm":
        torch.manual_seed(0)
        return pretend_pretrained(build_unet("tiny", num_classes=len(CLASSES), in_channels=1, image_size=8)), 1
    if kind == "unet2d":
        return ClassConditionedUNet(pretend_pretrained(tiny_class_unet()), len(CLASSES)), 1
    tokenizer = tiny_tokenizer()
    net = ClassConditionedUNet.from_prompts(pretend_pretrained(tiny_cond_unet()), tiny_text_encoder(len(tokenizer)),
                                            tokenizer, CLASSES, TEMPLATE)
    return net, 4


def inputs(channels: int, n: int = 6, dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, channels, 8, 8, generator=gen, dtype=dtype)
    return x, torch.randint(0, T, (n,), generator=gen), torch.arange(n) % len(CLASSES)


@torch.no_grad()
def wake_adapters(net: nn.Module, std: float = 0.1) -> None:
    """B starts at zero; give every adapter's B (and so B A) a value, as training would."""
    gen = torch.Generator().manual_seed(3)
    for _, layer in net.named_modules():
        if isinstance(layer, BaseTunerLayer):
            for b in layer.lora_B.values():
                b.weight.copy_(std * torch.randn(b.weight.shape, generator=gen, dtype=b.weight.dtype))


def base_parameters(net: nn.Module) -> dict[str, torch.Tensor]:
    adapters = {id(p) for p in adapter_parameters(net)}
    return {n: p for n, p in net.named_parameters() if id(p) not in adapters}


@pytest.mark.parametrize("kind", KINDS)
def test_attaching_keeps_the_function_and_training_moves_only_the_adapters(kind):
    net, channels = make(kind)
    x, t, y = inputs(channels)
    with torch.no_grad():
        before = net(x, t, y)
    ExpertAdapters(LoraSettings(rank=RANK)).prepare(net)
    assert adapter_names(net) == (GENERAL, EXPERT)
    if kind == "sd":  # attached through diffusers' PeftAdapterMixin: its adapter API knows them
        assert net.unet.active_adapters() == [GENERAL, EXPERT] and set(net.unet.peft_config) == {GENERAL, EXPERT}
    with torch.no_grad():
        assert torch.equal(net(x, t, y), before)  # B = 0: each adapter adds exact zeros

    frozen = {n: p.detach().clone() for n, p in base_parameters(net).items()}
    start = [p.detach().clone() for p in adapter_parameters(net)]
    assert frozen and all(p.requires_grad for p in adapter_parameters(net))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)  # handed W_f too: it must still not move
    method = DDPM(GaussianDiffusion(T), label_drop=0.0)
    x0 = x.clamp(-1, 1)
    for step in range(2):  # step 1 moves every B; A's gradient is B^T(...) = 0 until B != 0, so step 2 moves A
        opt.zero_grad(set_to_none=True)
        method(net, x0, y).loss.backward()
        opt.step()
        for name, p in base_parameters(net).items():
            assert p.grad is None and not p.requires_grad, name
            assert torch.equal(p, frozen[name]), name
    for layer_name, layer in net.named_modules():
        if isinstance(layer, BaseTunerLayer):
            for adapter in (GENERAL, EXPERT):
                for part in (layer.lora_A[adapter], layer.lora_B[adapter]):
                    assert part.weight.grad is not None, (layer_name, adapter)
    moved = [not torch.equal(p, p0) for p, p0 in zip(adapter_parameters(net), start)]
    assert all(moved), f"{moved.count(False)} of {len(moved)} adapter tensors did not move"


@pytest.mark.parametrize("kind, label_drop", [("cm", 0.0), ("cm", 1.0), ("sd", 0.0)])
def test_cm_loss_and_gradients_equal_an_independent_computation(kind, label_drop):
    net, channels = make(kind)
    diffusion = GaussianDiffusion(T)
    method = CapacityManipulation(DDPM(diffusion, label_drop), COUNTS, reservation=ExpertAdapters(LoraSettings(RANK)),
                                  **{"lambda": 0.5})
    method.prepare(net)
    wake_adapters(net)
    net.double()  # float64: both sides run the same layers, so only rounding order can differ
    # Independent reference: theta_g+e is a copy of the net; theta_g another copy whose expert B is zeroed
    # by hand (no adapter switching). A general tensor feeds both copies, an expert tensor the first only.
    full, theta_g = copy.deepcopy(net), copy.deepcopy(net)
    with torch.no_grad():
        for layer in theta_g.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.lora_B[EXPERT].weight.zero_()
    x0, _, y = inputs(channels, dtype=torch.float64)
    x0 = x0.clamp(-1, 1)

    torch.manual_seed(11)
    out = method(net, x0, y)
    out.loss.backward()

    torch.manual_seed(11)  # replay noised_batch's draws: t, eps, the label-drop coin
    t = torch.randint(0, T, (len(x0),))
    eps = torch.randn_like(x0)
    cond = None if torch.rand(()).item() < label_drop else y
    abar = diffusion.alphas_bar[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    h_full, h_g = full(x_t, t, cond), theta_g(x_t, t, cond)
    gap = (h_full - h_g).pow(2).flatten(1).mean(1)
    weight = signed_class_weights(COUNTS, 1.0, 0.2).float().double()[y]  # the method keeps them in float32
    expected = F.mse_loss(h_full, eps) + 0.5 * (weight * gap).mean()
    expected.backward()

    assert (out.cond is None) == (label_drop == 1.0) and gap.min() > 0
    # float64 end to end: 1e-12 relative is ~1e4 ulps of room for summation order, far below any real change
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    refs_full, refs_g = dict(full.named_parameters()), dict(theta_g.named_parameters())
    checked = {GENERAL: 0, EXPERT: 0}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        adapter = GENERAL if f".{GENERAL}." in name else EXPERT
        grad = refs_full[name].grad + (refs_g[name].grad if adapter == GENERAL else 0)
        assert p.grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, grad, rtol=1e-9, atol=1e-12 * grad.abs().max().item(), msg=name)
        checked[adapter] += 1
    assert checked[GENERAL] == checked[EXPERT] > 0
    assert all(p.requires_grad for p in adapter_parameters(net))  # the switch restored the flags


@pytest.mark.parametrize("kind", KINDS)
def test_merged_model_equals_the_adapted_one_with_the_pretrained_layout(kind):
    net, channels = make(kind)
    keys, count = list(net.state_dict()), sum(p.numel() for p in net.parameters())
    reservation = ExpertAdapters(LoraSettings(rank=RANK))
    reservation.prepare(net)
    wake_adapters(net)
    net.double()
    x, t, y = inputs(channels, dtype=torch.float64)
    with torch.no_grad():
        h_full = net(x, t, y)
        with reservation.disabled(net):
            h_g = net(x, t, y)
        with pytest.raises(KeyError), reservation.disabled(net):
            raise KeyError("the switch must restore the expert even when the theta_g pass fails")
        plain, plain_g = merged(net), merged(net, drop=(EXPERT,))
        assert (h_full - h_g).abs().max() > 1e-3
        # float64: W_f + B A folded once versus added per call agree to 1e-10 (docs/methods.md, Merging)
        torch.testing.assert_close(plain(x, t, y), h_full, rtol=0, atol=1e-10)
        torch.testing.assert_close(plain_g(x, t, y), h_g, rtol=0, atol=1e-10)
        torch.testing.assert_close(net(x, t, y), h_full, rtol=0, atol=0)  # expert back on; merging left net alone
    for model in (plain, plain_g):
        assert list(model.state_dict()) == keys
        assert sum(p.numel() for p in model.parameters()) == count
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        assert {type(m) for m in model.modules()} & {nn.Conv2d, nn.Linear}
        assert not any(hasattr(m, "peft_config") for m in model.modules())


def test_saved_merged_pipeline_unet_reloads_and_samples(tmp_path):
    tokenizer = tiny_tokenizer()
    parts = {"unet": pretend_pretrained(tiny_cond_unet()), "text_encoder": tiny_text_encoder(len(tokenizer)),
             "tokenizer": tokenizer}
    folder = tmp_path / "sd"
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}))

    pre = load_pretrained_unet(folder)
    assert isinstance(pre.unet, UNet2DConditionModel) and isinstance(pre.text_encoder, CLIPTextModel)
    keys = list(pre.unet.state_dict())
    net = ClassConditionedUNet.from_prompts(pre.unet, pre.text_encoder, pre.tokenizer, CLASSES, TEMPLATE)
    with torch.no_grad():
        empty = pre.tokenizer([""], padding="max_length", max_length=16, return_tensors="pt").input_ids
        torch.testing.assert_close(net.prompt_embeds[-1], pre.text_encoder(empty)[0][0])  # the unconditional row
    assert net.prompt_embeds.shape == (len(CLASSES) + 1, 16, 12)
    assert all((net.prompt_embeds[i] - net.prompt_embeds[j]).abs().max() > 0 for i in range(4) for j in range(i))
    ExpertAdapters(LoraSettings(rank=RANK)).prepare(net)
    wake_adapters(net)

    save_merged_pretrained(net, tmp_path / "merged")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "merged")
    state = reloaded.state_dict()
    assert list(state) == keys and not any("lora" in k for k in state)
    again = ClassConditionedUNet(reloaded, len(CLASSES), net.prompt_embeds).eval()
    x, t, y = inputs(4)
    with torch.no_grad():
        # float32: merged weights round differently from W_f x + B (A x); measured gaps ~1e-6 on outputs ~1
        torch.testing.assert_close(again(x, t, y), net(x, t, y), rtol=1e-4, atol=1e-5)

        scheduler = DDIMScheduler(num_train_timesteps=T)
        scheduler.set_timesteps(2)
        sample = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        labels = torch.arange(3)
        for step in scheduler.timesteps:
            eps = again(sample, step.expand(3), labels)
            sample = scheduler.step(eps, step, sample).prev_sample
        assert torch.isfinite(sample).all()
        ours = GaussianDiffusion(T).ddim_sample(again, labels, (3, 4, 8, 8), steps=2, guidance=1.5,
                                                generator=torch.Generator().manual_seed(4))
        assert torch.isfinite(ours).all()


def test_a_unet_folder_loads_alone_and_its_theta_g_merge_saves(tmp_path):
    pretend_pretrained(tiny_class_unet()).save_pretrained(tmp_path / "ddpm")
    pre = load_pretrained_unet(tmp_path / "ddpm")
    assert isinstance(pre.unet, UNet2DModel) and pre.text_encoder is None and pre.tokenizer is None
    check_matches(pre.unet, 8, 1)
    net = ClassConditionedUNet(pre.unet, len(CLASSES))
    reservation = ExpertAdapters(LoraSettings(rank=RANK))
    reservation.prepare(net)
    wake_adapters(net)
    save_merged_pretrained(net, tmp_path / "theta_g", drop=(EXPERT,))
    reloaded = ClassConditionedUNet(UNet2DModel.from_pretrained(tmp_path / "theta_g"), len(CLASSES))
    x, t, y = inputs(1)
    with torch.no_grad(), reservation.disabled(net):
        torch.testing.assert_close(reloaded(x, t, y), net(x, t, y), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reloaded(x, t, None), net(x, t, None), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["cm", "sd"])
def test_adapter_checkpoint_holds_exactly_the_low_rank_factors(kind):
    net, channels = make(kind)
    # Closed form on the un-adapted net, by layer names (the defaults: attention projections, resnet convs).
    attention = (".q", ".k", ".v", ".proj") if kind == "cm" else (".to_q", ".to_k", ".to_v", ".to_out.0")
    endings = (".conv1", ".conv2", *attention)
    expected = 0
    for name, m in net.named_modules():
        if name.endswith(endings):
            if isinstance(m, nn.Linear):
                expected += RANK * (m.in_features + m.out_features)
            else:
                k = m.kernel_size[0] * m.kernel_size[1]
                expected += RANK * m.in_channels * k + m.out_channels * RANK
    reservation = ExpertAdapters(LoraSettings(rank=RANK))
    reservation.prepare(net)
    wake_adapters(net)
    state = adapter_state_dict(net)
    assert expected > 0 and sum(v.numel() for v in state.values()) == 2 * expected
    assert all(".lora_A." in k or ".lora_B." in k for k in state)

    other, _ = make(kind)
    reservation.prepare(other)
    load_adapter_state_dict(other, state)
    x, t, y = inputs(channels)
    with torch.no_grad():
        assert torch.equal(other(x, t, y), net(x, t, y))
    with pytest.raises(ValueError, match="1 missing"):
        load_adapter_state_dict(other, dict(list(state.items())[1:]))


def test_bad_inputs_raise_one_line_naming_the_problem(tmp_path):
    with pytest.raises(ValueError, match="nowhere does not exist; expected a diffusers UNet"):
        load_pretrained_unet(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a diffusers model: no empty/config.json"):
        load_pretrained_unet(tmp_path / "empty")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="holds a 'AutoencoderKL', not a U-Net"):
        load_pretrained_unet(tmp_path / "vae")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match="file is a file, not a folder; expected a diffusers UNet"):
        load_pretrained_unet(tmp_path / "file")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    with pytest.raises(ValueError, match=r"bare/config.json: the U-Net's config lacks in_channels, which say what"):
        load_pretrained_unet(tmp_path / "bare")

    net, _ = make("cm")
    with pytest.raises(ValueError, match=r"'to_q' matches no layer of UNet; layers that can carry an adapter: "
                                         r".*conv1, conv2, .*temb_proj"):
        attach(net, LoraSettings(target_modules=("conv1", "to_q")))
    with pytest.raises(ValueError, match="'norm1' matches GroupNorm layer .* only nn.Linear and nn.Conv2d"):
        attach(net, LoraSettings(target_modules=("norm1",)))
    assert not adapter_names(net)  # a rejected attach leaves the net alone
    with pytest.raises(ValueError, match="no 'expert' adapter on UNet"):
        with ExpertAdapters().disabled(net):
            pass
    for bad in (dict(rank=0), dict(init="pissa"), dict(alpha=-1.0), dict(dropout=1.0)):
        with pytest.raises(ValueError, match="is not allowed"):
            LoraSettings(**bad)

    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="template 'a painting of' is not allowed: it must contain {class}"):
        ClassConditionedUNet.from_prompts(tiny_cond_unet(), tiny_text_encoder(len(tokenizer)), tokenizer,
                                          CLASSES, "a painting of")
    with pytest.raises(ValueError, match="takes 4-channel 8x8 inputs .* the data is 3-channel 32x32"):
        check_matches(tiny_cond_unet(), 32, 3)
    with pytest.raises(ValueError, match="takes 1-channel 8x8 inputs .* the data is 1-channel 16x16"):
        check_matches(tiny_class_unet(), 16, 1)
    with pytest.raises(ValueError, match="num_class_embeds = 4, not allowed for 4 classes: num_classes \\+ 1 = 5"):
        ClassConditionedUNet(tiny_class_unet(), 4)
    adapted, _ = make("unet2d")
    attach(adapted, LoraSettings(rank=RANK))
    with pytest.raises(ValueError, match="drop = \\('expert',\\) is not allowed: names of attached adapters"):
        merged(adapted, drop=(EXPERT,))
    attach(adapted, LoraSettings(rank=RANK), (EXPERT,))  # adapters can come one at a time
    assert adapter_names(adapted) == (GENERAL, EXPERT)
    with pytest.raises(ValueError, match="adapters = \\('general',\\) is not allowed: distinct new names "
                                         "\\(already attached: general, expert\\)"):
        attach(adapted, LoraSettings(rank=RANK))


def test_the_shared_encoder_pass_is_refused_with_adapters_in_the_encoder():
    with pytest.raises(ValueError, match="shared_encoder' is not allowed with ExpertAdapters"):
        CapacityManipulation(DDPM(GaussianDiffusion(timesteps=10), 0.0), [5, 1], passes="shared_encoder",
                             reservation=ExpertAdapters(LoraSettings(rank=2)))
