"""Files the stages write get the permissions the umask gives, as with a plain open()."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from cm import io
from tests.conftest import run

WRITERS = {
    "json": lambda p: io.write_json(p, {"a": 1}),
    "text": lambda p: io.write_text(p, "a\n"),
    "npz": lambda p: io.save_npz(p, a=np.arange(3)),
    "torch": lambda p: io.save_torch(p, {"a": torch.zeros(2)}),
}


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):  # what any other program would create
            pass
        for name, write in WRITERS.items():
            write(tmp_path / name)  # created
            assert mode(tmp_path / name) == expected == mode(tmp_path / "plain"), name
            os.chmod(tmp_path / name, 0o600)
            write(tmp_path / name)  # replaced: the new file's mode, not the old one's
            assert mode(tmp_path / name) == expected, name
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*WRITERS, "plain"])  # no temporary left


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    with pytest.raises(RuntimeError), io.atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_a_stage_run_under_umask_022_writes_0644(project):
    run("umask 022 && python -m cm prepare-data --experiment digits_lt --out results/digits_lt/data/manifest.json",
        project)
    assert mode(project / "results/digits_lt/data/manifest.json") == 0o644
