"""Merge, sample and evaluate as units, on a tiny trained model and the real digits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cm import config as cfg
from cm import io
from cm.checkpoint import load_merged
from cm.data import build_manifest, load_source
from cm.evaluate import evaluate, reference_features, train_evaluator
from cm.merge import merge
from cm.models import build_unet
from cm.sample import balanced_labels, sample
from cm.train import train
from tests.conftest import ROOT, tiny_budgets


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    params = tiny_budgets(cfg.load_params(ROOT / "params.yaml"))
    experiment = params["experiments"]["digits_lt"]
    experiment["train"]["steps"] = 4
    manifest = build_manifest(experiment["data"])
    for method in ("ddpm", "cm"):
        train(manifest=manifest, experiment=experiment, method_name=method,
              method_params=params["method_params"][method], seed=0, out=tmp / f"{method}.pt",
              checkpoint_root=tmp / "ckpt", history_out=tmp / f"{method}.csv", progress=False)
    return tmp, experiment, manifest


def test_merged_cm_is_a_plain_unet_with_the_same_function(trained):
    tmp, _, _ = trained
    state = io.load_torch(tmp / "cm.pt")
    for key in [k for k in state["ema"] if k.endswith(".B")]:
        state["ema"][key] = torch.randn_like(state["ema"][key]) * 0.1  # a non-silent branch
    io.save_torch(tmp / "cm_loud.pt", state)
    report = merge(tmp / "cm_loud.pt", tmp / "cm_merged.pt")
    merge(tmp / "ddpm.pt", tmp / "ddpm_merged.pt")
    cm_net, _ = load_merged(tmp / "cm_merged.pt")
    ddpm_net, _ = load_merged(tmp / "ddpm_merged.pt")
    plain = build_unet("tiny", num_classes=10, in_channels=1, image_size=8).state_dict()
    for net in (cm_net, ddpm_net):
        assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in plain.items()}
    assert report["had_branches"] and report["gap_float64"] <= 1e-10

    # Independent check: apply W_g + (B @ A).view(...) by hand to the first decoder conv.
    conv = "upblocks.0.conv1"
    a, b, w = (state["ema"][f"{conv}.{p}"] for p in ("A", "B", "base.weight"))
    torch.testing.assert_close(cm_net.state_dict()[f"{conv}.weight"], w + (b @ a).view(w.shape))


def test_branch_scale_travels_from_training_to_the_merge(trained, tmp_path):
    """A CM run with branch_scale s records it in its checkpoint; the merge folds in W_g + s B A."""
    tmp, experiment, manifest = trained
    params = {**cfg.load_params(ROOT / "params.yaml")["method_params"]["cm"], "branch_scale": 3.0}
    train(manifest=manifest, experiment=experiment, method_name="cm", method_params={"cm": params}, seed=0,
          out=tmp_path / "cm.pt", checkpoint_root=tmp_path / "ckpt", history_out=tmp_path / "cm.csv",
          progress=False)
    state = io.load_torch(tmp_path / "cm.pt")
    assert state["config"]["branch_scale"] == 3.0
    conv = "upblocks.0.conv1"
    state["ema"][f"{conv}.B"] = torch.randn_like(state["ema"][f"{conv}.B"])
    io.save_torch(tmp_path / "cm_loud.pt", state)
    merge(tmp_path / "cm_loud.pt", tmp_path / "merged.pt")
    a, b, w = (state["ema"][f"{conv}.{p}"] for p in ("A", "B", "base.weight"))
    merged, _ = load_merged(tmp_path / "merged.pt")
    torch.testing.assert_close(merged.state_dict()[f"{conv}.weight"], w + 3.0 * (b @ a).view(w.shape))


def test_the_theta_g_only_merge_is_checked_against_the_model_with_its_branches_off(trained, tmp_path, monkeypatch):
    import cm.merge

    tmp, _, _ = trained
    state = io.load_torch(tmp / "cm.pt")
    for key in [k for k in state["ema"] if k.endswith(".B")]:
        state["ema"][key] = torch.randn_like(state["ema"][key]) * 0.1  # branches that change the output
    io.save_torch(tmp_path / "cm_loud.pt", state)
    report = merge(tmp_path / "cm_loud.pt", tmp_path / "gonly.pt", drop_branches=True)
    assert report["drop_branches"] and report["gap_float64"] <= 1e-10 and report["gap_float32"] <= 1e-5
    # A theta_g-only merge that kept the branches would now be caught.
    real = cm.merge._merged_plain
    monkeypatch.setattr(cm.merge, "_merged_plain", lambda net, config, drop: real(net, config, False))
    with pytest.raises(RuntimeError, match="merged and unmerged outputs differ"):
        merge(tmp_path / "cm_loud.pt", tmp_path / "wrong.pt", drop_branches=True)
    assert not (tmp_path / "wrong.pt").exists()


def test_theta_g_only_merge_needs_branches(trained, tmp_path):
    tmp, _, _ = trained
    with pytest.raises(cfg.ConfigError, match="'ddpm' checkpoint has no low-rank branches to drop"):
        merge(tmp / "ddpm.pt", tmp_path / "gonly.pt", drop_branches=True)
    assert not (tmp_path / "gonly.pt").exists()


def test_merge_refuses_files_of_the_wrong_kind(trained, tmp_path):
    tmp, _, _ = trained
    merge(tmp / "ddpm.pt", tmp_path / "merged.pt")
    with pytest.raises(io.CorruptFileError, match=r"merged.pt: expected a cm.model/1 checkpoint"):
        merge(tmp_path / "merged.pt", tmp_path / "again.pt")
    (tmp_path / "torn.pt").write_bytes((tmp / "ddpm.pt").read_bytes()[:500])
    with pytest.raises(io.CorruptFileError, match="torn.pt: not a readable checkpoint"):
        merge(tmp_path / "torn.pt", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_sampling_is_balanced_and_seeded(trained, tmp_path):
    tmp, experiment, _ = trained
    merge(tmp / "ddpm.pt", tmp_path / "m.pt")
    experiment = copy.deepcopy(experiment)
    experiment["sample"].update(per_class=3, batch_size=7)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        sample(merged_path=tmp_path / "m.pt", out=tmp_path / f"{name}.npz", experiment=experiment, seed=seed,
               progress=False)
    a, b, c = (io.load_npz(tmp_path / f"{n}.npz") for n in "abc")
    assert a["labels"].tolist() == balanced_labels(10, 3).tolist() == np.repeat(np.arange(10), 3).tolist()
    assert a["images"].shape == (30, 8, 8, 1) and a["images"].dtype == np.uint8
    assert np.array_equal(a["images"], b["images"]) and not np.array_equal(a["images"], c["images"])


def test_evaluating_the_reference_itself_gives_zero_distances(tmp_path):
    params = tiny_budgets(cfg.load_params(ROOT / "params.yaml"))
    experiment = params["experiments"]["digits_lt"]
    experiment["evaluate"]["feature_net"]["steps"] = 30
    manifest = build_manifest(experiment["data"])
    train_evaluator(experiment=experiment, out=tmp_path / "net.pt", report_out=tmp_path / "net.json",
                    progress=False)
    reference_features(experiment=experiment, evaluator=tmp_path / "net.pt", out=tmp_path / "ref.npz",
                       stats_out=tmp_path / "stats.npz")
    full = load_source(experiment["data"])
    io.save_npz(tmp_path / "gen.npz", images=full.images, labels=full.labels)
    metrics = evaluate(samples=tmp_path / "gen.npz", evaluator=tmp_path / "net.pt", reference=tmp_path / "ref.npz",
                       stats=tmp_path / "stats.npz", manifest=manifest, experiment=experiment,
                       out=tmp_path / "metrics.json", features_out=tmp_path / "features.npz")
    assert abs(metrics["fid"]) < 1e-6 and all(abs(f) < 1e-6 for f in metrics["per_class"]["fid"])
    assert abs(metrics["fid_few"]) < 1e-6 and abs(metrics["kid"]) < 1e-3
    assert metrics["precision"] == metrics["recall"] == 1.0
    # Two disjoint real halves are further apart than a set and itself, but finite.
    assert 0 < metrics["fid_floor"] < 1e3 and all(f > 0 for f in metrics["per_class"]["fid_floor"])
    ref = io.load_npz(tmp_path / "ref.npz")
    assert metrics["acc"] == pytest.approx(float(np.mean(ref["predictions"] == ref["labels"])))
    assert io.read_json(tmp_path / "metrics.json")["fid_many"] == metrics["fid_many"]
    saved = io.load_npz(tmp_path / "features.npz")
    assert np.allclose(saved["features"], ref["features"], rtol=1e-5, atol=1e-6)
    assert str(saved["extractor"]) == "local" and np.array_equal(saved["labels"], full.labels)
