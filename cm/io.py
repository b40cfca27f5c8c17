"""Atomic file output and safe, checked file input.

Every stage writes through `atomic_path`: the file appears under its final name only once it is
complete, so a killed job never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import secrets
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cm.errors import CorruptFileError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file_beside(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # on disk before it gets its final name
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _new_file_beside(path: Path) -> Path:
    """Create an empty file with a fresh hidden name beside `path`, with mode 0666 less the umask:
    the mode a plain open() gives. (mkstemp's 0600 would survive the rename onto `path`.)"""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | Path) -> Any:
    path = Path(path)
    _require(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not valid JSON ({err})") from None


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts of strings."""
    path = Path(path)
    _require(path)
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except (csv.Error, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not a readable CSV file ({err})") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# np.savez stamps each member with the current time, so the same arrays would give other bytes;
# DVC hashes outputs, and a recomputed result must hash the same.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """A compressed .npz (as np.savez_compressed, no pickles), byte-identical for identical arrays."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for key, value in arrays.items():
            member = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)


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

    # Through a handle: given a path, torch.save names the archive's root folder after the
    # (temporary, random) file name, so the same weights would give other bytes.
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        torch.save(obj, fh)


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
