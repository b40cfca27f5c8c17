"""DVC hashes outputs: a result recomputed from the same inputs must be the same bytes."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from cm import io


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_npz_is_byte_identical_whenever_and_wherever_written(tmp_path, monkeypatch):
    arrays = {"images": np.arange(300, dtype=np.uint8).reshape(3, 10, 10), "labels": np.array([2, 0, 1])}
    io.save_npz(tmp_path / "a.npz", **arrays)
    # np.savez would stamp the current time into the archive: move the clock two days on.
    later = time.time() + 2 * 86400
    monkeypatch.setattr("time.time", lambda: later)
    io.save_npz(tmp_path / "other" / "b.npz", **arrays)
    assert digest(tmp_path / "a.npz") == digest(tmp_path / "other" / "b.npz")
    loaded = io.load_npz(tmp_path / "a.npz")
    assert list(loaded) == ["images", "labels"]
    assert all(np.array_equal(loaded[k], arrays[k]) and loaded[k].dtype == arrays[k].dtype for k in arrays)
    np.savez_compressed(tmp_path / "numpy.npz", **arrays)  # the same format numpy writes
    assert all(np.array_equal(np.load(tmp_path / "numpy.npz")[k], loaded[k]) for k in arrays)


def test_torch_files_are_byte_identical_under_any_name(tmp_path):
    state = {"format": "cm.model/1", "config": {"ch": 8}, "state_dict": {"w": torch.randn(4, 3)}}
    io.save_torch(tmp_path / "model.pt", state)
    io.save_torch(tmp_path / "elsewhere" / "weights.pt", state)
    assert digest(tmp_path / "model.pt") == digest(tmp_path / "elsewhere" / "weights.pt")
    loaded = io.load_torch(tmp_path / "model.pt")
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"]) and loaded["config"] == {"ch": 8}
