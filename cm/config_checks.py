"""Checks of params.yaml that a schema cannot express: cross references, and the files and folders
an experiment that runs reads (its data, a pretrained model, LoRA targets, the Inception weights).

They run wherever the configuration is read (Snakemake's parse, `python -m cm check`, the first
stage under DVC), so a mistake is refused before any job. Imports are local: the Snakefile imports
this module at parse time and most checks need neither torch nor the data code.
"""

from __future__ import annotations

from pathlib import Path

from cm.errors import ConfigError

# What data.path must be, for the sources that need one.
PATH_NEEDED = {
    "npz": "an .npz file with arrays images and labels",
    "imagefolder": "a folder with one sub-folder of images per class",
    "imagenet_lt": "the ImageNet folder that the paths of data.split_list are relative to",
}


def _check_baseline(params: dict) -> None:
    """report.baseline names a model this run evaluates."""
    from cm.method_names import evaluated_methods

    baseline, allowed = params["report"]["baseline"], evaluated_methods(params)
    if baseline is not None and baseline not in allowed:
        raise ConfigError(f"report.baseline = {baseline!r} is not a method this run reports: must be one of "
                          f"{', '.join(allowed)} (methods and theta_g_only), or empty for the first of methods")


def semantic_checks(params: dict, base_dir: Path) -> None:
    """Checks a schema cannot express: cross references and files that must exist."""
    _check_theta_g_only(params)
    _check_baseline(params)
    cm_params = params["method_params"]["cm"]
    if cm_params["passes"] == "shared_encoder" and cm_params["branch_layers"] != "decoder":
        raise ConfigError(f"method_params.cm.passes = 'shared_encoder' is not allowed with branch_layers = "
                          f"{cm_params['branch_layers']!r}: it shares the encoder between h_full and h_g, so "
                          f"branches must be in the decoder only (branch_layers: decoder)")
    if cm_params["passes"] == "shared_encoder":
        _check_shared_encoder_methods(params["methods"])
    known = sorted(params["experiments"])
    for i, name in enumerate(params["run"]):
        if name not in params["experiments"]:
            raise ConfigError(f"run[{i}] = {name!r} is not an experiment; defined: {', '.join(known)}")
    _check_finetuning(params, base_dir)
    for name in params["run"]:
        data = params["experiments"][name]["data"]
        key = f"experiments.{name}.data.path"
        if data["source"] in PATH_NEEDED:
            if not data["path"]:
                raise ConfigError(f"{key} = None is not allowed: source {data['source']} needs a path")
            path = Path(data["path"])
            path = path if path.is_absolute() else base_dir / path
            if not path.exists():
                raise ConfigError(f"{key} = {data['path']!r}: not found; must be {PATH_NEEDED[data['source']]}")
        _check_data_fits(name, params["experiments"][name], base_dir)
        _check_inception_weights(name, params["experiments"][name], base_dir)
        diffusion = params["experiments"][name]["diffusion"]
        if diffusion["beta_start"] >= diffusion["beta_end"]:
            raise ConfigError(
                f"experiments.{name}.diffusion.beta_start = {diffusion['beta_start']!r} is not allowed: "
                f"must be < beta_end ({diffusion['beta_end']!r})"
            )
        gpus, batch = params["resources"]["train"]["gpu"], params["experiments"][name]["train"]["batch_size"]
        if gpus > 1 and batch % gpus:
            raise ConfigError(
                f"experiments.{name}.train.batch_size = {batch} is not allowed with resources.train.gpu = {gpus}: "
                f"must be a multiple of it (each of the {gpus} training processes takes an equal share of a batch)")


def _check_shared_encoder_methods(methods: list[str]) -> None:
    """CM's shared-encoder pass reuses the encoder's activations for theta_g, so the reserved capacity
    must sit in the decoder alone; a fine-tuning's expert adapter sits in the encoder too."""
    from cm.method_names import parse_method

    for i, method in enumerate(methods):
        spec = parse_method(method)
        if spec.lora and spec.variant is not None:
            raise ConfigError(f"methods[{i}] = {method!r} is not allowed with method_params.cm.passes = "
                              "'shared_encoder': its expert adapter sits in the encoder too, which that pass "
                              "shares between h_full and h_g; use passes: two")


def _check_finetuning(params: dict, base_dir: Path) -> None:
    """The lora methods train adapters on a pretrained model: every experiment run needs `finetune`, whose
    starting model exists and fits the data, and whose LoRA targets name layers it has."""
    from cm.method_names import parse_method

    lora = [(i, m) for i, m in enumerate(params["methods"]) if parse_method(m).lora]
    for name in params["run"]:
        experiment = params["experiments"][name]
        finetune = experiment["finetune"]
        if lora and finetune is None:
            i, method = lora[0]
            raise ConfigError(f"methods[{i}] = {method!r} is not allowed with experiment {name!r}: it fine-tunes "
                              f"adapters on a pretrained model, and experiments.{name}.finetune is empty")
        from_folder = bool(finetune and finetune.get("diffusers"))
        if (experiment["model"] == "diffusers") != from_folder:
            raise ConfigError(f"experiments.{name}.model = {experiment['model']!r} is not allowed "
                              + ("with finetune.diffusers: must be diffusers (the folder's U-Net)" if from_folder else
                                 "without finetune.diffusers: diffusers names the U-Net of a diffusers folder"))
        if from_folder:
            _check_diffusers_folder(name, experiment, base_dir)
        elif finetune is not None:
            _check_pretraining_fits(name, experiment, base_dir)
        if lora and finetune is not None:
            _check_lora_targets(name, experiment, base_dir)


def _resolved(path: str, base_dir: Path) -> Path:
    """A path of params.yaml, relative to its folder (where jobs run)."""
    return Path(path) if Path(path).is_absolute() else base_dir / path


def _check_diffusers_folder(name: str, experiment: dict, base_dir: Path) -> None:
    """The folder exists, is a diffusers U-Net (or pipeline) and makes the data's images for its classes."""
    from cm.finetune.folders import check_fits, describe

    key, settings = f"experiments.{name}.finetune.diffusers", experiment["finetune"]["diffusers"]
    available, (height, _, channels) = _summary(experiment["data"], base_dir, f"experiments.{name}.data")
    names = settings["class_names"]
    if names is not None and len(names) != len(available):
        raise ConfigError(f"{key}.class_names has {len(names)} names, not allowed: the data has "
                          f"{len(available)} classes, one name each")
    try:
        check_fits(describe(_resolved(settings["path"], base_dir)), image_shape=(channels, height),
                   num_classes=len(available), prompt=settings["prompt"])
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def _summary(data: dict, base_dir: Path, key: str):
    """(images per class, (H, W, C)) of a data section, its path relative to params.yaml."""
    from cm.data.sources import source_summary
    from cm.errors import DataError

    data = {**data, "path": str(_resolved(data["path"], base_dir)) if data.get("path") else None}
    try:
        return source_summary(data)
    except DataError as err:
        raise ConfigError(f"{key}: {err}") from None


def _check_pretraining_fits(name: str, experiment: dict, base_dir: Path) -> None:
    """The model pretrained on finetune.pretrain.data is the network the experiment's data needs."""
    key = f"experiments.{name}.finetune.pretrain.data"
    source, (height, width, channels) = _summary(experiment["finetune"]["pretrain"]["data"], base_dir, key)
    target, shape = _summary(experiment["data"], base_dir, f"experiments.{name}.data")
    if (height, width, channels) != tuple(shape) or len(source) != len(target):
        raise ConfigError(f"{key} is not allowed: its {len(source)} classes of {channels}-channel {height}x{width} "
                          f"images make a model that cannot fine-tune on experiments.{name}.data ({len(target)} "
                          f"classes of {shape[2]}-channel {shape[0]}x{shape[1]}): the same classes and image shape")


def _check_lora_targets(name: str, experiment: dict, base_dir: Path) -> None:
    """Every finetune.lora.target_modules entry names layers of the experiment's network (built on the
    meta device: no memory, no weights)."""
    import torch

    lora = experiment["finetune"]["lora"]
    targets = tuple(lora["target_modules"] or ())  # none: the family's defaults that the network has
    try:
        from cm.finetune.adapters import LoraSettings, rank_limit
    except ImportError as err:
        raise ConfigError(f"experiment {name!r} fine-tunes with LoRA: it needs the finetune extra, "
                          f"pip install -e '.[finetune]' ({err})") from None
    with torch.device("meta"):
        net = _network_for_check(experiment, base_dir)
    try:
        limit, layer = rank_limit(net, LoraSettings(target_modules=targets or None))
    except ValueError as err:
        raise ConfigError(f"experiments.{name}.finetune.lora.target_modules: {err}") from None
    if lora["rank"] > limit:
        raise ConfigError(f"experiments.{name}.finetune.lora.rank = {lora['rank']} is not allowed: must be at most "
                          f"{limit}, the largest rank the targeted layer {layer!r} can use (min of its output and "
                          "input sizes)")


def _network_for_check(experiment: dict, base_dir: Path):
    from cm.finetune.folders import describe

    finetune = experiment["finetune"]
    if experiment["model"] == "diffusers":
        from cm.finetune.diffusers_models import UNET_CLASSES

        spec = describe(_resolved(finetune["diffusers"]["path"], base_dir))
        return UNET_CLASSES[spec.unet_class].from_config(spec.unet)
    from cm.models import build_unet

    available, (height, _, channels) = _summary(finetune["pretrain"]["data"], base_dir, "finetune.pretrain.data")
    return build_unet(experiment["model"], num_classes=len(available), in_channels=channels, image_size=height)


def _check_theta_g_only(params: dict) -> None:
    """A theta_g-only model reuses the checkpoint of a trained method that has branches to drop."""
    from cm.method_names import parse_method

    for i, name in enumerate(params["theta_g_only"]):
        if name not in params["methods"]:
            raise ConfigError(f"theta_g_only[{i}] = {name!r} is not allowed: must be one of methods "
                              f"({', '.join(params['methods'])}), whose checkpoint it reuses")
        if parse_method(name).variant is None:
            raise ConfigError(f"theta_g_only[{i}] = {name!r} is not allowed: it has no low-rank branches to drop; "
                              f"use a CM variant (cm, cm+cbdm, lowrank_only, ...)")


def _check_inception_weights(name: str, experiment: dict, base_dir: Path) -> None:
    """An experiment evaluated with Inception-v3 needs its FID mode's published weights file, found
    and its sha256 checked here rather than by the reference_features stage after training."""
    evaluate = experiment["evaluate"]
    if evaluate["feature_extractor"] != "inception":
        return
    from cm.io import CorruptFileError
    from cm.metrics.inception import check_weights, resolve_weights

    given = evaluate["inception_weights"]
    try:
        check_weights(resolve_weights(_resolved(given, base_dir) if given else None, evaluate["fid_mode"]),
                      evaluate["fid_mode"])
    except (FileNotFoundError, CorruptFileError) as err:
        raise ConfigError(f"experiments.{name}.evaluate.inception_weights = {given!r}: {err}") from None


def _check_data_fits(name: str, experiment: dict, base_dir: Path) -> None:
    """The profile leaves every class an image; the generated set fits in memory."""
    import numpy as np
    import psutil

    from cm.data.profiles import profile_counts
    from cm.data.sources import source_summary
    from cm.errors import DataError

    data = dict(experiment["data"])
    for key in ("path", "split_list", "reference_list"):  # relative to the params file, as jobs run there
        if data.get(key) and not Path(data[key]).is_absolute():
            data[key] = str(base_dir / data[key])
    try:
        available, shape = source_summary(data)
    except DataError as err:
        raise ConfigError(f"experiments.{name}.data: {err}") from None
    try:
        profile_counts(data, available)
    except ValueError as err:
        raise ConfigError(f"experiments.{name}.{err}") from None
    per_class = experiment["sample"]["per_class"]
    image_bytes = int(np.prod(shape))
    # The sample stage holds the batches and their concatenation: about twice the set in memory.
    budget = psutil.virtual_memory().total // 2
    needed = 2 * per_class * len(available) * image_bytes
    if needed > budget:
        raise ConfigError(
            f"experiments.{name}.sample.per_class = {per_class} needs {needed / 2**30:.1f} GiB for the "
            f"generated images, more than half of this machine's memory; must be <= "
            f"{budget // (2 * len(available) * image_bytes)}")
