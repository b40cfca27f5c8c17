"""DVC beside Snakemake: the plots page offline, and outputs restored by `dvc pull`."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from cm import io
from cm.report import per_class_fid_rows, to_csv, training_loss_rows
from tests.conftest import VENV_BIN, copy_run, run

pytestmark = pytest.mark.e2e
TEMPLATE = "workflow/report/dvc_plots.html"
# Renders every plot of a page with the scripts the page loads, as a browser would, without one.
RENDER_JS = r"""
const fs = require("fs"), path = require("path"), vm = require("vm");
const page = process.argv[2], html = fs.readFileSync(page, "utf8");
for (const [, src] of html.matchAll(/<script[^>]*\bsrc="([^"]+)"/g)) {
  vm.runInThisContext(fs.readFileSync(path.resolve(path.dirname(page), src), "utf8"));
}
const specs = [...html.matchAll(/var spec = (\{[\s\S]*?\});\s*vegaEmbed\(/g)].map((m) => JSON.parse(m[1]));
if (typeof vegaEmbed !== "function") throw new Error("vegaEmbed is not defined");
(async () => {
  for (const spec of specs) {
    const view = new vega.View(vega.parse(vegaLite.compile(spec).spec), { renderer: "none" });
    const svg = await view.toSVG();
    console.log((svg.match(/<path/g) || []).length);
  }
})().catch((err) => { console.error(err); process.exit(1); });
"""


def script_sources(page: Path) -> list[str]:
    return re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", page.read_text())


@pytest.fixture
def plots_page(project):
    """`dvc plots show` with the project's template, on two loss histories and the report's per-class
    FID and training loss (written by cm/report from them, for two classes)."""
    manifest = {"class_counts": [3, 9], "class_names": ["rare", "common"]}
    histories, per_class = [], [{"class": c, "name": manifest["class_names"][c], "train_count": n}
                                for c, n in enumerate(manifest["class_counts"])]
    for k, method in enumerate(("ddpm", "cm")):
        history = project / f"results/digits_lt/history/{method}/seed0.csv"
        history.parent.mkdir(parents=True)
        history.write_text("step,loss,loss_class_0,loss_class_1\n10,0.99,1.0,0.98\n20,0.89,0.9,0.88\n"
                           "30,0.81,0.85,0.8\n")
        histories.append({"method": method, "seed": 0, "rows": io.read_csv(history)})
        for row in per_class:
            row.update({f"{method}.fid": 1.0 + k + row["class"], f"{method}.fid_std": 0.0})
    report = project / "results/digits_lt/report"
    report.mkdir(parents=True)
    (report / "per_class_fid.csv").write_text(to_csv(per_class_fid_rows(per_class, ["ddpm", "cm"])))
    (report / "training_loss.csv").write_text(to_csv(training_loss_rows(histories, manifest)))
    (project / ".venv").symlink_to(VENV_BIN.parent)  # where the template expects the environment
    run(["dvc", "plots", "show", "--out", "default_plots"], project)
    run(["dvc", "plots", "show", "--html-template", TEMPLATE], project)
    return project


def test_the_plots_page_loads_no_script_from_the_network(plots_page):
    default = script_sources(plots_page / "default_plots/index.html")
    assert default and all(src.startswith("https://") for src in default)  # why the template exists
    page = plots_page / "dvc_plots/index.html"
    sources = script_sources(page)
    assert [Path(src).name for src in sources] == ["vega.js", "vega-lite.js", "vega-embed.js"]
    for src in sources:
        assert "://" not in src and (page.parent / src).is_file(), src
    assert page.read_text().count("vegaEmbed(") == 4  # both histories, per-class FID and training loss


@pytest.mark.skipif(not shutil.which("node"), reason="no node to run the page's scripts")
def test_the_plots_page_renders_with_its_local_scripts(plots_page, tmp_path):
    (tmp_path / "render.js").write_text(RENDER_JS)
    result = run(["node", str(tmp_path / "render.js"), str(plots_page / "dvc_plots/index.html")], plots_page)
    paths = [int(n) for n in result.stdout.split()]
    assert len(paths) == 4 and all(n > 3 for n in paths), result.stdout  # axes, ticks and the marks


def restored_as_locked(clone) -> bool:
    out = run(["dvc", "status", "--with-deps", "merge@digits_lt-cm-0"], clone).stdout
    return "Data and pipelines are up to date" in out


def test_after_dvc_pull_snakemake_touch_marks_the_restored_outputs_up_to_date(snakemake_run, tmp_path):
    project = copy_run(snakemake_run, tmp_path / "project")  # Snakemake's outputs, committed to DVC
    params = yaml.safe_load((project / "params.yaml").read_text())
    run(["dvc", "push", "--quiet"], project)
    git = ["git", "-c", "user.email=ci@localhost", "-c", "user.name=ci"]
    run(git + ["add", "-A"], project)
    run(git + ["commit", "-qm", "results"], project)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run(["dvc", "remote", "modify", "--local", "local", "url", str(project / "dvc-storage")], clone)
    run(["dvc", "pull", "--quiet", "--with-deps", "merge@digits_lt-cm-0"], clone)
    assert restored_as_locked(clone)
    target = "results/digits_lt/merged/cm/seed0/model.pt"
    # DVC restores files in no set order, each with the time of its restoring; the worst order is
    # an input restored after the outputs made from it.
    os.utime(clone / "results/digits_lt/data/manifest.json")

    def planned(*extra):
        out = run(["snakemake", "--dry-run", target, *extra], clone)
        return set(re.findall(r"^(\w+)\s+1$", out.stdout, re.M)) - {"total"}

    # The pretrain stage's inputs are code only, so whether it looks stale too depends on whether the
    # clone's files or the restored output got the later time: either way it is not what the test is about.
    assert planned() - {"pretrain"} == {"train", "merge"}
    # Leaving mtime out of the rerun triggers does not help: Snakemake 9 compares modification
    # times whatever the triggers, unless it recorded the inputs' checksums (a clone has no record).
    assert planned("--rerun-triggers", "params", "input", "software-env", "code") - {"pretrain"} == {"train", "merge"}
    # --forceall: every job of the graph marks its outputs, stale-looking or not (the pretrain stage,
    # whose inputs are code only, may look current and would otherwise go unrecorded).
    run(["snakemake", "--cores", "1", "--touch", "--forceall", target], clone)
    assert planned() == set()
    assert restored_as_locked(clone)  # contents untouched
    # Only the times changed: a later edit of the code or of params.yaml is still seen.
    code = clone / "cm/train.py"
    original = code.read_text()
    code.write_text(original + "# edited\n")
    assert planned() == {"pretrain", "train", "merge"}  # the pretrain stage trains with it too
    code.write_text(original)
    assert planned() == set()
    params["experiments"]["digits_lt"]["train"]["lr"] = 0.001
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert planned() == {"train", "merge"}
