"""Load and validate params.yaml: one schema, experiments completed from `defaults`, one clear
message per mistake.

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


def _strict_integers(validator_class):
    """JSON Schema counts 240.0 as an integer; training cannot count steps with it. Here an integer is
    an int, so an integral float meets a type error, which `_coerce_numbers` turns into the int."""
    checker = validator_class.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(validator_class, type_checker=checker)


_Validator = _strict_integers(jsonschema.Draft202012Validator)

# An experiment's blocks: those merged into `defaults` key by key, and those that are its own.
MERGED_BLOCKS = ("data", "diffusion", "probe", "train", "sample", "evaluate")
BLOCKS = ("data", "model", "finetune", "diffusion", "probe", "train", "sample", "evaluate")


def _merged(base: Any, changes: Any) -> Any:
    """`base` with the values of `changes` in place of its own, mappings merged key by key (a copy)."""
    if not isinstance(base, dict) or not isinstance(changes, dict):
        return copy.deepcopy(changes)
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = _merged(base[key], value) if key in base else copy.deepcopy(value)
    return out


def _resolved_finetune(defaults: dict, finetune: Any) -> Any:
    """A fine-tuning's settings completed from defaults.finetune; its pretraining's data and train
    blocks are the defaults' with the values it states. Empty stays empty (trained from scratch)."""
    if not isinstance(finetune, dict):
        return copy.deepcopy(finetune)
    fills = defaults["finetune"]
    out = {}
    for key, value in {**finetune, "lora": finetune.get("lora") or {}}.items():
        if key == "pretrain" and isinstance(value, dict):
            value = {"data": _merged(defaults["data"], value.get("data") or {}),
                     "train": _merged(defaults["train"], value.get("train") or {}),
                     **{k: v for k, v in value.items() if k not in ("data", "train")}}
        out[key] = _merged(fills[key], value) if key in fills and isinstance(value, dict) else value
    return out


def resolve_experiments(params: dict) -> None:
    """Replace, in place, every experiment's differences by its complete settings (`defaults` with
    the experiment's values). Every block must be named, if only as `{}`: DVC tracks each by name."""
    defaults, experiments = params.get("defaults"), params.get("experiments")
    if not isinstance(defaults, dict) or not isinstance(experiments, dict):
        return  # the schema names what is missing
    for name, experiment in experiments.items():
        if not isinstance(experiment, dict):
            continue
        missing = [block for block in BLOCKS if block not in experiment]
        if missing:
            raise ConfigError(f"experiments.{name}: {missing[0]!r} is a required property (every experiment names "
                              "each block; {} keeps the defaults, and DVC tracks each block by its key)")
        experiments[name] = {
            key: _merged(defaults[key], value or {}) if key in MERGED_BLOCKS and isinstance(defaults.get(key), dict)
            else _resolved_finetune(defaults, value) if key == "finetune" else copy.deepcopy(value)
            for key, value in experiment.items()}


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


def check_params(params: Any, *, base_dir: str | Path = ".", origin: str = PARAMS_FILE) -> dict:
    """Validate a parsed params mapping, complete each experiment from `defaults`, and return it (a new
    dict; `defaults` stays in it, as DVC reads it).

    Raises ConfigError with one message naming the key, the value and what is allowed.
    """
    from cm.config_checks import semantic_checks

    if not isinstance(params, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(params).__name__}")
    params = copy.deepcopy(params)
    full = schema()
    validator = _Validator(full)
    # `defaults` alone first, so that a mistake there is named where it is, not in every experiment.
    defaults_only = _Validator({"type": "object", "required": ["defaults"], "$defs": full["$defs"],
                                "properties": {"defaults": {"$ref": "#/$defs/defaults"}}})
    try:
        for check in (defaults_only, validator):
            _coerce_numbers(validator, params)
            error = jsonschema.exceptions.best_match(check.iter_errors(params))
            if error is not None:
                raise ConfigError(_format(error))
            if check is defaults_only:
                resolve_experiments(params)
        semantic_checks(params, Path(base_dir))
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


def shown(params: dict, name: str) -> str:
    """An experiment's complete settings as YAML, in the order params.yaml writes them: what its
    stages get once `defaults` fills in what it does not state."""
    return yaml.safe_dump({name: experiment(params, name)}, sort_keys=False, default_flow_style=False, width=100)


def check_method(name: str, *, trained: bool = True) -> None:
    """A method name must be one the method registry knows; stages after training also accept the
    theta_g-only models (`<method>_gonly`)."""
    from cm.method_names import MERGE_ONLY, parse_method

    if trained or name not in MERGE_ONLY:
        try:
            parse_method(name)
        except ValueError as err:
            raise ConfigError(str(err)) from None
