"""End to end: the real Snakemake, DVC and MLflow on a temporary copy with tiny budgets."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess

import matplotlib.image
import mlflow
import pytest

from cm import io
from tests.conftest import copy_run, run
from tests.helpers import check_products, dvc_is_clean

pytestmark = pytest.mark.e2e
STAGE_RUNS = {"prepare_data": 1, "pretrain": 1, "train_evaluator": 1, "reference_features": 1, "train": 2, "merge": 2,
              "sample": 2, "evaluate": 2, "probe": 2, "report": 1}


def stage_runs(project):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["capacity-manipulation"], output_format="list")


def test_snakemake_runs_everything_registers_with_dvc_and_tracks_in_mlflow(snakemake_run, tmp_path):
    project = copy_run(snakemake_run, tmp_path / "project")  # pushes to its remote, adds the HTML report
    check_products(project)
    assert dvc_is_clean(project)
    run(["dvc", "push", "--quiet"], project)  # the default local-folder remote holds the outputs
    assert any((project / "dvc-storage").rglob("*"))

    runs = stage_runs(project)
    stages = [r.data.tags.get("stage") for r in runs if r.data.tags.get("cm.stage") != "pipeline"]
    assert {s: stages.count(s) for s in set(stages)} == STAGE_RUNS
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and parents <= {r.info.run_id for r in runs}
    train = next(r for r in runs if r.data.tags.get("stage") == "train" and r.data.tags["method"] == "cm")
    assert train.data.tags["seed"] == "0" and train.data.tags["cm.orchestrator"] == "snakemake"
    assert "loss_cm" in train.data.metrics

    again = run(["snakemake", "--cores", "all"], project)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert len(stage_runs(project)) == len(runs)
    check_html_report(project)


def check_html_report(project):
    """`make run`'s last step, `snakemake --report`, opened in a real browser (headless chromium):
    the workflow drawn, every result category in the page, a screenshot that is not blank."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    run(["snakemake", "--report", "results/report.html"], project)
    if browser is None:
        pytest.skip("chromium is not installed (as root: apt-get install -y chromium, or .ci/install-chromium.sh)")
    shot = project / "report.png"
    page = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,900",
         f"--user-data-dir={project / 'chromium-profile'}", "--virtual-time-budget=10000", f"--screenshot={shot}",
         "--dump-dom", (project / "results" / "report.html").as_uri()], capture_output=True, text=True, timeout=180)
    dom = page.stdout
    for rendered in (">Workflow<", ">Results<", ">probe<", ">report<"):  # the app drew its menu and the DAG
        assert rendered in dom, f"{rendered!r} not rendered ({len(dom)} characters of DOM)"
    for content in ("Capacity probes", "Training curves", "Per class", "Samples", "probe.png", "per_class_fid.png",
                    "training_curves.png",
                    "Capacity Manipulation aims at the bars on the right."):
        assert content in dom, f"{content!r} not in the report"
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1400)
    assert (pixels.std(axis=-1) > 0.05).mean() > 0.001 and (pixels.mean(axis=-1) < 0.5).mean() > 0.005, \
        "the screenshot is blank"


def test_dvc_repro_reproduces_the_pipeline(project):
    run(["dvc", "repro", "--quiet"], project, timeout=900)
    check_products(project)
    assert dvc_is_clean(project)
    runs = stage_runs(project)
    children = [r for r in runs if r.data.tags.get("cm.stage") != "pipeline"]
    assert len(children) == sum(STAGE_RUNS.values())
    assert {r.data.tags["cm.orchestrator"] for r in children} == {"dvc"}
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1
    metrics = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "fid" in metrics

    # Byte-stable: stages computed again from the same inputs (training from scratch, not resumed)
    # write the same bytes, so the lock a fresh clone reproduces equals the committed one.
    git = ["git", "-c", "user.email=ci@localhost", "-c", "user.name=ci"]
    run(git + ["add", "dvc.lock"], project)
    run(git + ["commit", "-qm", "lock"], project)
    shutil.copy(project / "dvc.lock", project / "committed.lock")
    shutil.rmtree(project / "results" / "digits_lt" / "train" / "cm" / "seed0" / "checkpoints")
    run(["dvc", "repro", "--quiet", "--force", "--single-item", "prepare_data@digits_lt",
         "train_evaluator@digits_lt", "reference_features@digits_lt"], project, timeout=900)
    run(["dvc", "repro", "--quiet", "--force", "--downstream", "train@digits_lt-cm-0"], project, timeout=900)
    diff = run(["python", "-m", "cm", "lock-diff", "committed.lock", "dvc.lock"], project, check=False)
    assert diff.returncode == 0 and diff.stderr == "", diff.stdout + diff.stderr
    assert diff.stdout.splitlines()[0].endswith("compared, all equal"), diff.stdout
    assert diff.stdout.splitlines()[1].endswith("compared, all the same bytes"), diff.stdout

    # Another selection, run as the README says, leaves this one's results as they are, and its
    # metrics line up with these in `dvc exp show` (keyed by method, not by seed).
    before = digests(project / "results")
    run(["dvc", "exp", "run", "--temp", "--name", "seed1", "-S", "seeds=[1]", "-S", "methods=[ddpm]"], project,
        timeout=900)
    assert digests(project / "results") == before
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    fids = {exp.get("name") or "workspace": metrics_of(exp)["ddpm"]["fid"] for exp in experiments(shown)}
    assert set(fids) >= {"workspace", "seed1"} and fids["seed1"] != fids["workspace"]


def digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def experiments(shown: list[dict]):
    """The workspace and every experiment in `dvc exp show --json`'s nesting."""
    for rev in shown:
        yield {**rev, "name": None} if rev.get("rev") == "workspace" else rev
        for group in rev.get("experiments") or []:
            yield from group.get("revs") or []


def metrics_of(exp: dict) -> dict:
    """The report's metrics.json of one `dvc exp show --json` entry."""
    files = exp["data"]["metrics"]
    return next(v["data"] for k, v in files.items() if k.endswith("report/metrics.json"))


def test_stage_error_is_one_line_and_writes_nothing(project):
    result = run(["python", "-m", "cm", "merge", "--experiment", "digits_lt", "--method", "cm", "--seed", "0",
                  "--model", "missing.pt", "--out", "results/x.pt"], project, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: missing.pt: file not found"
    assert not (project / "results").exists()


def test_merged_cm_model_matches_its_unmerged_outputs(snakemake_run):
    """The merge stage checks float64 and float32 agreement before writing; read its report."""
    report = io.load_torch(snakemake_run / "results/digits_lt/merged/cm/seed0/model.pt")["merge"]
    assert report["had_branches"] and report["gap_float64"] <= 1e-10 and report["gap_float32"] <= 1e-5


def test_theta_g_only_model_reuses_the_cm_checkpoint_with_branches_dropped(snakemake_run, tmp_path):
    """cm_gonly (theta_g_only: [cm]) is merged from cm's checkpoint without a second training, and
    computes what the trained network computes with every B set to zero (B A = 0)."""
    import torch

    from cm.checkpoint import build_network, load_merged

    project = copy_run(snakemake_run, tmp_path / "project")  # cm is trained: cm_gonly needs no training
    out = run(["snakemake", "results/digits_lt/samples/cm_gonly/seed0/samples.npz", "--cores", "all",
               "--config", "theta_g_only=[cm]"], project).stderr
    assert not re.search(r"^train\s", out, re.M) and re.search(r"^merge\s+1$", out, re.M), out
    assert re.search(r"^sample\s+1$", out, re.M), out
    assert not (project / "results/digits_lt/train/cm_gonly").exists()
    trained = io.load_torch(project / "results/digits_lt/train/cm/seed0/model.pt")
    full = build_network(trained["config"])
    full.load_state_dict(trained["ema"])
    with torch.no_grad():
        for name, param in full.named_parameters():
            if name.endswith(".B"):
                param.zero_()
    gonly, meta = load_merged(project / "results/digits_lt/merged/cm_gonly/seed0/model.pt")
    assert meta["merge"]["drop_branches"]
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 20, 50, 99]), torch.tensor([0, 3, 6, 9])
    with torch.no_grad():
        torch.testing.assert_close(gonly(x, t, y), full.eval()(x, t, y))
