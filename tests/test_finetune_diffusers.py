"""Fine-tuning a diffusers model folder through the pipeline (paper section 3.3, Stable Diffusion's
setting in miniature): a pipeline folder with a text-conditioned U-Net, a CLIP text encoder and
tokenizer and a VAE, on the digits. The pretrain stage turns the folder into the pipeline's starting
model (U-Net weights, prompt embeddings, VAE); lora and lora+cm train adapters on the VAE's latents;
merging gives the folder's plain U-Net; samples are decoded images. Bad folders, templates and target
names stop Snakemake in one line before any job."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
import yaml

from cm import checkpoint, io
from cm.config import ConfigError, check_params
from tests.conftest import run

pytest.importorskip("peft")
pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

from cm.finetune.diffusers_models import prompt_embeddings  # noqa: E402
from tests.tiny_diffusers import pretend_pretrained, save_pipeline, tiny_cond_unet, tiny_vae  # noqa: E402

pytestmark = pytest.mark.e2e

EXP, FOLDER = "results/digits_sd", "pretrained/tiny_sd"
TEMPLATE = "a painting of the digit {class}"
WORDS = ("a", "painting", "of", "the", "digit", *map(str, range(10)))


def sd_experiment(params: dict) -> dict:
    """digits_ft_lt's data and budgets with the tiny pipeline folder as the starting model."""
    exp = copy.deepcopy(params["experiments"]["digits_ft_lt"])
    exp.update(model="diffusers", finetune={"diffusers": {"path": FOLDER, "prompt": TEMPLATE},
                                            "lora": {"rank": 2}})
    exp["data"]["shift"] = None
    exp["diffusion"]["timesteps"] = 100
    exp["train"].update(steps=12, checkpoint_every=6, log_every=6, warmup_steps=3, batch_size=32)
    exp["sample"].update(per_class=4, steps=4, batch_size=40)
    exp["evaluate"].setdefault("feature_net", {}).update(steps=30)
    exp["evaluate"].update(kid_subsets=5)
    exp["probe"].update(draws=1, dominance_batches=2, batch_size=32)
    return exp


@pytest.fixture(scope="module")
def sd_project(shared_project):
    save_pipeline(shared_project / FOLDER, WORDS, unet=pretend_pretrained(tiny_cond_unet(sample_size=4)),
                  vae=tiny_vae(image_channels=1))
    params = yaml.safe_load((shared_project / "params.yaml").read_text())
    params["experiments"]["digits_sd"] = sd_experiment(params)
    params["tracking"]["enabled"] = False
    (shared_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return shared_project


@pytest.fixture(scope="module")
def finetuned(sd_project):
    targets = [f"{EXP}/samples/{m}/seed0/samples.npz" for m in ("lora", "lora+cm", "lora+cm_gonly")]
    run(["snakemake", "--cores", "2", *targets, f"{EXP}/probe/lora+cm/seed0.json", "--config", "run=[digits_sd]",
         "methods=[lora,lora+cm]", "theta_g_only=[lora+cm]"], sd_project, timeout=900)
    return sd_project


def test_the_pretrain_stage_holds_the_folders_unet_prompts_and_vae(finetuned):
    record = io.load_torch(finetuned / EXP / "pretrain/model.pt")
    folder = finetuned / FOLDER
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    weights = {k.removeprefix("unet."): v for k, v in record["ema"].items() if k.startswith("unet.")}
    assert weights.keys() == unet.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in unet.state_dict().items())
    from transformers import CLIPTextModel, CLIPTokenizer

    expected = prompt_embeddings(CLIPTextModel.from_pretrained(folder / "text_encoder"),
                                 CLIPTokenizer.from_pretrained(folder / "tokenizer"), [str(c) for c in range(10)],
                                 TEMPLATE)
    torch.testing.assert_close(record["ema"]["prompt_embeds"], expected)
    assert record["config"]["in_channels"] == 4 and record["config"]["image_size"] == 4  # the latents' shape
    vae = tiny_vae(image_channels=1).state_dict()
    assert all(torch.equal(record["codec"]["state_dict"][k], v) for k, v in vae.items())


def test_adapters_train_on_frozen_weights_and_merge_into_the_folders_unet(finetuned, monkeypatch):
    pretrained = io.load_torch(finetuned / EXP / "pretrain/model.pt")["ema"]
    monkeypatch.chdir(finetuned)  # the reference to the pretrained weights is relative to the project
    for method in ("lora", "lora+cm"):
        final = io.load_torch(finetuned / EXP / f"train/{method}/seed0/model.pt")
        assert all("lora_" in k for k in final["ema"]) and "codec" not in final  # the VAE: in the pretrained file
        trained = checkpoint.load_model(f"{EXP}/train/{method}/seed0/model.pt")
        assert all(torch.equal(trained["codec"]["state_dict"][k], v)
                   for k, v in io.load_torch(finetuned / EXP / "pretrain/model.pt")["codec"]["state_dict"].items())
        base = {k.replace(".base_layer", ""): v for k, v in trained["ema"].items() if "lora_" not in k}
        assert base.keys() == pretrained.keys() and all(torch.equal(base[k], pretrained[k]) for k in base)
        resumable = io.load_torch(sorted((finetuned / EXP / f"train/{method}/seed0/checkpoints").rglob("*.pt"))[-1])
        assert resumable["model"] and all("lora_" in k for k in resumable["model"])  # adapters only
        merged = io.load_torch(finetuned / EXP / f"merged/{method}/seed0/model.pt")
        plain = UNet2DConditionModel.from_pretrained(finetuned / FOLDER / "unet")
        missing, unexpected = plain.load_state_dict(
            {k.removeprefix("unet."): v for k, v in merged["state_dict"].items() if k.startswith("unet.")})
        assert not missing and not unexpected  # the folder's architecture, no adapter keys
        changed = [k for k in pretrained if not torch.equal(merged["state_dict"][k], pretrained[k])]
        assert changed and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight",
                                           "conv1.weight", "conv2.weight")) for k in changed), changed
    full = io.load_torch(finetuned / EXP / "merged/lora+cm/seed0/model.pt")["state_dict"]
    gonly = io.load_torch(finetuned / EXP / "merged/lora+cm_gonly/seed0/model.pt")["state_dict"]
    assert any(not torch.equal(full[k], gonly[k]) for k in full)  # theta_g drops the expert adapter
    assert io.read_json(finetuned / EXP / "probe/lora+cm/seed0.json")["theta_g"] is not None


def test_a_merged_model_exports_as_the_folders_unet(finetuned, tmp_path):
    merged = finetuned / EXP / "merged/lora+cm/seed0/model.pt"
    run(["python", "-m", "cm", "export-diffusers", str(merged), "--out", str(tmp_path / "unet")], finetuned)
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert exported.config.sample_size == 4 and not any("lora" in k for k in exported.state_dict())
    weights = io.load_torch(merged)["state_dict"]
    assert all(torch.equal(v, weights[f"unet.{k}"]) for k, v in exported.state_dict().items())
    again = run(["python", "-m", "cm", "export-diffusers", str(merged), "--out", str(tmp_path / "unet")], finetuned,
                check=False)
    assert again.returncode == 2 and "exists: nothing is overwritten" in again.stderr
    plain = run(["python", "-m", "cm", "export-diffusers", str(finetuned / EXP / "pretrain/model.pt"), "--out",
                 str(tmp_path / "x")], finetuned, check=False)
    assert plain.returncode == 2 and "cm.merged/1" in plain.stderr and not (tmp_path / "x").exists()


def test_samples_are_decoded_images_of_every_class(finetuned):
    for method in ("lora", "lora+cm", "lora+cm_gonly"):
        samples = io.load_npz(finetuned / EXP / f"samples/{method}/seed0/samples.npz", required=("images", "labels"))
        assert samples["images"].shape == (40, 8, 8, 1) and samples["images"].dtype == np.uint8  # not 4x4x4 latents
        assert np.array_equal(np.bincount(samples["labels"]), [4] * 10)
        assert samples["images"].std() > 0


BAD_STARTS = [
    (lambda exp, root: exp["finetune"]["diffusers"].update(path="pretrained/missing"), ["does not exist"]),
    (lambda exp, root: (root / "pretrained/empty").mkdir(exist_ok=True)
     or exp["finetune"]["diffusers"].update(path="pretrained/empty"), ["not a diffusers model", "config.json"]),
    (lambda exp, root: exp["finetune"]["diffusers"].update(prompt="a painting"), ["'a painting'", "{class}"]),
    (lambda exp, root: exp["data"].update(source="npz", path="pretrained/rgb.npz"),
     ["3-channel 8x8", "1-channel 8x8", "through its VAE"]),
    (lambda exp, root: exp["finetune"]["lora"].update(target_modules=["to_q", "attn9"]),
     ["'attn9'", "matches no layer", "to_q", "conv1"]),
    (lambda exp, root: exp["finetune"]["diffusers"].update(class_names=["zero"]), ["1 names", "10 classes"]),
    (lambda exp, root: exp.update(model="small"), ["model = 'small'", "must be diffusers"]),
]


def bad_project(sd_project, root, change):
    """A copy of the project whose digits_sd experiment `change` spoils; its params, checked and not."""
    shutil.copytree(sd_project, root, ignore=shutil.ignore_patterns("results", ".snakemake", "logs", ".git", ".dvc"))
    np.savez(root / "pretrained/rgb.npz", images=np.zeros((20, 8, 8, 3), np.uint8), labels=np.arange(20) % 10)
    params = yaml.safe_load((root / "params.yaml").read_text())
    change(params["experiments"]["digits_sd"], root)
    params.update(run=["digits_sd"], methods=["lora", "lora+cm"])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


@pytest.mark.parametrize("change, words", BAD_STARTS)
def test_a_bad_start_is_one_line(sd_project, tmp_path, change, words):
    params = bad_project(sd_project, tmp_path / "project", change)
    with pytest.raises(ConfigError) as caught:
        check_params(params, base_dir=tmp_path / "project")
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_snakemake_stops_at_a_bad_start_before_any_job(sd_project, tmp_path):
    root = tmp_path / "project"
    bad_project(sd_project, root, lambda exp, _: exp["finetune"]["diffusers"].update(path="pretrained/missing"))
    result = run(["snakemake", "-n", "--cores", "1"], root, check=False)
    said = [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("params.yaml: ")]
    assert result.returncode != 0 and len(said) == 1 and "pretrained/missing does not exist" in said[0], result.stdout
    assert not (root / "results").exists()


ARTBENCH_STYLES = ("art_nouveau", "baroque", "expressionism", "impressionism", "post_impressionism", "realism",
                   "renaissance", "romanticism", "surrealism", "ukiyo_e")


def stand_in_artbench(root, per_class: int = 100) -> None:
    """ArtBench-10's ImageFolder layout with smooth 256 px images (PNG compresses them to a few KB);
    100 per style, the fewest with which ratio 100 leaves every class an image (the profile's head count
    is the smallest class's)."""
    from PIL import Image

    gen = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 256)[None, :, None]
    for style in ARTBENCH_STYLES:
        (root / style).mkdir(parents=True)
        for i in range(per_class):
            colour = gen.uniform(0, 255, size=(1, 1, 3))
            Image.fromarray((colour * ramp + (255 - colour) * (1 - ramp)).repeat(256, 0).astype(np.uint8)).save(
                root / style / f"{i:04d}.png")


def test_the_papers_stable_diffusion_entry_runs_on_stand_in_folders(sd_project, tmp_path):
    """sd15_artbench_ir100 as written (scaled_linear schedule, prompt template, attention-only LoRA, 256 px,
    bf16, flips), with a tiny pipeline of the SD layout and a stand-in for ArtBench-10 in its folders and
    a few steps: the checks pass, and lora+cm trains, merges and samples 256 px images."""
    root = tmp_path / "project"
    shutil.copytree(sd_project, root, ignore=shutil.ignore_patterns("results", ".snakemake", "logs", ".dvc"))
    words = ("a", "painting", "in", "the", "style", "of", *" ".join(ARTBENCH_STYLES).replace("_", " ").split())
    save_pipeline(root / "pretrained/stable-diffusion-v1-5", words,
                  unet=pretend_pretrained(tiny_cond_unet(sample_size=32)), vae=tiny_vae(image_channels=3, blocks=4))
    stand_in_artbench(root / "data/artbench10/train")
    params = yaml.safe_load((root / "params.yaml").read_text())
    exp = params["experiments"]["sd15_artbench_ir100"]
    exp["train"].update(steps=2, batch_size=4, checkpoint_every=2, log_every=1, warmup_steps=1)
    exp["sample"].update(per_class=1, steps=2, batch_size=10)
    # Inception-v3's weights cannot be had offline (the check refuses the entry without them), and
    # evaluation is not what this test runs.
    exp["evaluate"]["feature_extractor"] = "local"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = "results/sd15_artbench_ir100/samples/lora+cm/seed0/samples.npz"
    run(["snakemake", "--cores", "2", out, "--config", "run=[sd15_artbench_ir100]", "methods=[lora+cm]"], root,
        timeout=900)
    samples = io.load_npz(root / out, required=("images", "labels"))
    assert samples["images"].shape == (10, 256, 256, 3) and np.array_equal(samples["labels"], np.arange(10))
    record = io.load_torch(root / "results/sd15_artbench_ir100/pretrain/model.pt")
    assert record["config"]["image_size"] == 32 and record["config"]["in_channels"] == 4  # SD's latents
    trained = io.load_torch(root / "results/sd15_artbench_ir100/train/lora+cm/seed0/model.pt")
    adapted = {k.split(".lora_")[0] for k in trained["ema"] if ".lora_" in k}
    assert len(adapted) * 4 == len(trained["ema"])  # A and B of two adapters each: nothing else
    assert adapted and all(k.endswith(("to_q", "to_k", "to_v", "to_out.0")) for k in adapted)
