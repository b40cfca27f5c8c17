"""The training loop: checkpoints, resume with identical results, fallback past a corrupt file."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cm import config as cfg
from cm import io
from cm.data import build_manifest
from cm.train import EpochSampler, fingerprint, learning_rate, train
from cm.trainer import ema_update, foreach_mismatch
from tests.conftest import ROOT, tiny_budgets


@pytest.fixture(scope="module")
def setup():
    params = tiny_budgets(cfg.load_params(ROOT / "params.yaml"))
    experiment = params["experiments"]["digits_lt"]
    experiment["train"].update(steps=12, checkpoint_every=4, log_every=2, keep_checkpoints=3)
    return params, experiment, build_manifest(experiment["data"])


def run(tmp, setup, method="cm", steps=None, seed=0, folder="ckpt"):
    params, experiment, manifest = setup
    experiment = copy.deepcopy(experiment)
    if steps:
        experiment["train"]["steps"] = steps
    summary = train(manifest=manifest, experiment=experiment, method_name=method,
                    method_params=params["method_params"][method], seed=seed, out=tmp / "model.pt",
                    checkpoint_root=tmp / folder, history_out=tmp / "history.csv", progress=False)
    return summary, io.load_torch(tmp / "model.pt")


def assert_same_weights(a, b):
    for part in ("state_dict", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"


@pytest.mark.parametrize("method", ["ddpm", "cm"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, setup, method):
    _, whole = run(tmp_path / "whole", setup, method)
    first, _ = run(tmp_path / "split", setup, method, steps=8)       # "interrupted" after step 8
    second, resumed = run(tmp_path / "split", setup, method)          # the same command again
    assert first["resumed_from"] == 0 and second["resumed_from"] == 8
    assert_same_weights(whole, resumed)
    assert [row["step"] for row in second["history"]] == list(range(2, 13, 2))


def test_checkpoints_are_rotated_and_in_a_settings_folder(tmp_path, setup):
    run(tmp_path, setup, "ddpm")
    (folder,) = (tmp_path / "ckpt").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [f"step_{s:09d}.pt" for s in (4, 8, 12)]
    state = io.load_torch(folder / "step_000000012.pt")
    assert {"model", "ema", "optimizer", "sampler", "rng", "history"} <= set(state)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, setup):
    _, whole = run(tmp_path / "whole", setup, "ddpm")
    run(tmp_path / "split", setup, "ddpm", steps=8)
    (folder,) = (tmp_path / "split" / "ckpt").iterdir()
    latest = folder / "step_000000008.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a crash without atomic write
    summary, resumed = run(tmp_path / "split", setup, "ddpm")
    assert summary["resumed_from"] == 4
    assert_same_weights(whole, resumed)


def test_other_settings_do_not_resume_from_foreign_checkpoints(setup):
    params, experiment, manifest = setup
    base = {"manifest": "h", "train": dict(experiment["train"]), "seed": 0}
    longer = copy.deepcopy(base)
    longer["train"]["steps"] *= 2  # more steps: the same trajectory, so it may resume
    other_lr = copy.deepcopy(base)
    other_lr["train"]["lr"] *= 2
    assert fingerprint(base) == fingerprint(longer) != fingerprint(other_lr)
    assert fingerprint(base) != fingerprint({**base, "seed": 1})
    # A decaying learning rate depends on the run's length, so there more steps is another trajectory.
    cosine = copy.deepcopy(base)
    cosine["train"]["lr_decay"] = "cosine"
    longer_cosine = copy.deepcopy(cosine)
    longer_cosine["train"]["steps"] *= 2
    assert len({fingerprint(base), fingerprint(cosine), fingerprint(longer_cosine)}) == 3
    # lr_decay none is the former implicit setting: a run without the key has the same fingerprint.
    without = copy.deepcopy(base)
    without["train"].pop("lr_decay")
    assert fingerprint(without) == fingerprint(base)


def test_learning_rate_warms_up_then_holds_or_follows_a_half_cosine():
    cfg = {"lr": 1e-3, "warmup_steps": 10, "steps": 110, "lr_decay": "none"}
    held = [learning_rate(s, cfg) for s in range(110)]
    assert held[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert held[10:] == [1e-3] * 100
    cosine = [learning_rate(s, {**cfg, "lr_decay": "cosine"}) for s in range(110)]
    assert cosine[:11] == held[:11]  # the warm-up, and the first step after it at the full rate
    assert cosine[60] == pytest.approx(0.5e-3)  # halfway through the decay: cos(pi / 2) = 0
    assert cosine[35] == pytest.approx(1e-3 * (1 + 2 ** -0.5) / 2)  # a quarter: cos(pi / 4)
    assert all(a > b for a, b in zip(cosine[10:], cosine[11:]))
    assert 0 < cosine[-1] < 1e-3 * (math.pi / 100) ** 2  # 1 - cos(x) <= x^2 / 2 at the last step


def test_epoch_sampler_covers_each_epoch_and_resumes():
    sampler = EpochSampler(10, 3, seed=0)
    epoch = torch.cat([sampler.next() for _ in range(3)])
    assert len(set(epoch.tolist())) == 9  # drop_last: 3 batches of 3 from 10
    state = copy.deepcopy(sampler.state_dict())
    ahead = [sampler.next().tolist() for _ in range(4)]
    sampler.load_state_dict(state)
    assert [sampler.next().tolist() for _ in range(4)] == ahead


def test_training_reduces_the_loss(tmp_path, setup):
    summary, _ = run(tmp_path, setup, "ddpm", steps=60)
    losses = [row["loss"] for row in summary["history"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_rerun_with_unchanged_settings_rewrites_the_same_bytes(tmp_path, setup):
    """What makes DVC's coarse method_params dependency cheap: a retrain whose own settings did not
    change resumes from its final checkpoint and writes an identical file (nothing downstream reruns)."""
    run(tmp_path, setup, "ddpm")
    first = (tmp_path / "model.pt").read_bytes()
    summary, _ = run(tmp_path, setup, "ddpm")
    assert summary["resumed_from"] == summary["steps"]
    assert (tmp_path / "model.pt").read_bytes() == first


def test_a_shortened_run_resumes_from_a_checkpoint_within_its_steps(tmp_path, setup):
    run(tmp_path / "long", setup, "ddpm")                     # checkpoints at 4, 8, 12
    summary, short = run(tmp_path / "long", setup, "ddpm", steps=8)
    _, direct = run(tmp_path / "direct", setup, "ddpm", steps=8)
    assert summary["resumed_from"] == 8 and short["step"] == 8
    assert_same_weights(short, direct)


# --------------------------------------------------------------------------- EMA and memory layout

def _tensors(seed, shapes=((4, 3, 3, 3), (4,), (7, 5)), channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=gen) for shape in shapes]
    return [t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t for t in out]


def test_the_ema_update_is_the_reference_ema_in_one_multi_tensor_call():
    """ema <- ema + w (p - ema). The host-weight form is torch.lerp itself, bit for bit (lerp rounds
    once, a fused multiply-add: within one float32 ulp of the formula evaluated exactly); the
    device-gated form is the formula's three float32 operations, bit for bit, and a no-op when skipped."""
    weight = 1.0 - 0.9999
    ema, params = _tensors(0), _tensors(1)
    lerped = [e.clone() for e in ema]
    ema_update(lerped, params, weight)
    for new, e, p in zip(lerped, ema, params):
        assert torch.equal(new, torch.lerp(e, p, weight))
        exact = e.double() + weight * (p.double() - e.double())
        ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
        assert ((new.double() - exact).abs() <= ulp).all()
    gated = [e.clone() for e in ema]
    ema_update(gated, params, weight, skip=torch.tensor(False))
    for new, e, p in zip(gated, ema, params):
        assert torch.equal(new, e + torch.tensor(weight, dtype=torch.float32) * (p - e))
    skipped = [e.clone() for e in ema]
    ema_update(skipped, params, weight, skip=torch.tensor(True))
    assert all(torch.equal(new, e) for new, e in zip(skipped, ema))


def test_foreach_mismatch_names_what_misses_the_fused_path():
    a = _tensors(0)
    assert foreach_mismatch(a, _tensors(1)) == ""
    assert "strides" in foreach_mismatch(_tensors(0, channels_last=True), a)   # the EMA copied before the layout change
    assert "device/dtype" in foreach_mismatch(a, [t.double() for t in a])
    assert "not dense" in foreach_mismatch([a[0].transpose(0, 1)], [a[0].transpose(0, 1)])


def _trainer(channels_last: bool, adam: str = "auto"):
    from cm.diffusion import GaussianDiffusion
    from cm.methods import build_method
    from cm.models import build_unet
    from cm.trainer import Trainer

    torch.manual_seed(0)
    cfg_ = {"lr": 1e-3, "grad_clip": 1.0, "ema_decay": 0.9, "label_drop": 0.0, "precision": "fp32",
            "channels_last": channels_last, "compile": False, "adam": adam}
    method = build_method("cm", diffusion=GaussianDiffusion(timesteps=100), train=cfg_, all_params={},
                          class_counts=[4, 2, 1])
    net = build_unet("small", num_classes=3, in_channels=3, image_size=8)
    method.prepare(net)
    return Trainer(net, method, cfg_, torch.device("cpu"))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("adam", ["auto", "fused"])  # the host-weight and the device-gated EMA
def test_the_trainer_meets_the_fused_paths_preconditions_and_updates_the_ema_by_the_formula(channels_last, adam,
                                                                                           monkeypatch):
    from cm import trainer as trainer_module

    trainer = _trainer(channels_last, adam)
    weights, inside = [], []  # the weight of each multi-tensor call of the EMA update
    for name in ("_foreach_lerp_", "_foreach_mul_"):
        original = getattr(torch, name)

        def spy(*args, _original=original):
            if inside:
                weights.append(args[-1])
            return _original(*args)

        monkeypatch.setattr(torch, name, spy)
    update = trainer_module.ema_update

    def watched(*args, **kwargs):
        inside.append(True)
        try:
            return update(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(trainer_module, "ema_update", watched)
    assert trainer.on_device == (adam == "fused")
    assert foreach_mismatch(trainer.ema_params, trainer.params) == ""
    convs = [p for p in trainer.params if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) == channels_last or p.shape[2:] == (1, 1)
               for p in convs)
    before = [e.clone() for e in trainer.ema_params]
    x0, y = torch.rand(6, 3, 8, 8) * 2 - 1, torch.tensor([0, 0, 1, 2, 0, 1])
    trainer.step(x0, y, 1e-3)
    # One host float (lerp), or one 0-dim device tensor (mul): never a list of per-tensor weights.
    assert len(weights) == 1
    if adam == "auto":
        assert isinstance(weights[0], float)
    else:
        assert weights[0].dim() == 0 and weights[0].dtype == torch.float32
    w = 1.0 - trainer.cfg["ema_decay"]
    for new, e, p in zip(trainer.ema_params, before, trainer.params):
        expected = torch.lerp(e, p, w) if adam == "auto" else e + torch.tensor(w, dtype=e.dtype) * (p - e)
        assert torch.equal(new, expected)
        assert new.stride() == p.stride()


@pytest.fixture(scope="module")
def colour_setup(tmp_path_factory):
    """digits_lt's settings on a 3-channel .npz: on one channel NCHW and NHWC strides coincide."""
    import numpy as np

    path = tmp_path_factory.mktemp("colour") / "train.npz"
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [20, 12, 8])
    np.savez(path, images=rng.integers(0, 256, size=(len(labels), 8, 8, 3), dtype=np.uint8), labels=labels)
    params = tiny_budgets(cfg.load_params(ROOT / "params.yaml"))
    experiment = params["experiments"]["digits_lt"]
    experiment["data"].update(source="npz", path=str(path), imbalance_ratio=2, hflip=True)
    experiment["train"].update(steps=3, checkpoint_every=100, log_every=3, batch_size=8)
    return params, experiment, build_manifest(experiment["data"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_batches_are_dense_in_the_layout_asked_for(tmp_path, colour_setup, monkeypatch, channels_last):
    from cm.trainer import Objective

    params, experiment, manifest = colour_setup
    experiment = copy.deepcopy(experiment)
    experiment["train"]["channels_last"] = channels_last
    layout = torch.channels_last if channels_last else torch.contiguous_format
    seen = []
    original = Objective.forward

    def recording(self, x0, y):
        head = self.net.head.register_forward_pre_hook(lambda m, args: seen.append(("x_t", args[0])))
        try:
            seen.append(("x0", x0))
            return original(self, x0, y)
        finally:
            head.remove()

    monkeypatch.setattr(Objective, "forward", recording)
    train(manifest=manifest, experiment=experiment, method_name="cm", method_params=params["method_params"],
          seed=0, out=tmp_path / "model.pt", checkpoint_root=tmp_path / "ckpt", history_out=tmp_path / "h.csv",
          device="cpu", progress=False)
    assert {name for name, _ in seen} == {"x0", "x_t"}
    for name, x in seen:
        assert x.shape[1] == 3 and x.is_contiguous(memory_format=layout), (name, x.stride())
