"""Load and validate params.yaml: one schema, defaults filled in, one clear message per mistake.

The same `load_params` / `check_params` serve the Snakefile (before any job is scheduled) and
every `python -m cm` stage, so Snakemake, DVC and the package read the configuration alike.
This module must stay light (no torch): the Snakefile imports it at parse time.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cm.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = PROJECT_ROOT / "workflow" / "schemas" / "params.schema.yaml"
PARAMS_FILE = "params.yaml"
# What data.path must be, for the sources that need one.
PATH_NEEDED = {
    "npz": "an .npz file with arrays images and labels",
    "imagefolder": "a folder with one sub-folder of images per class",
    "imagenet_lt": "the ImageNet folder that the paths of data.split_list are relative to",
}



class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicated mapping keys (plain YAML keeps the last one silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"duplicated key {key!r} (line {key_node.start_mark.line + 1}); "
                "each key may appear once per mapping"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely (no code execution, no duplicate keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        with path.open() as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_error(path, err)) from None


def _yaml_error(path: Path, err: yaml.YAMLError) -> str:
    """One line: the file, the line and column where parsing stopped, and what was wrong there."""
    mark = getattr(err, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    return f"{path}{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")


def schema() -> dict:
    """The JSON schema of params.yaml."""
    return load_yaml(SCHEMA_PATH)


def _with_defaults(validator_class):
    """Extend a jsonschema validator so that validation also fills in declared defaults."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if "default" in prop and name not in instance:
                    instance[name] = copy.deepcopy(prop["default"])
        yield from validate_properties(validator, properties, instance, subschema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _strict_integers(validator_class):
    """JSON Schema counts 240.0 as an integer; training cannot count steps with it. Here an integer is
    an int, so an integral float meets a type error, which `_coerce_numbers` turns into the int."""
    checker = validator_class.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(validator_class, type_checker=checker)


_DefaultingValidator = _with_defaults(_strict_integers(jsonschema.Draft202012Validator))


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _allowed(error: jsonschema.ValidationError) -> str:
    """Say in words what the failed schema keyword allows."""
    s = error.schema
    kind = error.validator
    if kind == "enum":
        return "one of " + ", ".join(map(str, s["enum"]))
    if kind == "type":
        return f"type {s['type']}"
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bounds = []
        for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"),
                          ("maximum", "<="), ("exclusiveMaximum", "<")):
            if key in s:
                bounds.append(f"{sign} {s[key]}")
        return "a number " + " and ".join(bounds)
    if kind == "multipleOf":
        return f"a multiple of {s['multipleOf']}"
    if kind == "minItems":
        return f"a list of at least {s['minItems']} item(s)"
    if kind == "uniqueItems":
        return "a list without repeated items"
    if kind == "minProperties":
        return f"at least {s['minProperties']} entry"
    if kind == "pattern":
        return f"a name of letters, digits and _ starting with a letter ({s['pattern']})"
    if kind == "minLength":
        return "a non-empty string"
    if kind == "oneOf":  # each alternative in words: "one of a, b or a mapping with preset and ch"
        return " or ".join(_alternative(alt) for alt in s["oneOf"])
    return error.message


def _resolve(subschema: dict) -> dict:
    return schema()["$defs"][subschema["$ref"].rsplit("/", 1)[1]] if "$ref" in subschema else subschema


def _exclusive_keys(subschema: dict) -> list[str]:
    """The keys of a mapping that must hold exactly one of them (a oneOf of single `required` keys,
    as finetune's pretrain / diffusers), else []."""
    alternatives = _resolve(subschema).get("oneOf") or []
    keys = [alt.get("required") for alt in alternatives]
    return [k[0] for k in keys] if alternatives and all(k and len(k) == 1 for k in keys) else []


def _alternative(subschema: dict) -> str:
    """One `oneOf` alternative in words (a $ref'd enum, a constant, or a mapping with its required keys)."""
    subschema = _resolve(subschema)
    if "enum" in subschema:
        return "one of " + ", ".join(map(str, subschema["enum"]))
    if "const" in subschema:
        return str(subschema["const"])
    if subschema.get("type") == "null":
        return "empty"
    exclusive = _exclusive_keys(subschema)
    if exclusive:
        return "a mapping with one of " + ", ".join(exclusive)
    return "a mapping with " + " and ".join(subschema["required"])


def _format(error: jsonschema.ValidationError) -> str:
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        prefix = "" if where == "(top level)" else where + "."
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hints.append(f"'{prefix}{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        return f"unknown key {', '.join(hints)}; allowed here: {', '.join(allowed)}"
    if error.validator == "required":
        return f"{where}: {error.message}"
    if error.validator in ("oneOf", "not") and isinstance(error.instance, dict):
        for alternative in (error.schema, *(error.schema.get("oneOf") or ())):
            given = [key for key in _exclusive_keys(alternative) if key in error.instance]
            if len(given) > 1:
                return f"{where}: give {' or '.join(given)}, not both"
    if error.validator == "propertyNames":
        return f"{where}: experiment name {error.instance!r} is not allowed: use letters, digits and _"
    return f"{where} = {error.instance!r} is not allowed: must be {_allowed(error)}"


# Scientific notation that YAML 1.1 (PyYAML, Snakemake, DVC) reads as a string: 1e-4, 2E5.
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number_for(expected: str | list, value: Any) -> int | float | None:
    """The number a value stands for where the schema expects `expected`, when it is written in a
    form the schema's type rejects: an integral float for an integer (240.0, which training could not
    use as a count), or a number YAML 1.1 reads as a string (1e-4: no dot before the exponent)."""
    kinds = {expected} if isinstance(expected, str) else set(expected)
    if "integer" in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    if kinds & {"number", "integer"} and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        number = float(value)
        if "number" in kinds and math.isfinite(number):
            return number
        if number.is_integer():
            return int(number)
    return None


def _coerce_numbers(validator, params: dict) -> None:
    """Rewrite, in place, every value whose only fault is the written form of a number (see
    `_number_for`), for every integer and number key of the schema: one rule, before validation, so
    no stage ever sees 240.0 or '1e-4'."""
    def type_errors(errors):
        for error in errors:
            if error.validator == "type":
                yield error
            yield from type_errors(error.context or ())

    while True:
        fixes = [(list(e.absolute_path), number) for e in type_errors(validator.iter_errors(params))
                 if e.absolute_path and (number := _number_for(e.validator_value, e.instance)) is not None]
        if not fixes:
            return
        for path, number in fixes:
            parent = params
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = number


def _semantic_checks(params: dict, base_dir: Path) -> None:
    """Checks a schema cannot express: cross references and files that must exist."""
    _check_theta_g_only(params)
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


def check_params(params: Any, *, base_dir: str | Path = ".", origin: str = PARAMS_FILE) -> dict:
    """Validate a parsed params mapping, fill in defaults, and return it (a new dict).

    Raises ConfigError with one message naming the key, the value and what is allowed.
    """
    if not isinstance(params, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(params).__name__}")
    params = copy.deepcopy(params)
    validator = _DefaultingValidator(schema())
    _coerce_numbers(validator, params)
    error = jsonschema.exceptions.best_match(validator.iter_errors(params))
    if error is not None:
        raise ConfigError(f"{origin}: {_format(error)}")
    try:
        _semantic_checks(params, Path(base_dir))
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None
    return params


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    """Read, validate and complete params.yaml."""
    path = Path(path)
    return check_params(load_yaml(path), base_dir=path.parent, origin=str(path))


def experiment(params: dict, name: str) -> dict:
    """The settings of one experiment, with a clear error for an unknown name."""
    if name not in params["experiments"]:
        known = ", ".join(sorted(params["experiments"]))
        raise ConfigError(f"experiment {name!r} is not defined in params.yaml; defined: {known}")
    return params["experiments"][name]


def check_method(name: str, *, trained: bool = True) -> None:
    """A method name must be one the method registry knows; stages after training also accept the
    theta_g-only models (`<method>_gonly`)."""
    from cm.method_names import MERGE_ONLY, parse_method

    if trained or name not in MERGE_ONLY:
        try:
            parse_method(name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
