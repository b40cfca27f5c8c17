"""Unquantised samples end to end: `sample.quantize: false` stores float32 in [0, 1], the evaluate
stage feeds them as floats to the local classifier and to the Inception path (a small network in
the real Inception's place, which is not available here), and every record and table says which
extractor, fid_mode, weights and sample dtype made the numbers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import cm.evaluate
from cm import config as cfg
from cm import io
from cm.data import build_manifest, load_source
from cm.data.sources import LabeledImages
from cm.errors import DataError
from cm.evaluate import evaluate, reference_features, train_evaluator
from cm.merge import merge
from cm.metrics import inception
from cm.metrics.frechet import ReferenceStats
from cm.pipeline import stage_params
from cm.report import summarise, write_report
from cm.sample import _run_key, sample
from cm.train import train
from tests.conftest import ROOT, tiny_budgets


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """digits_lt at tiny budgets, its manifest, a trained local classifier and the real images."""
    tmp = tmp_path_factory.mktemp("digits")
    params = tiny_budgets(cfg.load_params(ROOT / "params.yaml"))
    experiment = params["experiments"]["digits_lt"]
    experiment["evaluate"]["feature_net"]["steps"] = 30
    experiment["train"]["steps"] = 4
    manifest = build_manifest(experiment["data"])
    train_evaluator(experiment=experiment, out=tmp / "net.pt", report_out=tmp / "net.json", progress=False)
    return tmp, params, experiment, manifest, load_source(experiment["data"])


def test_quantize_and_fid_mode_are_validated_and_trigger_their_stages(digits):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, key, value, allowed in (("evaluate", "fid_mode", "legacy_tf", "one of clean, legacy_pytorch"),
                                         ("sample", "quantize", "no", "type boolean")):
        bad = copy.deepcopy(raw)
        bad["experiments"]["digits_lt"][section][key] = value
        with pytest.raises(cfg.ConfigError) as err:
            cfg.check_params(bad, base_dir=ROOT)
        msg = str(err.value)
        assert f"experiments.digits_lt.{section}.{key}" in msg and repr(value) in msg and allowed in msg
        assert "\n" not in msg
    params = cfg.load_params(ROOT / "params.yaml")
    assert params["experiments"]["digits_lt"]["sample"]["quantize"] is True  # uint8 stays the default
    assert params["experiments"]["digits_lt"]["evaluate"]["fid_mode"] == "clean"
    for name in ("cifar10lt_ir100", "cifar10lt_ir50", "cifar100lt_ir100", "cifar100lt_ir50", "celebahq_ir100",
                 "imagenetlt_32", "imagenetlt_64"):
        exp = params["experiments"][name]
        assert (exp["evaluate"]["feature_extractor"], exp["evaluate"]["fid_mode"], exp["sample"]["quantize"]) == (
            "inception", "legacy_pytorch", False), name
    # Snakemake's rerun trigger (and DVC's params) carry both keys to the stages that read them.
    sampled = stage_params(params, "sample", experiment="digits_lt")["experiments.digits_lt.sample"]
    assert sampled["quantize"] is True
    for stage in ("reference_features", "evaluate"):
        assert stage_params(params, stage, experiment="digits_lt")["experiments.digits_lt.evaluate"]["fid_mode"]


def test_unquantised_samples_are_float32_in_the_unit_range(digits, tmp_path):
    tmp, params, experiment, manifest, _ = digits
    train(manifest=manifest, experiment=experiment, method_name="ddpm", method_params=params["method_params"]["ddpm"],
          seed=0, out=tmp_path / "ddpm.pt", checkpoint_root=tmp_path / "ckpt", history_out=tmp_path / "h.csv",
          progress=False)
    merge(tmp_path / "ddpm.pt", tmp_path / "m.pt")
    stored = {}
    for quantize in (True, False):
        exp = copy.deepcopy(experiment)
        exp["sample"].update(per_class=3, batch_size=7, quantize=quantize)
        sample(merged_path=tmp_path / "m.pt", out=tmp_path / f"{quantize}.npz", experiment=exp, seed=0, progress=False)
        stored[quantize] = io.load_npz(tmp_path / f"{quantize}.npz")["images"]
        stored[f"key{quantize}"] = _run_key(tmp_path / "m.pt", exp, 0)
    u8, f32 = stored[True], stored[False]
    assert u8.dtype == np.uint8 and f32.dtype == np.float32 and f32.shape == u8.shape == (30, 8, 8, 1)
    assert 0 <= f32.min() and f32.max() <= 1
    off_grid = np.abs(f32 * 255 - np.rint(f32 * 255))
    assert off_grid.max() > 0.1  # not rounded
    # The same images, rounded where uint8 is stored (a rounding tie may fall either way).
    diff = np.abs(np.rint(f32.astype(np.float64) * 255) - u8)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert stored["keyTrue"] != stored["keyFalse"]  # a resumed job never mixes the two kinds of batch


def test_float_samples_through_the_local_classifier(digits, tmp_path):
    tmp, _, experiment, manifest, full = digits
    reference_features(experiment=experiment, evaluator=tmp / "net.pt", out=tmp_path / "ref.npz",
                       stats_out=tmp_path / "stats.npz")
    rng = np.random.default_rng(0)
    sets = {
        "uint8": full.images,
        "unit": (full.images / 255).astype(np.float32),  # the same values as floats
        "off_grid": np.clip(full.images / 255 + rng.uniform(-0.5, 0.5, full.images.shape) / 255, 0, 1
                            ).astype(np.float32),
    }
    results, feats = {}, {}
    for name, images in sets.items():
        io.save_npz(tmp_path / f"{name}.npz", images=images, labels=full.labels)
        results[name] = evaluate(samples=tmp_path / f"{name}.npz", evaluator=tmp / "net.pt",
                                 reference=tmp_path / "ref.npz", stats=tmp_path / "stats.npz", manifest=manifest,
                                 experiment=experiment, out=tmp_path / f"{name}.json",
                                 features_out=tmp_path / f"{name}_features.npz")
        feats[name] = io.load_npz(tmp_path / f"{name}_features.npz")["features"]
    assert results["uint8"]["generated_dtype"] == "uint8" and results["unit"]["generated_dtype"] == "float32"
    assert results["unit"]["fid_mode"] is None and results["unit"]["feature_extractor"] == "local"
    np.testing.assert_allclose(feats["unit"], feats["uint8"], rtol=1e-5, atol=1e-5)
    assert abs(results["unit"]["fid"]) < 1e-6 and results["unit"]["acc"] == results["uint8"]["acc"]
    assert results["unit"]["per_class"]["acc"] == results["uint8"]["per_class"]["acc"]
    assert np.abs(feats["off_grid"] - feats["uint8"]).max() > 1e-4  # fed as floats, not rounded
    assert 0 < results["off_grid"]["fid"] < results["off_grid"]["fid_floor"]

    for bad in (full.images.astype(np.float32), full.images.astype(np.int32)):  # 0..255 floats; ints
        io.save_npz(tmp_path / "bad.npz", images=bad, labels=full.labels)
        with pytest.raises(io.CorruptFileError,
                           match=r"bad.npz: images are .* expected uint8 NHWC, or float in \[0, 1\]"):
            evaluate(samples=tmp_path / "bad.npz", evaluator=tmp / "net.pt", reference=tmp_path / "ref.npz",
                     stats=tmp_path / "stats.npz", manifest=manifest, experiment=experiment,
                     out=tmp_path / "bad.json", features_out=tmp_path / "bad_features.npz")
        assert not (tmp_path / "bad.json").exists()


class SmallInception(nn.Module):
    """In the real Inception's place: [0, 255] (B, 3, 299, 299) -> (B, 48), with a classifier."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 10)
        with torch.no_grad():
            self.fc.weight.copy_(torch.linspace(-1, 1, 480).reshape(10, 48))

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299) and 0 <= x.min() and x.max() <= 255
        return nn.functional.adaptive_avg_pool2d(x / 255, 4).flatten(1)


def test_float_samples_through_legacy_pytorch_inception(digits, tmp_path, monkeypatch):
    tmp, _, experiment, manifest, full = digits
    legacy = inception.WEIGHTS["legacy_pytorch"]
    asked = []

    def load_small(weights, device="cpu", mode="clean"):
        asked.append((weights, mode))
        net = SmallInception()
        net.fid_mode, net.weights_file, net.weights_sha256 = mode, f"/w/{inception.WEIGHTS[mode].name}", \
            inception.WEIGHTS[mode].sha256
        return net

    monkeypatch.setattr(inception, "load_inception", load_small)
    # 30 real images per class as the reference and 8 of them per class as the generated set: every
    # image is resized to 299x299, which takes seconds per thousand.
    rows = np.concatenate([np.flatnonzero(full.labels == c)[:30] for c in range(10)])
    ref = LabeledImages(full.images[rows], full.labels[rows], full.class_names)
    monkeypatch.setattr(cm.evaluate, "load_reference", lambda data: ref)
    keep = np.concatenate([np.flatnonzero(ref.labels == c)[:8] for c in range(10)])
    exp = copy.deepcopy(experiment)
    exp["evaluate"].update(feature_extractor="inception", fid_mode="legacy_pytorch", inception_weights="/w")
    paths = {name: tmp_path / name for name in ("ref.npz", "stats.npz", "gen.npz", "m.json", "f.npz")}
    reference_features(experiment=exp, evaluator=tmp / "net.pt", out=paths["ref.npz"], stats_out=paths["stats.npz"])
    io.save_npz(paths["gen.npz"], images=(ref.images[keep] / 255).astype(np.float32), labels=ref.labels[keep])

    def run(e):
        return evaluate(samples=paths["gen.npz"], evaluator=tmp / "net.pt", reference=paths["ref.npz"],
                        stats=paths["stats.npz"], manifest=manifest, experiment=e, out=paths["m.json"],
                        features_out=paths["f.npz"])

    metrics = run(exp)
    assert asked == [("/w", "legacy_pytorch")] * 2
    recorded = io.read_json(paths["m.json"])
    assert {k: recorded[k] for k in ("feature_extractor", "fid_mode", "inception_weights", "inception_weights_sha256",
                                     "generated_dtype")} == {
        "feature_extractor": "inception", "fid_mode": "legacy_pytorch", "inception_weights": legacy.name,
        "inception_weights_sha256": legacy.sha256, "generated_dtype": "float32"}
    assert np.isfinite(metrics["is"]) and metrics["is"] >= 1
    for name in ("ref.npz", "f.npz"):
        saved = io.load_npz(paths[name])
        assert (str(saved["extractor"]), str(saved["fid_mode"]), str(saved["weights_sha256"])) == (
            f"inception/legacy_pytorch/sha256={legacy.sha256[:16]}", "legacy_pytorch", legacy.sha256)
    stats = ReferenceStats.load(paths["stats.npz"])
    assert stats.extractor == f"inception/legacy_pytorch/sha256={legacy.sha256[:16]}"
    # The generated images are real ones: their features equal the reference's rows.
    np.testing.assert_allclose(io.load_npz(paths["f.npz"])["features"], io.load_npz(paths["ref.npz"])["features"][keep],
                               rtol=1e-5, atol=1e-6)

    # The reference of one mode is refused for the other.
    other = copy.deepcopy(exp)
    other["evaluate"]["fid_mode"] = "clean"
    with pytest.raises(io.CorruptFileError, match=f"features of extractor 'inception/legacy_pytorch/sha256="
                                                  f"{legacy.sha256[:16]}', this experiment needs 'inception/clean/"
                                                  "sha256=f58cb9b6ec323ed6'; run reference_features again"):
        run(other)

    # The report names extractor, mode, weights and dtype, shows the float samples, and refuses a mixture.
    runs = [{"method": "ddpm", "seed": 0, "metrics": recorded}, {"method": "cm", "seed": 0, "metrics": recorded}]
    write_report(experiment="x", runs=runs, samples={"ddpm": paths["gen.npz"]}, manifest=manifest,
                 evaluator={"test_accuracy": 0.5}, out_dir=tmp_path / "report")
    text = (tmp_path / "report" / "summary.md").read_text()
    assert (f"Features: `inception` extractor, fid_mode `legacy_pytorch` (pytorch-fid's TF-ported Inception-v3, "
            f"bilinear resize to 299, as CBDM, OC and CM computed FID; weights `{legacy.name}`, sha256 "
            f"`{legacy.sha256[:16]}...`); generated images fed as float32.") in text
    header = (tmp_path / "report" / "summary.csv").read_text().splitlines()[1]
    assert f"inception,legacy_pytorch,{legacy.name},{legacy.sha256},float32," in header
    grid = (tmp_path / "report" / "grids" / "ddpm.png")
    import matplotlib.image

    assert matplotlib.image.imread(grid)[..., :3].std() > 0.05  # digits drawn, not a blank (truncated) canvas
    clean = {**recorded, "fid_mode": "clean", "inception_weights_sha256": inception.WEIGHTS["clean"].sha256}
    with pytest.raises(DataError, match="metrics of ddpm seed 0 and cm seed 0 come from different feature spaces"):
        summarise([runs[0], {"method": "cm", "seed": 0, "metrics": clean}])
