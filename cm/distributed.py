"""Data-parallel training under torchrun: the process group, which rows of a batch are this rank's,
and draws that do not depend on the number of processes.

Every rank holds the whole data set and walks the same global batch order; rank r of N computes
rows [r B/N, (r+1) B/N) of each global batch of B. Random draws are made for the whole global batch
on every rank (same seed, same stream) and sliced, so the noise, timesteps and labels a sample gets
do not depend on N, and N processes take the steps one process takes, up to the order of float sums.
Dropout masks are the exception: the network draws them for its own rows (see README).

Without torchrun (no WORLD_SIZE in the environment) everything here is the identity: one process,
all rows, the draws of a plain run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from cm.errors import ConfigError


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank; before `init`, the one torchrun gave it (0 outside torchrun)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes outputs, checkpoints and the MLflow run (rank 0)."""
    return rank() == 0


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init(device: str) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) and return this rank's device;
    outside torchrun, the device itself."""
    dev = torch.device(device)
    if not under_torchrun() or dist.is_initialized():
        return dev
    if dev.type == "cuda":
        local, visible = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= visible:  # else set_device fails with "invalid device ordinal"
            raise ConfigError(f"torchrun started local rank {local}, but {visible} GPU(s) are visible"
                              f"{_visible_devices()}: --nproc_per_node must be at most {visible}")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_rows(global_size: int) -> slice:
    """This rank's rows of a global batch; ValueError when the batch does not split evenly."""
    n = world_size()
    if global_size % n:
        raise ValueError(f"train.batch_size = {global_size} is not allowed with {n} processes: it must be a "
                         f"multiple of the process count, so that every rank takes an equal share")
    share = global_size // n
    return slice(rank() * share, (rank() + 1) * share)


def draw(fn: Callable[[int], torch.Tensor], local_size: int) -> torch.Tensor:
    """fn(global size)'s rows of this rank: a draw for the whole global batch, sliced. With one
    process it is fn(local_size) itself (same numbers, same stream consumed)."""
    n = world_size()
    return fn(local_size) if n == 1 else fn(local_size * n)[rank() * local_size:(rank() + 1) * local_size]


def gather(x: torch.Tensor) -> torch.Tensor:
    """The rows of every rank, in rank order (identity with one process); no gradient."""
    n = world_size()
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (identity with one process)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def _visible_devices() -> str:
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if mask is None else f" (CUDA_VISIBLE_DEVICES={mask!r})"


def check_visible_gpus(processes: int, device: str = "auto") -> None:
    """ConfigError in one line when `processes` training processes are to run on CUDA (device cuda,
    or auto with CUDA available) and fewer GPUs are visible; on the CPU they are gloo processes."""
    if processes <= 1 or device not in ("auto", "cuda") or (device == "auto" and not torch.cuda.is_available()):
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if processes > visible:
        raise ConfigError(f"resources.train.gpu = {processes} is not allowed here: {visible} GPU(s) are visible"
                          f"{_visible_devices()}; set it to at most {max(visible, 1)}, or run where {processes} "
                          f"GPUs are visible")


def relaunch_under_torchrun(processes: int, device: str = "auto") -> None:
    """Replace this process by torchrun running the same command in `processes` processes on this
    node (`--standalone`: a free local rendezvous); returns only when already under torchrun.
    Asking for more GPU processes than GPUs visible stops here, before torchrun starts."""
    if processes <= 1 or under_torchrun():
        return
    check_visible_gpus(processes, device)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "cm", *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
