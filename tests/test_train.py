"""The training loop: checkpoints, resume with identical results, fallback past a corrupt file."""

from __future__ import annotations

import copy

import pytest
import torch

from cm import config as cfg
from cm import io
from cm.data import build_manifest
from cm.train import EpochSampler, fingerprint, train
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
