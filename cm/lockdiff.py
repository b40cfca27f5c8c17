"""Did a `dvc repro` reproduce the committed results? Compare its dvc.lock with the committed one.

A lock entry is an input or derived. Inputs are the parameters and the dependencies no stage of the
lock produces (code, data): they must agree everywhere, or the run did not start from the committed
state. Derived entries are the outputs, and the dependencies that are another stage's output: on the
kind of machine the lock was made on (`machine_kind`) they must be the same bytes, so the same hash;
on another CPU floats round differently and training amplifies the last bits, so they are reported,
and what can still be checked is the default's metrics, against values committed beside the lock
with a tolerance from the seed spread (`metric_differences`).
"""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any, NamedTuple

# The metrics checked on another CPU: the distances and the k-NN precision / recall. (The
# classifier accuracies are counts of a few hundred samples and may sit at 1.0 for every seed.)
CHECKED_METRICS = ("fid", "kid", "fid_many", "fid_medium", "fid_few", "precision", "recall")
# Tolerance = TOLERANCE_SDS x sqrt(2) x the pooled seed standard deviation: the reproduction and the
# committed run are two draws whose difference has standard deviation sqrt(2) s when the CPU acts
# like another seed; 4 of those leave a false alarm about once in 16,000 per metric for a normal
# spread, while a broken pipeline (FID tens of times the spread) still fails.
TOLERANCE_SDS = 4.0


class Difference(NamedTuple):
    kind: str  # "input" (a parameter, a dependency no stage produces, a stage run or not run) or "derived"
    text: str


class Comparison(NamedTuple):
    differences: list[Difference]
    inputs: int  # input entries compared (parameter values and dependencies no stage produces)
    derived: int  # derived entries compared (outputs and the dependencies on them)


def machine_kind() -> str:
    """What decides the bits of a CPU result besides the inputs: architecture, CPU model, the SIMD
    level torch's kernels dispatch to, and torch's version."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    return f"{platform.machine()}, {model}, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: one entry per parameter value."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def _hashes(entries: list[dict] | None) -> dict[str, str | None]:
    return {entry["path"]: entry.get("md5") for entry in entries or []}


def _outputs(lock: dict) -> set[str]:
    return {path for stage in (lock.get("stages") or {}).values() for path in _hashes(stage.get("outs"))}


def _is_derived(path: str, outputs: set[str]) -> bool:
    """An output itself, a file inside an output folder, or a folder holding outputs (the report
    stage depends on results/<experiment>/metrics, which the evaluate stages fill)."""
    return path in outputs or any(path.startswith(out + "/") or out.startswith(path + "/") for out in outputs)


def _stage_comparison(stage: str, committed: dict, current: dict, outputs: set[str]) -> Comparison:
    lines, inputs, derived = [], 0, 0
    old_files, new_files = committed.get("params") or {}, current.get("params") or {}
    for file in sorted(old_files.keys() | new_files.keys()):
        old, new = _flat(old_files.get(file) or {}), _flat(new_files.get(file) or {})
        for key in sorted(old.keys() | new.keys()):
            inputs += 1
            if old.get(key) != new.get(key):
                text = (f"stage {stage}: {file} has {key} = {new.get(key)!r}, the committed lock "
                        f"{old.get(key)!r}: restore it (git checkout {file}) to reproduce")
                lines.append(Difference("input", text))
    for kind in ("deps", "outs"):
        old, new = _hashes(committed.get(kind)), _hashes(current.get(kind))
        for path in sorted(old.keys() | new.keys()):
            is_input = kind == "deps" and not _is_derived(path, outputs)
            inputs, derived = inputs + is_input, derived + (not is_input)
            if old.get(path) != new.get(path):
                what = ("output" if kind == "outs" else "dependency" if is_input
                        else "dependency (another stage's output)")
                lines.append(Difference("input" if is_input else "derived", f"stage {stage}: {what} {path} "
                                        f"has md5 {new.get(path)}, the committed lock {old.get(path)}"))
    return Comparison(lines, inputs, derived)


def compare_locks(committed: dict, current: dict) -> Comparison:
    """Every difference between two parsed dvc.lock files (none: reproduced), and how many input
    and derived entries were compared."""
    old, new = committed.get("stages") or {}, current.get("stages") or {}
    outputs = _outputs(committed) | _outputs(current)
    lines, inputs, derived = [], 0, 0
    for stage in sorted(old.keys() | new.keys()):
        if stage not in new:
            lines.append(Difference("input", f"stage {stage}: in the committed lock but not run (is it in "
                                    "params.yaml's run, methods and seeds?)"))
        elif stage not in old:
            lines.append(Difference("input", f"stage {stage}: run but not in the committed lock"))
        else:
            stage_lines, stage_inputs, stage_derived = _stage_comparison(stage, old[stage], new[stage], outputs)
            lines, inputs, derived = lines + stage_lines, inputs + stage_inputs, derived + stage_derived
    return Comparison(lines, inputs, derived)


def lock_differences(committed: dict, current: dict) -> list[Difference]:
    """Every difference between two parsed dvc.lock files (empty: reproduced)."""
    return compare_locks(committed, current).differences


def expected_metrics(values: dict, spread: dict, *, source: str, made_on: str) -> dict:
    """The metrics a reproduction of the default must reach on any CPU: `values` is the committed
    run's report metrics.json ({method: {metric: value}}), `spread` the metrics.json of the same
    experiment run with several seeds ({method: {metric_std, seeds}}). A metric's tolerance is
    TOLERANCE_SDS x sqrt(2) x its seed standard deviation pooled over the methods."""
    tolerances = {}
    for metric in CHECKED_METRICS:
        variances = [(row["seeds"] - 1, row[f"{metric}_std"] ** 2) for row in spread.values() if row["seeds"] > 1]
        if not variances:
            raise ValueError(f"the spread run has one seed per method: no {metric}_std to derive a tolerance from")
        pooled = math.sqrt(sum(dof * var for dof, var in variances) / sum(dof for dof, _ in variances))
        tolerances[metric] = TOLERANCE_SDS * math.sqrt(2) * pooled
    seeds = sorted({row["seeds"] for row in spread.values()})
    return {
        "source": source, "made_on": made_on,
        "tolerance": (f"{TOLERANCE_SDS:g} x sqrt(2) x the seed standard deviation pooled over "
                      f"{', '.join(spread)} ({'/'.join(map(str, seeds))} seeds each)"),
        "metrics": {method: {metric: {"value": row[metric], "tolerance": tolerances[metric]}
                             for metric in CHECKED_METRICS} for method, row in values.items()},
    }


def metric_differences(expected: dict, reproduced: dict) -> list[str]:
    """One line per metric of `expected` ({"metrics": {method: {metric: {value, tolerance}}}}) that the
    reproduced report metrics.json misses or holds outside value +- tolerance."""
    lines = []
    for method, metrics in expected["metrics"].items():
        for metric, want in metrics.items():
            got = (reproduced.get(method) or {}).get(metric)
            if not isinstance(got, (int, float)) or isinstance(got, bool):
                lines.append(f"metrics: {method} {metric} is missing from the reproduced {expected['source']}")
            elif not abs(got - want["value"]) <= want["tolerance"]:
                lines.append(f"metrics: {method} {metric} = {got:.4g}, outside the committed {want['value']:.4g} "
                             f"+- {want['tolerance']:.3g} ({expected['tolerance']})")
    return lines
