"""benchmarks/gpu.sh --smoke: every part of the GPU benchmark runs, at toy sizes on the CPU, so that
the script a GPU session runs once cannot rot between sessions (e2e). The fast tests below check its
plan (order, compile budget, graph reuse), how gpu.sh finds Python, what it says when CUDA is not
usable, and that its path imports nothing the GPU machine lacks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run

METHODS = ("ddpm", "cm", "cm:shared_encoder", "cm+oc", "cbdm")
PRECISIONS = ("fp32", "bf16", "bf16+compile")
SECTIONS = ("== 1. Training throughput", "== 2. Guided DDIM-50 sampling", "== 3. Projected wall time",
            "== 4. 2-GPU scaling", "== 5. Host synchronisations")
NUMBER = r"\d+(\.\d+)?"


def section(output: str, title: str) -> str:
    """The lines of one section: from its title to the next title or the summary."""
    start = output.index(title)
    end = min((i for i in (output.find("\n== ", start + 1), output.find("\nsummary:", start)) if i > 0),
              default=len(output))
    return output[start:end]


def row(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.MULTILINE) is not None


@pytest.mark.e2e
def test_smoke_run_measures_every_part():
    result = run(["bash", "benchmarks/gpu.sh", "--smoke"], ROOT, check=False, timeout=240)
    output = result.stdout
    assert result.returncode == 0, output[-4000:] + result.stderr[-4000:]
    assert "random tensors" in output and "SMOKE RUN" in output
    for title in SECTIONS:
        assert title in output, title

    training = section(output, SECTIONS[0])
    for method in METHODS:
        for precision in PRECISIONS:
            assert row(rf"^{re.escape(method)}\s+4\s+{re.escape(precision)}\s+{NUMBER}\s", training), \
                f"no measured training row for {method} {precision}:\n{training}"

    sampling = section(output, SECTIONS[1])
    for precision in PRECISIONS:
        assert row(rf"^{re.escape(precision)}\s+{NUMBER}\s", sampling), f"no DDIM row for {precision}:\n{sampling}"

    projection = section(output, SECTIONS[2])
    for method in METHODS:
        assert row(rf"^{re.escape(method)}\s+4\s+\S+\s+{NUMBER}\s+\S+\s+\S+$", projection), projection

    ddp = section(output, SECTIONS[3])
    for method in ("ddpm", "cm"):  # the torchrun worker ran (2 gloo processes) and its rates came back
        assert row(rf"^{method}\s+4\s+bf16\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}", ddp), ddp

    syncs = section(output, SECTIONS[4])
    for method in METHODS:
        assert row(rf"^{re.escape(method)}\s+4\s+\d+\s+n/a\s+n/a\s+CPU", syncs), syncs

    assert output.rstrip().splitlines()[-1].startswith("summary: ok;"), output[-2000:]


# --------------------------------------------------------------------------- fast checks

@pytest.fixture(scope="module")
def gpu():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu as module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_compiled_ddpm_and_cm_at_batch_64_come_right_after_one_fp32_baseline(gpu):
    before, middle, after = gpu.training_plan((64, 128))
    assert before[:3] == [("ddpm", 64, "fp32"), ("ddpm", 64, "bf16+compile"), ("cm", 64, "bf16+compile")]
    rows = before + middle + after
    assert len(rows) == len(set(rows)) == len(METHODS) * len(PRECISIONS) * 2  # every row, once
    assert set(rows) == {(m, b, p) for m in METHODS for b in (64, 128) for p in PRECISIONS}
    # Batch 128's compiles come last of all training rows: new shapes, new graphs.
    assert [r for r in rows if r[1] == 128 and r[2] == "bf16+compile"] == rows[-len(METHODS):]


def test_rows_that_can_reuse_graphs_are_budgeted_as_reuse_and_nothing_resets_dynamo(gpu):
    cm = gpu.compiled_graphs("cm", 64)
    assert gpu.compiled_graphs("cm:shared_encoder", 64) <= cm and gpu.compiled_graphs("cm+oc", 64) <= cm
    assert not gpu.compiled_graphs("cbdm", 64) <= gpu.compiled_graphs("ddpm", 64)  # its doubled batch
    assert not gpu.compiled_graphs("ddpm", 64) <= cm                              # no branches
    assert 60 <= gpu.GUESS_S["train+compile"] <= 180 and gpu.GUESS_S["train+compiled"] < 60
    assert gpu.RECOMPILE_LIMIT > 8
    source = Path(gpu.__file__).read_text()
    assert "_dynamo.reset(" not in source
    assert gpu.PRECISIONS[gpu.DDP_PRECISION] == ("bf16", True)
    assert gpu.parse_args([]).ddp_precision == gpu.DDP_PRECISION


def test_gpu_sh_runs_python3_when_there_is_no_venv(tmp_path):
    """The GPU machine: a copy of the tree without .venv, python3 on PATH, perhaps no `python`."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gpu.sh").write_text((ROOT / "benchmarks" / "gpu.sh").read_text())
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name in ("python3", "python"):
        (bin_ / name).write_text(f'#!/bin/sh\necho "{name}: $*"\n')
        (bin_ / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CM_PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_}{os.pathsep}/usr/bin{os.pathsep}/bin"
    done = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu.sh"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The environment report first, then the benchmark, both with python3.
    assert done.stdout.splitlines() == ["python3: benchmarks/gpu_env.py --smoke", "python3: benchmarks/gpu.py --smoke"]


def test_without_usable_cuda_the_message_names_torchs_cuda_and_the_driver(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_env
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def unavailable():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 12020).\n"
                      "Please update your GPU driver", UserWarning, stacklevel=1)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(gpu_env, "driver", lambda: "535.104.05 (supports CUDA 12.2), 1 GPU(s): NVIDIA H100")
    problem = gpu_env.cuda_problem()
    assert "\n" not in problem
    assert "built for CUDA 13.0" in problem and "535.104.05 (supports CUDA 12.2)" in problem
    assert "driver on your system is too old" in problem
    assert gpu_env.main([]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("python    ") and "torch     " in out and "driver    535.104.05" in out
    assert problem in err and "--smoke" in err
    assert gpu_env.main(["--smoke"]) == 0


BLOCKED = ("mlflow", "dvc", "snakemake", "cleanfid", "jsonschema", "diffusers")


def test_the_benchmarks_path_imports_nothing_the_gpu_image_lacks():
    """gpu.py and one step of every method it trains, with the packages the GPU machine lacks made
    unimportable (make device-check runs the whole smoke benchmark in such an environment)."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError(f"{{name}} is not on the GPU machine")
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, "benchmarks")
        import torch, gpu
        torch.set_num_threads(1)
        sizes = gpu.make_sizes(gpu.parse_args(["--smoke"]))
        for label in [*gpu.METHODS, *gpu.SYNC_ONLY]:
            trainer, method = gpu.build_trainer(label, "fp32", sizes, sizes.device)
            trainer.step(*gpu.random_batch(4, sizes, sizes.device), gpu.LR)
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok []"
