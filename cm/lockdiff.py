"""Did a `dvc repro` reproduce the committed results? Compare its dvc.lock with the committed one.

On the same kind of machine every output must be the same bytes, so the same hash. Each difference
is one line naming the stage and what differs: a parameter or a dependency (then the run did not
start from the committed inputs, and differing outputs say nothing), or an output.
"""

from __future__ import annotations

from typing import Any


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: one entry per parameter value."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def _hashes(entries: list[dict] | None) -> dict[str, str | None]:
    return {entry["path"]: entry.get("md5") for entry in entries or []}


def _stage_differences(stage: str, committed: dict, current: dict) -> list[str]:
    lines = []
    old_files, new_files = committed.get("params") or {}, current.get("params") or {}
    for file in sorted(old_files.keys() | new_files.keys()):
        old, new = _flat(old_files.get(file) or {}), _flat(new_files.get(file) or {})
        for key in sorted(old.keys() | new.keys()):
            if old.get(key) != new.get(key):
                lines.append(f"stage {stage}: {file} has {key} = {new.get(key)!r}, the committed lock "
                             f"{old.get(key)!r}: restore it (git checkout {file}) to reproduce")
    for kind in ("deps", "outs"):
        old, new = _hashes(committed.get(kind)), _hashes(current.get(kind))
        for path in sorted(old.keys() | new.keys()):
            if old.get(path) != new.get(path):
                what = "dependency" if kind == "deps" else "output"
                lines.append(f"stage {stage}: {what} {path} has md5 {new.get(path)}, the committed lock "
                             f"{old.get(path)}")
    return lines


def lock_differences(committed: dict, current: dict) -> list[str]:
    """One line per difference between two parsed dvc.lock files (empty: reproduced)."""
    old, new = committed.get("stages") or {}, current.get("stages") or {}
    lines = []
    for stage in sorted(old.keys() | new.keys()):
        if stage not in new:
            lines.append(f"stage {stage}: in the committed lock but not run (is it in params.yaml's run, "
                         "methods and seeds?)")
        elif stage not in old:
            lines.append(f"stage {stage}: run but not in the committed lock")
        else:
            lines += _stage_differences(stage, old[stage], new[stage])
    return lines
