"""The training step never waits on the host between log steps, and the NaN guard keeps its meaning.

On a GPU every read of a device tensor's value (`.item()`, `bool()`, `.tolist()`, `.cpu()`, ...)
stalls the host until the device has caught up. The test wraps those reads and runs the real loop
with fused Adam (CUDA's default kernel; on the CPU it is chosen with `adam: fused`): the only reads
inside a step are the label-drop coin, drawn from the CPU generator (a host number, no device
involved), and the log step's one read of the window.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter

import pytest
import torch

from cm import config as cfg
from cm.data import build_manifest
from cm.diffusion import GaussianDiffusion
from cm.errors import NonFiniteLossError
from cm.methods import build_method
from cm.models import build_unet
from cm.train import train
from cm.trainer import Trainer
from tests.conftest import ROOT, tiny_budgets

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# Functions of torch that compare device values and return a host bool: a read as well (on CUDA,
# torch.equal ends in .item() inside C++, out of reach of the Tensor wrappers).
COMPARISONS = ("equal", "allclose", "is_nonzero")


@pytest.fixture(scope="module")
def setup():
    params = tiny_budgets(cfg.load_params(ROOT / "params.yaml"))
    experiment = params["experiments"]["digits_lt"]
    experiment["train"].update(steps=20, log_every=10, checkpoint_every=1000, label_drop=0.3)
    return params, experiment, build_manifest(experiment["data"])


@pytest.fixture
def reads(monkeypatch):
    """Counts value reads of tensors made from cm's code, by (module file, function)."""
    calls = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            frame = sys._getframe(1)
            if "/cm/" in frame.f_code.co_filename:
                calls[(frame.f_code.co_filename.split("/cm/")[-1], frame.f_code.co_name)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    for name in COMPARISONS:
        original = getattr(torch, name)

        def compared(*args, _original=original, **kwargs):
            frame = sys._getframe(1)
            if "/cm/" in frame.f_code.co_filename:
                calls[(frame.f_code.co_filename.split("/cm/")[-1], frame.f_code.co_name)] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, compared)
    return calls


@pytest.mark.parametrize(("method", "passes"), [("cm+cbdm", "two"), ("cm+oc", "two"),
                                                ("cm+cbdm", "shared_encoder")])  # CBDM's batched pair, fast mode
def test_steps_between_log_steps_read_nothing_from_the_device(tmp_path, setup, reads, method, passes):
    params, experiment, manifest = setup
    experiment = copy.deepcopy(experiment)
    experiment["train"]["adam"] = "fused"
    method_params = copy.deepcopy(params["method_params"])
    method_params["cm"]["passes"] = passes
    steps = experiment["train"]["steps"]
    train(manifest=manifest, experiment=experiment, method_name=method, method_params=method_params,
          seed=0, out=tmp_path / "model.pt", checkpoint_root=tmp_path / "ckpt", history_out=tmp_path / "h.csv",
          device="cpu", progress=False)
    coin = ("methods/base.py", "noised_batch")
    assert reads.pop(coin) == steps  # one host draw per step, from the CPU generator
    log_steps = steps // experiment["train"]["log_every"]
    assert reads.pop(("trainer.py", "read_window")) == log_steps  # one read per log step
    assert not reads, f"reads from the device inside steps: {dict(reads)}"


def make_trainer(adam: str, processes_label_drop: float = 0.0):
    torch.manual_seed(0)
    counts = [40, 20, 10]
    diffusion = GaussianDiffusion(timesteps=100)
    train_cfg = {"lr": 1e-3, "grad_clip": 1.0, "ema_decay": 0.9, "label_drop": processes_label_drop,
                 "precision": "fp32", "channels_last": False, "compile": False, "adam": adam}
    method = build_method("cm", diffusion=diffusion, train=train_cfg, all_params={}, class_counts=counts)
    net = build_unet("tiny", num_classes=3, in_channels=1, image_size=8)
    method.prepare(net)
    return Trainer(net, method, train_cfg, torch.device("cpu"))


def snapshot(trainer):
    return ([p.detach().clone() for p in trainer.params], [p.clone() for p in trainer.ema_params],
            copy.deepcopy(trainer.optimizer.state_dict()))


def same(a, b):
    weights_a, ema_a, opt_a = a
    weights_b, ema_b, opt_b = b
    return (all(map(torch.equal, weights_a, weights_b)) and all(map(torch.equal, ema_a, ema_b))
            and all(torch.equal(sa[k], sb[k]) for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values())
                    for k in sa))


@pytest.mark.parametrize("adam", ["auto", "fused"])  # checked on the host / on the device
def test_a_non_finite_step_changes_nothing_and_is_counted(adam):
    trainer = make_trainer(adam)
    x0, y = torch.rand(8, 1, 8, 8) * 2 - 1, torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    trainer.step(x0, y, 1e-3)
    before = snapshot(trainer)
    poisoned = x0.clone()
    poisoned[3, 0, 2, 2] = float("nan")
    trainer.step(poisoned, y, 1e-3)
    assert same(before, snapshot(trainer)), "a NaN step changed the weights, the EMA or Adam's state"
    means, nonfinite = trainer.read_window()
    assert nonfinite == 1
    assert means["loss"] == pytest.approx(means["loss"]) and means["loss"] < 10  # the finite step only
    trainer.step(x0, y, 1e-3)
    assert not same(before, snapshot(trainer))  # and the next finite step trains again
    assert trainer.read_window()[1] == 1


def test_training_stops_at_the_limit_keeping_the_last_good_checkpoint(tmp_path, setup, monkeypatch):
    params, experiment, manifest = setup
    experiment = copy.deepcopy(experiment)
    experiment["train"].update(adam="fused", checkpoint_every=5, log_every=5, max_nonfinite_steps=1)
    from cm.methods import ddpm

    calls = Counter()
    original = ddpm.DDPM.__call__

    def nan_on_steps_7_and_8(self, net, x0, y):
        calls["n"] += 1
        out = original(self, net, x0, y)
        if calls["n"] in (7, 8):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ddpm.DDPM, "__call__", nan_on_steps_7_and_8)
    with pytest.raises(NonFiniteLossError, match=r"ddpm: non-finite loss \(nan\) by step 10, 2 such step"):
        train(manifest=manifest, experiment=experiment, method_name="ddpm", method_params=params["method_params"],
              seed=0, out=tmp_path / "model.pt", checkpoint_root=tmp_path / "ckpt", history_out=tmp_path / "h.csv",
              device="cpu", progress=False)
    kept = sorted(p.name for p in (tmp_path / "ckpt").rglob("step_*.pt"))
    assert kept == ["step_000000005.pt"] and not (tmp_path / "model.pt").exists()


def test_the_window_logs_the_base_loss_per_class():
    """Per-class training loss: a step of class-0 images then a step of class-2 images; each class's
    logged loss is its step's base loss, and their mean is the window's base loss."""
    trainer = make_trainer("fused")
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    trainer.step(x0, torch.zeros(8, dtype=torch.long), 1e-3)
    first, _ = trainer.read_window()
    trainer.step(x0, torch.zeros(8, dtype=torch.long), 1e-3)
    trainer.step(x0, torch.full((8,), 2), 1e-3)
    means, _ = trainer.read_window()
    assert first["loss_class_0"] == pytest.approx(first["loss_base"], rel=1e-6) and "loss_class_2" not in first
    assert "loss_class_1" not in means  # no class-1 image in the window
    assert (means["loss_class_0"] + means["loss_class_2"]) / 2 == pytest.approx(means["loss_base"], rel=1e-6)
