"""Atomic file output and safe, checked file input.

Every stage writes through `atomic_path`: the file appears under its final name only once it is
complete, so a killed job never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cm.errors import CorruptFileError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # on disk before it gets its final name
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    _require(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not valid JSON ({err})") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("wb") as fh:
            np.savez_compressed(fh, **arrays)


def load_npz(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Load every array of an .npz file (no pickle), checking that `required` ones are there."""
    path = Path(path)
    _require(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as err:  # zipfile, OSError, ValueError: all mean the same to the user
        raise CorruptFileError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
    missing = [key for key in required if key not in arrays]
    if missing:
        raise CorruptFileError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}")
    return arrays


def save_torch(path: str | Path, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path) -> Any:
    """Load a checkpoint with weights_only=True: tensors and plain containers, never code."""
    import torch

    path = Path(path)
    _require(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a bad pickle, a refused global: name the file
        raise CorruptFileError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


def _require(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
