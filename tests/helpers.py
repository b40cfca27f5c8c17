"""Helpers shared by several test modules: pipeline products, kill-and-resume tools, toy batches,
the configuration-mistake catalogue. Test modules import from here (or conftest), never from each other."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import torch
import yaml
from torch import nn

from cm import io
from tests.conftest import VENV_BIN, run


def set_budget(project, **train):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["experiments"]["digits_lt"]["train"].update(train)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def wait_for(predicate, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start(cmd, cwd):
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "CM_PROGRESS": "0",
           "DVC_NO_ANALYTICS": "1"}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "CM_PIPELINE_ID"):
        env.pop(var, None)
    # A suite started in the background of a shell inherits SIGINT ignored; a terminal's job does not.
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in folder.rglob("step_*.pt"))


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = io.load_torch(a), io.load_torch(b)
    return all(torch.equal(sa[part][k], sb[part][k]) for part in ("state_dict", "ema") for k in sa[part])


def batch(n=6, classes=4):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.arange(n) % classes


def randomize(model, seed=0):
    """Undo the 1e-5 residual/tail init so conditioning has a visible effect."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias, std=0.1)
    return model


# Published per-class counts (docs/experiments.md; Cao et al. 2019).
CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


EXP = "results/digits_lt"  # the default experiment's results in a project copy


def outputs(project) -> dict[str, str]:
    """{path: sha256} of every file the stages wrote (not their resume folders)."""
    files = [p for p in (project / EXP).rglob("*") if p.is_file()
             and not {"checkpoints", "partial"} & set(p.relative_to(project).parts)]
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def numbers(project) -> dict:
    """The metrics (parsed JSON) and sample arrays of every run of a finished pipeline."""
    found = {str(p.relative_to(project / EXP)): json.loads(p.read_text())
             for p in sorted((project / EXP / "metrics").rglob("seed*.json"))}
    for path in sorted((project / EXP / "samples").rglob("samples.npz")):
        found.update({f"{path.relative_to(project / EXP)} {key}": value for key, value in io.load_npz(path).items()})
    return found


def assert_same_numbers(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), f"{what}: {key}"
        else:
            assert a[key] == b[key], f"{what}: {key}"  # exact float equality, metric by metric


def check_products(project):
    """The report, grids, merged weights and samples an orchestrator must have produced."""
    exp = project / "results" / "digits_lt"
    rows = list(csv.DictReader((exp / "report" / "summary.csv").open()))
    assert [row["method"] for row in rows] == ["ddpm", "cm"]
    for row in rows:
        for col in ("fid", "kid", "fid_many", "fid_medium", "fid_few", "acc_few", "precision", "recall",
                    "fid_floor", "fid_few_floor"):
            assert math.isfinite(float(row[col])), col
        assert row["feature_extractor"] == "local"
    manifest = io.read_json(exp / "data" / "manifest.json")
    for method in ("ddpm", "cm"):
        grid = matplotlib.image.imread(exp / "report" / "grids" / f"{method}.png")
        assert grid.ndim == 3 and grid.shape[0] > 100
        samples = io.load_npz(exp / "samples" / method / "seed0" / "samples.npz")
        assert np.bincount(samples["labels"]).tolist() == [12] * manifest["num_classes"]  # balanced
        assert samples["images"].dtype == np.uint8 and samples["images"].shape[1:] == (8, 8, 1)
    merged = {m: io.load_torch(exp / "merged" / m / "seed0" / "model.pt")["state_dict"] for m in ("ddpm", "cm")}
    assert {k: v.shape for k, v in merged["cm"].items()} == {k: v.shape for k, v in merged["ddpm"].items()}
    trained = io.load_torch(exp / "train" / "cm" / "seed0" / "model.pt")["ema"]
    assert any(k.endswith(".A") for k in trained) and not any(k.endswith(".A") for k in merged["cm"])
    probes = {m: io.read_json(exp / "probe" / m / "seed0.json") for m in ("ddpm", "cm")}
    assert probes["ddpm"]["theta_g"] is None and len(probes["cm"]["theta_g"]["relative_change"]) == 10
    assert probes["cm"]["pruning"]["prune"]["zeroed"] == round(0.1 * probes["cm"]["pruning"]["prune"]["considered"])
    assert matplotlib.image.imread(exp / "report" / "probe.png").shape[0] > 100
    assert "## Capacity probes" in (exp / "report" / "summary.md").read_text()
    assert matplotlib.image.imread(exp / "report" / "training_curves.png").shape[0] > 100
    curves = list(csv.DictReader((exp / "report" / "training_loss.csv").open()))
    history = list(csv.DictReader((exp / "history" / "cm" / "seed0.csv").open()))
    assert len(curves) == 2 * len(history) * manifest["num_classes"]  # (method, logged step, class)


def dvc_is_clean(project):
    return "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout


# The catalogue of malformed configurations: (edit, key, value, what is allowed) per case.
MISTAKES = [
    (lambda r: r["experiments"]["digits_lt"]["train"].update(stepz=5),
     "experiments.digits_lt.train.stepz", "did you mean 'steps'", "allowed here: adam, batch_size"),
    (lambda r: r.update(method=["cm"]), "'method'", "did you mean 'methods'", "allowed here"),
    (lambda r: r["experiments"]["digits_lt"]["train"].update(precision="fp16"),
     "experiments.digits_lt.train.precision", "'fp16'", "one of fp32, tf32, bf16"),
    (lambda r: r["experiments"]["digits_lt"]["train"].update(lr_decay="linear"),
     "experiments.digits_lt.train.lr_decay", "'linear'", "one of none, cosine"),
    (lambda r: (r["resources"]["train"].update(gpu=2), r["experiments"]["digits_lt"]["train"].update(batch_size=33)),
     "experiments.digits_lt.train.batch_size = 33", "resources.train.gpu = 2", "multiple of it"),
    (lambda r: r["experiments"]["digits_lt"]["train"].update(steps="many"),
     "experiments.digits_lt.train.steps", "'many'", "type integer"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(imbalance_ratio=0.5),
     "experiments.digits_lt.data.imbalance_ratio", "0.5", ">= 1"),
    (lambda r: r["method_params"]["cm"].update(rank_ratio=0.0),
     "method_params.cm.rank_ratio", "0.0", "> 0 and <= 1"),
    (lambda r: r["method_params"]["cm"].update(rank_ratio=1.5),
     "method_params.cm.rank_ratio", "1.5", "> 0 and <= 1"),
    (lambda r: r.update(methods=["ddpm", "cbdn"]), "methods[1]", "'cbdn'", "one of ddpm, cbdm, oc, cm"),
    (lambda r: r.update(methods=["cm+cm"]), "methods[0]", "'cm+cm'", "one of ddpm, cbdm, oc, cm"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(source="mnist"),
     "experiments.digits_lt.data.source", "'mnist'", "one of digits, npz"),
    (lambda r: r.update(run=["digits"]), "run[0]", "'digits'",
     "is not an experiment; defined: capacity_ch16, capacity_ch32"),
    (lambda r: r.update(seeds=[]), "seeds", "[]", "at least 1"),
    (lambda r: r.update(methods=["cm", "cm"]), "methods", "['cm', 'cm']", "without repeated items"),
    (lambda r: r["experiments"]["digits_lt"].update(model="huge"),
     "experiments.digits_lt.model", "'huge'", "one of ddpm_cifar"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(source="npz", path="missing.npz"),
     "experiments.digits_lt.data.path", "'missing.npz'", "not found"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(source="npz", path=None),
     "experiments.digits_lt.data.path", "None", "source npz needs a path"),
    (lambda r: r.update(methods=[]), "methods", "[]", "at least 1"),
    (lambda r: r.update(run=[]), "run", "[]", "at least 1"),
    (lambda r: r.update(seeds=[-1]), "seeds[0]", "-1", ">= 0"),
    (lambda r: r.update(seeds="0"), "seeds", "'0'", "type array"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(hflip="no"),
     "experiments.digits_lt.data.hflip", "'no'", "type boolean"),
    (lambda r: r["experiments"]["digits_lt"]["train"].update(label_drop=1.5),
     "experiments.digits_lt.train.label_drop", "1.5", "<= 1"),
    (lambda r: r["experiments"]["digits_lt"]["train"].update(ema_decay=1.0),
     "experiments.digits_lt.train.ema_decay", "1.0", "< 1"),
    (lambda r: r["experiments"]["digits_lt"]["train"].update(lr=0),
     "experiments.digits_lt.train.lr", "0", "> 0"),
    (lambda r: r["experiments"]["digits_lt"]["sample"].update(sampler="euler"),
     "experiments.digits_lt.sample.sampler", "'euler'", "one of ddim, ddpm"),
    (lambda r: r["experiments"]["digits_lt"]["sample"].update(guidance=-1),
     "experiments.digits_lt.sample.guidance", "-1", ">= 0"),
    (lambda r: r["experiments"]["digits_lt"]["evaluate"].update(feature_extractor="clip"),
     "experiments.digits_lt.evaluate.feature_extractor", "'clip'", "one of local, inception"),
    (lambda r: r.update(device="tpu"), "device", "'tpu'", "one of auto, cpu, cuda"),
    (lambda r: r["tracking"].update(enabled="yes"), "tracking.enabled", "'yes'", "type boolean"),
    (lambda r: r["experiments"].update({"digits-lt": r["experiments"]["digits_lt"]}),
     "experiments", "'digits-lt'", "letters, digits and _"),
    (lambda r: r["method_params"]["cm"].update(**{"lambda": -1}), "method_params.cm.lambda", "-1", ">= 0"),
    (lambda r: r["method_params"]["cm"].update(passes="one"), "method_params.cm.passes", "'one'",
     "one of two, shared_encoder"),
    (lambda r: r["method_params"]["cm"].update(branch_layers="encoder"), "method_params.cm.branch_layers",
     "'encoder'", "one of decoder, all"),
    (lambda r: r["method_params"]["cm"].update(branch_scale=0), "method_params.cm.branch_scale", "0", "> 0"),
    (lambda r: r["method_params"]["cm"].update(passes="shared_encoder", branch_layers="all"),
     "method_params.cm.passes", "'shared_encoder'", "branch_layers: decoder"),
    (lambda r: r.update(theta_g_only=["ddpm"]), "theta_g_only[0]", "'ddpm'", "no low-rank branches to drop"),
    (lambda r: r["method_params"]["cbdm"].update(label_prior="flat"),
     "method_params.cbdm.label_prior", "'flat'", "one of frequency, uniform"),
    (lambda r: r["experiments"]["digits_lt"]["diffusion"].update(beta_start=0.05),
     "experiments.digits_lt.diffusion.beta_start", "0.05", "must be < beta_end"),
    (lambda r: r["experiments"]["digits_lt"]["data"].update(imbalance_ratio=500),
     "experiments.digits_lt.data.imbalance_ratio", "500", "without an image: must be <= 174"),
    (lambda r: r["experiments"]["digits_lt"]["sample"].update(per_class=10**10),
     "experiments.digits_lt.sample.per_class", "10000000000", "more than half of this machine's memory"),
    (lambda r: r["experiments"]["digits_lt"].pop("data"), "experiments.digits_lt", "'data'", "required"),
    (lambda r: r["experiments"]["digits_lt"]["evaluate"].update(feature_extractor="inception",
                                                               inception_weights="missing.pt"),
     "experiments.digits_lt.evaluate.inception_weights", "'missing.pt'", "missing.pt does not exist"),
    (lambda r: r["experiments"]["digits_lt"]["evaluate"].update(feature_extractor="inception",
                                                               inception_weights="params.yaml"),
     "experiments.digits_lt.evaluate.inception_weights", "'params.yaml'",
     "not clean-fid's TorchScript Inception for evaluate.fid_mode clean"),
    (lambda r: r["report"].update(baseline="cbdm"), "report.baseline", "'cbdm'",
     "must be one of ddpm, cm (methods and theta_g_only)"),
    (lambda r: r["experiments"]["digits_lt"]["evaluate"].update(bootstrap=50),
     "experiments.digits_lt.evaluate.bootstrap", "50", ">= 100"),
    (lambda r: r["report"].update(resolve=0), "report.resolve", "0", "> 0"),
]


# Duplicated keys, as (text to replace, replacement, the key named in the error).
DUPLICATES = [
    ("method_params:", "seeds: [1]\nmethod_params:", "seeds"),
    ("experiments:\n", "experiments:\n  digits_lt: {data: {source: digits}, model: tiny}\n", "digits_lt"),
]


def stand_in_inception_weights(monkeypatch, folder: Path) -> Path:
    """A file that the configuration check takes for the published Inception weights of both FID
    modes (their sha256 is set to its own): the real files are not available offline."""
    import dataclasses

    import cm.metrics.inception as inception

    path = folder / "inception-stand-in.pt"
    path.write_bytes(os.urandom(1024))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(inception, "WEIGHTS", {mode: dataclasses.replace(w, sha256=digest)
                                               for mode, w in inception.WEIGHTS.items()})
    return path
