"""What the GPU benchmark runs on, printed before anything else: Python, torch and the CUDA it was
built for, the driver (nvidia-smi) and whether CUDA is usable, with the reason when it is not.

    python3 benchmarks/gpu_env.py [--smoke]     (benchmarks/gpu.sh runs it first)

Standard library and torch only, so that it prints even where the project's other imports would
fail (a package the machine lacks); exit 2 when CUDA is not usable and --smoke is not given.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import subprocess
import sys
import warnings

import torch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _run(command: list[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return 1, f"{type(err).__name__}: {err}"
    return done.returncode, (done.stdout + done.stderr).strip()


def driver() -> str:
    """The NVIDIA driver's version, the CUDA version it supports and the GPUs, from nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi not found (no NVIDIA driver installed, or not on PATH)"
    code, out = _run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if code:
        return f"nvidia-smi failed (exit {code}): {out.splitlines()[0] if out else 'no output'}"
    gpus = [line.split(", ") for line in out.splitlines() if line.strip()]
    _, banner = _run([exe])
    supports = re.search(r"CUDA Version:\s*([0-9.]+)", banner)
    version = gpus[0][1] if gpus and len(gpus[0]) > 1 else "?"
    names = "; ".join(f"{g[0]} ({g[2]})" if len(g) > 2 else g[0] for g in gpus)
    return (f"{version} (supports CUDA {supports.group(1) if supports else '?'}), "
            f"{len(gpus)} GPU(s): {names or 'none listed'}")


def cuda_problem() -> str | None:
    """None when CUDA is usable; else one line naming torch's CUDA build, the driver and torch's reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # torch says why CUDA is unusable in a warning
        usable = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if usable:
        return None
    build = torch.version.cuda
    if build is None:
        return f"CUDA not usable: torch {torch.__version__} is a CPU-only build"
    reasons = "; ".join(str(w.message).splitlines()[0] for w in caught if "CUDA" in str(w.message))
    return (f"CUDA not usable: torch {torch.__version__} is built for CUDA {build}; driver: {driver()}"
            + (f"; torch says: {reasons}" if reasons else "")
            + f". A driver that supports CUDA {build} is needed, and a GPU visible to this process"
            " (CUDA_VISIBLE_DEVICES)")


def report() -> list[str]:
    with warnings.catch_warnings():  # its CUDA warning is cuda_problem's to report, once
        warnings.simplefilter("ignore")
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    compiler = shutil.which("cc") or shutil.which("gcc")
    return [
        f"python    {sys.executable} {platform.python_version()}",
        f"torch     {torch.__version__} (CUDA build {torch.version.cuda}, cuDNN {cudnn}), "
        f"triton {_version('triton')}, numpy {_version('numpy')}",
        f"driver    {driver()}",
        f"compiler  {compiler or 'no cc/gcc on PATH (torch.compile with inductor needs one)'}",
    ]


def main(argv: list[str]) -> int:
    print("\n".join(report()), flush=True)
    problem = cuda_problem()
    smoke = "--smoke" in argv
    state = (f"usable, {torch.cuda.device_count()} device(s) visible" if not problem
             else f"not used (--smoke): {problem}" if smoke else problem)
    print(f"cuda      {state}", flush=True)
    if problem and not smoke:
        print(f"{problem}\nRun on a GPU, or `bash benchmarks/gpu.sh --smoke` for the CPU check.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
