"""The model an experiment starts from: its `pretrain` stage (paper section 3.3's setting).

An experiment with a `finetune` section fine-tunes: the stage trains the U-Net with DDPM on
`finetune.pretrain.data` (a balanced source, say), or reads the diffusers model folder of
`finetune.diffusers` (Stable Diffusion, say; cm/finetune/diffusers_models.py), and every method of the
experiment starts from those weights; the `lora` methods keep them frozen and train adapters
(cm/methods/lora.py). Any other experiment trains from scratch, and the stage writes a record saying
so, so that training depends on this stage's output alike in Snakemake and DVC, whichever kind the
experiment is.
"""

from __future__ import annotations

from pathlib import Path

from cm import checkpoint, io


def pretrain(*, experiment: dict, out: Path, checkpoint_root: Path, history_out: Path, device: str = "auto",
             progress: bool = True) -> dict:
    """Train the experiment's starting model with DDPM (or record that there is none); a summary."""
    from cm.data import build_manifest
    from cm.train import train

    finetune = experiment.get("finetune")
    if finetune is None:
        checkpoint.save_from_scratch(out)
        io.write_text(history_out, "step\n")
        return {"pretrained": 0}
    if finetune.get("diffusers"):
        return _from_diffusers_folder(experiment, out, history_out)
    source = finetune["pretrain"]
    manifest = build_manifest(source["data"])
    setting = {**experiment, "data": source["data"], "train": source["train"], "finetune": None}
    summary = train(manifest=manifest, experiment=setting, method_name="ddpm", method_params={},
                    seed=source["seed"], out=out, checkpoint_root=checkpoint_root, history_out=history_out,
                    device=device, progress=progress)
    return {"pretrained": 1, **summary}


def _from_diffusers_folder(experiment: dict, out: Path, history_out: Path) -> dict:
    """The folder's U-Net (and VAE) as this stage's output; the class names of the data fill the prompts."""
    from cm.data.sources import source_class_names, source_summary
    from cm.finetune.diffusers_models import starting_model

    settings = experiment["finetune"]["diffusers"]
    _, (height, _, channels) = source_summary(experiment["data"])
    names = settings["class_names"] or [name.replace("_", " ") for name in source_class_names(experiment["data"])]
    record = starting_model(settings["path"], class_names=names, prompt=settings["prompt"],
                            image_shape=(channels, height))
    files = sorted(p for p in Path(settings["path"]).rglob("*") if p.is_file())
    checkpoint.save_pretrained(out, record, {str(p.relative_to(settings["path"])): io.file_sha256(p) for p in files})
    io.write_text(history_out, "step\n")
    return {"pretrained": 1, "parameters": sum(v.numel() for v in record["ema"].values())}

