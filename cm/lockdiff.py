"""Did a `dvc repro` reproduce the committed results? Compare its dvc.lock with the committed one.

On the kind of machine the lock was made on (`machine_kind`) every output must be the same bytes,
so the same hash; on another CPU the floats may round differently, and only the inputs must agree.
Each difference is one line naming the stage and what differs: a parameter or a dependency (then
the run did not start from the committed inputs), a stage, or an output.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, NamedTuple


class Difference(NamedTuple):
    kind: str  # "output", or "input" (a parameter, a dependency, a stage run or not run)
    text: str


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


def _stage_differences(stage: str, committed: dict, current: dict) -> list[Difference]:
    lines = []
    old_files, new_files = committed.get("params") or {}, current.get("params") or {}
    for file in sorted(old_files.keys() | new_files.keys()):
        old, new = _flat(old_files.get(file) or {}), _flat(new_files.get(file) or {})
        for key in sorted(old.keys() | new.keys()):
            if old.get(key) != new.get(key):
                text = (f"stage {stage}: {file} has {key} = {new.get(key)!r}, the committed lock "
                        f"{old.get(key)!r}: restore it (git checkout {file}) to reproduce")
                lines.append(Difference("input", text))
    for kind in ("deps", "outs"):
        old, new = _hashes(committed.get(kind)), _hashes(current.get(kind))
        for path in sorted(old.keys() | new.keys()):
            if old.get(path) != new.get(path):
                what = "dependency" if kind == "deps" else "output"
                lines.append(Difference("input" if kind == "deps" else "output", f"stage {stage}: {what} {path} "
                                        f"has md5 {new.get(path)}, the committed lock {old.get(path)}"))
    return lines


def lock_differences(committed: dict, current: dict) -> list[Difference]:
    """Every difference between two parsed dvc.lock files (empty: reproduced)."""
    old, new = committed.get("stages") or {}, current.get("stages") or {}
    lines = []
    for stage in sorted(old.keys() | new.keys()):
        if stage not in new:
            lines.append(Difference("input", f"stage {stage}: in the committed lock but not run (is it in "
                                    "params.yaml's run, methods and seeds?)"))
        elif stage not in old:
            lines.append(Difference("input", f"stage {stage}: run but not in the committed lock"))
        else:
            lines += _stage_differences(stage, old[stage], new[stage])
    return lines
