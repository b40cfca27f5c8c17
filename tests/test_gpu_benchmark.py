"""benchmarks/gpu.sh --smoke: every part of the GPU benchmark runs, at toy sizes on the CPU, so that
the script a GPU session runs once cannot rot between sessions."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT, run

pytestmark = pytest.mark.e2e

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
