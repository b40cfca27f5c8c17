"""The documentation: the site builds strictly offline, the configuration page is the schema's, a dead
link fails the build naming its page, and the README stays a front page (at most 200 lines)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

README_MAX_LINES = 200


def _mkdocs_build(config, site, cwd):
    """`mkdocs build --strict` of a config into `site`, as `make docs` runs it (no network needed)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "docs" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages(nav) -> set[str]:
    pages = set()
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages |= _nav_pages(value) if isinstance(value, list) else {value}
    return pages


@pytest.fixture(scope="module")
def mkdocs_config() -> dict:
    # mkdocs.yml uses no YAML tags, so a plain load reads it as mkdocs does.
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_site_builds_strictly(mkdocs_config, tmp_path):
    result = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site", ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "configuration.html").is_file()
    assert "WARNING" not in result.stderr, result.stderr


def test_every_page_is_in_the_nav(mkdocs_config):
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    listed = _nav_pages(mkdocs_config["nav"])
    assert pages == listed, f"not in nav: {sorted(pages - listed)}; in nav but missing: {sorted(listed - pages)}"


def test_configuration_page_is_generated_from_the_schema_and_the_defaults():
    generator = _generator()
    expected = generator.render(yaml.safe_load(generator.SCHEMA.read_text()),
                                yaml.safe_load(generator.PARAMS.read_text()))
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == expected, "docs/configuration.md is out of date: run python docs/gen_config_reference.py"


def test_configuration_page_names_every_schema_key():
    generator = _generator()
    schema = yaml.safe_load(generator.SCHEMA.read_text())

    def names(node):
        """Every property name under a node of the schema, nested ones and oneOf alternatives too."""
        if isinstance(node, dict):
            for name, child in (node.get("properties") or {}).items():
                yield name
                yield from names(child)
            for alt in node.get("oneOf") or []:
                yield from names(alt)

    page = generator.render(schema, yaml.safe_load(generator.PARAMS.read_text()))
    rows = {line.split("`")[1].rsplit(".", 1)[-1] for line in page.splitlines() if line.startswith("| `")}
    absent = sorted({n for root in (schema, *schema["$defs"].values()) for n in names(root)} - rows)
    assert not absent, f"keys of the schema missing from docs/configuration.md: {absent}"


def test_dead_internal_link_fails_the_build_naming_the_page(mkdocs_config, tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", copy / "benchmarks" / "RESULTS.md")
    page = copy / "docs" / "methods.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    result = _mkdocs_build(copy / "mkdocs.yml", tmp_path / "site", copy)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "methods.md" in output and "no-such-page.md" in output, output


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it within {README_MAX_LINES}"
