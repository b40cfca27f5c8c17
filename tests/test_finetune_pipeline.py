"""Fine-tuning through the pipeline (paper section 3.3): the pretrain stage's model is where every
lora method starts; its weights stay as they were (only adapters train and are checkpointed), the
merged model has the pretrained layout, and lora+cm's theta_g model drops the expert adapter.
(Sampling, evaluation and the report take merged models, whatever trained them: tests/test_pipeline.py.)"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from cm import checkpoint, io
from tests.conftest import run

pytest.importorskip("peft")
pytestmark = pytest.mark.e2e

EXP = "results/digits_ft_lt"


@pytest.fixture(scope="module")
def finetuned(shared_project):
    params = yaml.safe_load((shared_project / "params.yaml").read_text())
    exp = params["experiments"]["digits_ft_lt"]
    exp["model"] = "tiny"
    exp["diffusion"]["timesteps"] = 100
    exp["finetune"]["pretrain"].setdefault("train", {}).update(steps=20, checkpoint_every=10, log_every=10,
                                                               warmup_steps=5)
    exp["train"].update(steps=20, checkpoint_every=10, log_every=10, warmup_steps=5, batch_size=32)
    exp["sample"].update(per_class=6, steps=5, batch_size=60)
    exp["evaluate"].setdefault("feature_net", {}).update(steps=30)
    exp["evaluate"].update(kid_subsets=5)
    params["tracking"]["enabled"] = False
    (shared_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    targets = [f"{EXP}/{stage}/{model}/seed0{ext}" for stage, ext in (("merged", "/model.pt"), ("probe", ".json"))
               for model in ("lora", "lora+cm")] + [f"{EXP}/merged/lora+cm_gonly/seed0/model.pt"]
    run(["snakemake", "--cores", "2", *targets, "--config", "run=[digits_ft_lt]", "methods=[lora,lora+cm]",
         "theta_g_only=[lora+cm]"], shared_project, timeout=900)
    return shared_project


def test_adapters_train_on_the_pretrained_weights_which_stay_as_they_were(finetuned, monkeypatch):
    pretrained = io.load_torch(finetuned / EXP / "pretrain/model.pt")["ema"]
    monkeypatch.chdir(finetuned)  # the reference to the pretrained weights is relative to the project
    for method in ("lora", "lora+cm"):
        final = io.load_torch(finetuned / EXP / f"train/{method}/seed0/model.pt")
        # The final checkpoint holds the adapters and a reference to the frozen weights, not a copy.
        assert final["ema"] and all("lora_" in k for k in final["ema"])
        assert set(final["state_dict"]) == set(final["ema"])
        assert final["pretrained"] == {"path": f"{EXP}/pretrain/model.pt",
                                       "sha256": io.file_sha256(finetuned / EXP / "pretrain/model.pt")}
        trained = checkpoint.load_model(f"{EXP}/train/{method}/seed0/model.pt")  # adapters + pretrained weights
        assert {k: v for k, v in trained["ema"].items() if "lora_" in k}.keys() == final["ema"].keys()
        base = {k.replace(".base_layer", ""): v for k, v in trained["ema"].items() if "lora_" not in k}
        assert base.keys() == pretrained.keys()
        assert all(torch.equal(base[k], pretrained[k]) for k in base), method  # W_f untouched
        adapters = {k for k in trained["ema"] if "lora_" in k}
        assert {k.split(".")[-2] for k in adapters} == ({"general"} if method == "lora" else {"general", "expert"})
        resumable = io.load_torch(sorted((finetuned / EXP / f"train/{method}/seed0/checkpoints").rglob("*.pt"))[-1])
        assert set(resumable["model"]) == adapters  # only what trains is checkpointed
        merged = io.load_torch(finetuned / EXP / f"merged/{method}/seed0/model.pt")["state_dict"]
        assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in pretrained.items()}
        changed = [k for k in merged if not torch.equal(merged[k], pretrained[k])]
        assert changed and all(k.endswith(("conv1.weight", "conv2.weight", "q.weight", "k.weight", "v.weight",
                                           "proj.weight")) for k in changed), changed


def test_the_theta_g_model_drops_the_expert_adapter_and_is_probed(finetuned):
    pretrained = io.load_torch(finetuned / EXP / "pretrain/model.pt")["ema"]
    full = io.load_torch(finetuned / EXP / "merged/lora+cm/seed0/model.pt")["state_dict"]
    gonly = io.load_torch(finetuned / EXP / "merged/lora+cm_gonly/seed0/model.pt")["state_dict"]
    differ = [k for k in full if not torch.equal(full[k], gonly[k])]
    assert differ and all(not torch.equal(gonly[k], pretrained[k]) for k in differ)  # general kept, expert gone
    probe = io.read_json(finetuned / EXP / "probe/lora+cm/seed0.json")
    assert probe["theta_g"] is not None and io.read_json(finetuned / EXP / "probe/lora/seed0.json")["theta_g"] is None


def test_train_base_trains_the_pretrained_weights_too_and_lora_settings_key_the_checkpoints(tmp_path):
    """finetune.lora.train_base: false freezes W_f (checkpoints: adapters only); true trains W_f with the
    adapters (checkpoints: everything). The LoRA settings are part of the checkpoint folder's key, so a run
    of another rank or train_base never resumes these checkpoints."""
    from cm import config as cfg
    from cm.data import build_manifest
    from cm.pretrain import pretrain
    from cm.train import train
    from tests.conftest import ROOT

    params = cfg.load_params(ROOT / "params.yaml")
    exp = copy.deepcopy(params["experiments"]["digits_ft_lt"])
    exp["model"] = "tiny"
    exp["finetune"]["pretrain"]["train"].update(steps=3, checkpoint_every=3, log_every=3, warmup_steps=1)
    exp["train"].update(steps=3, checkpoint_every=3, log_every=3, warmup_steps=1, batch_size=16)
    pretrain(experiment=exp, out=tmp_path / "pre.pt", checkpoint_root=tmp_path / "pre", history_out=tmp_path / "h.csv",
             device="cpu", progress=False)
    pretrained = io.load_torch(tmp_path / "pre.pt")["ema"]
    manifest = build_manifest(exp["data"])
    folders = {}
    for train_base in (False, True):
        exp["finetune"]["lora"]["train_base"] = train_base
        out = tmp_path / f"{train_base}.pt"
        train(manifest=manifest, experiment=exp, method_name="lora", method_params=params["method_params"], seed=0,
              out=out, checkpoint_root=tmp_path / "ck", history_out=tmp_path / f"{train_base}.csv", device="cpu",
              progress=False, pretrained=tmp_path / "pre.pt")
        trained = io.load_torch(out)
        base = {k.replace(".base_layer", ""): v for k, v in trained["state_dict"].items() if "lora_" not in k}
        changed = {k for k in base if not torch.equal(base[k], pretrained[k])}
        checkpoint = io.load_torch(next((tmp_path / "ck" / trained["fingerprint"]).glob("*.pt")))
        if train_base:
            assert changed and set(checkpoint["model"]) == set(trained["state_dict"])
        else:
            assert not changed and all("lora_" in k for k in checkpoint["model"])
        folders[train_base] = trained["fingerprint"]
    assert folders[False] != folders[True]


def test_a_pretraining_or_lora_target_that_cannot_fit_is_one_line_when_params_are_read(tmp_path):
    import numpy as np

    from cm.config import ConfigError, check_params
    from tests.conftest import ROOT

    np.savez(tmp_path / "rgb.npz", images=np.zeros((20, 8, 8, 3), np.uint8), labels=np.arange(20) % 10)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(run=["digits_ft_lt"], methods=["lora", "lora+cm"])
    exp = params["experiments"]["digits_ft_lt"]
    for change, words in [
        (lambda: exp["finetune"]["pretrain"]["data"].update(source="npz", path=str(tmp_path / "rgb.npz")),
         ["finetune.pretrain.data is not allowed", "3-channel 8x8", "1-channel 8x8"]),
        (lambda: exp["finetune"]["lora"].update(target_modules=["q", "conv9"]),
         ["target_modules", "'conv9' matches no layer", "conv1, conv2"]),
    ]:
        saved = copy.deepcopy(exp)
        change()
        with pytest.raises(ConfigError) as caught:
            check_params(params, base_dir=ROOT)
        assert "\n" not in str(caught.value) and all(w in str(caught.value) for w in words), str(caught.value)
        exp.clear()
        exp.update(saved)


def test_a_fine_tuning_whose_pretrained_weights_are_gone_or_changed_is_refused_in_one_line(finetuned, tmp_path,
                                                                                        monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)  # a copy of the two files, at the paths the checkpoint names
    model = Path(f"{EXP}/train/lora/seed0/model.pt")
    (tmp_path / model).parent.mkdir(parents=True)
    shutil.copy(finetuned / model, tmp_path / model)
    with pytest.raises(io.CorruptFileError, match=rf"^{model}: its pretrained weights {EXP}/pretrain/model.pt "
                                                   r"are missing; the experiment's pretrain stage writes them"):
        checkpoint.load_model(model)
    pretrain = tmp_path / EXP / "pretrain/model.pt"
    pretrain.parent.mkdir(parents=True)
    shutil.copy(finetuned / EXP / "pretrain/model.pt", pretrain)
    assert checkpoint.load_model(model)["ema"]  # the same file: complete
    state = io.load_torch(pretrain)
    state["ema"] = {k: v + 1 for k, v in state["ema"].items()}
    io.save_torch(pretrain, state)
    with pytest.raises(io.CorruptFileError, match=r"are not the file it was trained from .*; train it again$"):
        checkpoint.load_model(model)
