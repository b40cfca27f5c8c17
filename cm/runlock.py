"""One pipeline run per project folder.

Snakemake's own locks are checked only after the DAG is built, so a second run started beside a
live one may instead stop on "incomplete files" and suggest `--rerun-incomplete`, which would be
wrong advice while the first run is writing them. An OS file lock, taken when the Snakefile is
parsed by the main process, refuses the second run at once; the kernel drops it when the
process ends, so it never goes stale.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

_held = []  # keeps the lock's file open for the life of the process


class FolderBusyError(RuntimeError):
    """Another pipeline run holds this folder."""


def claim(folder: str | Path = ".snakemake") -> None:
    """Take the folder's run lock for this process, or raise FolderBusyError naming the holder."""
    path = Path(folder) / "cm-run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise FolderBusyError(
            f"another Snakemake run (pid {holder}) is working in {Path.cwd()}; wait for it to finish "
            "(two runs would write the same outputs)") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    _held.append(fh)


def stale_snakemake_lock(folder: str | Path = ".snakemake") -> str | None:
    """Snakemake's own lock left by a killed run, as a one-line way on; None when there is none.

    Called after `claim` succeeded, so no other run is alive in this folder and the lock files
    (which Snakemake removes when a run ends in any other way) are a killed run's.
    """
    locks = Path(folder) / "locks"
    if not any(locks.glob("*.lock")):
        return None
    return (f"a killed run left Snakemake's lock in {locks}; no other run is alive in this folder (its run lock "
            "was free), so clearing it is safe: run `snakemake --unlock`, then the same command again")
