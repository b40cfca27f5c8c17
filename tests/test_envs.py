"""envs/cm.yaml describes the same pinned stack as pyproject.toml (with its finetune extra, which the
lora methods need under `snakemake --use-conda`)."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import ROOT


def pins(requirements):
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", r).groups() for r in requirements if "==" in r)


def test_conda_env_pins_equal_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "envs" / "cm.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins(pip) == pins(project["dependencies"] + project["optional-dependencies"]["finetune"])
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python == "python=3.11" and ">=3.11,<3.12" == project["requires-python"]
    assert all("==" in r for r in project["dependencies"]), "every dependency is pinned"
