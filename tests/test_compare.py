"""The sweep comparison: experiments ordered by the setting they differ in, the figures' numbers
taken from each experiment's report, and a missing report named in one line."""

from __future__ import annotations

import copy

import matplotlib.image
import pytest
import yaml

from cm import config as cfg
from cm.compare import compare
from cm.errors import ConfigError, DataError
from cm.report import to_csv
from tests.conftest import ROOT

COLS = ["fid", "fid_many", "fid_medium", "fid_few"]


def params_with_widths(widths):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for ch in widths:
        exp = copy.deepcopy(params["experiments"]["digits_lt"])
        exp["model"] = {"preset": "small", "ch": ch}
        params["experiments"][f"w{ch}"] = exp
    return cfg.check_params(params, base_dir=ROOT)


def write_summary(results, name, rows):
    path = results / name / "report" / "summary.csv"
    path.parent.mkdir(parents=True)
    path.write_text(to_csv(rows))


def summary_row(method, base, seeds=3, seed_list="0 1 2", interval=True):
    return {"method": method, "seeds": seeds, "seed_list": seed_list, **{c: base + k for k, c in enumerate(COLS)},
            **{f"{c}_std": 0.1 * (k + 1) for k, c in enumerate(COLS)},
            **{f"{c}_lo": base + k - 0.5 if interval else None for k, c in enumerate(COLS)},
            **{f"{c}_hi": base + k + 0.25 if interval else None for k, c in enumerate(COLS)}}


def test_rows_follow_the_setting_and_carry_each_reports_numbers(tmp_path):
    params = params_with_widths([16, 8])
    write_summary(tmp_path, "w16", [summary_row("ddpm", 1.0), summary_row("cm", 0.5)])
    write_summary(tmp_path, "w8", [summary_row("ddpm", 3.0), summary_row("cm", 2.0)])
    rows = compare(params, ["w16", "w8"], "model.ch", tmp_path / "out", tmp_path)
    assert [(r["model.ch"], r["method"]) for r in rows] == [(8, "ddpm"), (8, "cm"), (16, "ddpm"), (16, "cm")]
    assert rows[0]["fid_few"] == 6.0 and rows[0]["fid_many"] == 4.0 and rows[0]["gap_few_many"] == 2.0
    assert rows[3]["fid_few_std"] == pytest.approx(0.4) and rows[3]["seeds"] == 3
    table = (tmp_path / "out/summary.md").read_text()
    assert ("| 8 | ddpm | 3 | 3.00 ± 0.10 [2.50, 3.25] | 4.00 ± 0.20 [3.50, 4.25] | 6.00 ± 0.40 [5.50, 6.25] | "
            "+2.00 |") in table
    assert matplotlib.image.imread(tmp_path / "out/sweep.png").shape[0] > 100


def test_a_missing_report_or_setting_is_one_line(tmp_path):
    params = params_with_widths([8])
    with pytest.raises(DataError, match=r"w8/report/summary.csv does not exist: run the experiment 'w8' first"):
        compare(params, ["w8"], "model.ch", tmp_path / "out", tmp_path)
    write_summary(tmp_path, "digits_lt", [summary_row("ddpm", 1.0)])
    with pytest.raises(ConfigError, match="no setting 'ch'"):
        compare(params, ["digits_lt"], "model.ch", tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_of_the_pipeline_is_refused_and_nothing_is_written(tmp_path):
    params = params_with_widths([16, 8])
    write_summary(tmp_path, "w16", [summary_row("ddpm", 1.0)])
    write_summary(tmp_path, "w8", [summary_row("ddpm", 3.0)])
    report = tmp_path / "w8" / "report"
    before = (report / "summary.csv").read_bytes()
    with pytest.raises(ConfigError, match=r"--out-dir .*w8/report is inside .*w8, which the pipeline's stages write"):
        compare(params, ["w16", "w8"], "model.ch", report, tmp_path)
    assert (report / "summary.csv").read_bytes() == before and sorted(p.name for p in report.iterdir()) == [
        "summary.csv"]


def test_a_block_for_x_lists_the_values_under_it(tmp_path):
    params = params_with_widths([16, 8])
    write_summary(tmp_path, "w16", [summary_row("ddpm", 1.0)])
    write_summary(tmp_path, "w8", [summary_row("ddpm", 3.0)])
    with pytest.raises(ConfigError, match=r"--x train is a block, not a value: name one of train.steps, "):
        compare(params, ["w16", "w8"], "train", tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_failure_while_writing_leaves_the_output_folder_as_it_was(tmp_path, monkeypatch):
    import cm.compare

    params = params_with_widths([16, 8])
    write_summary(tmp_path, "w16", [summary_row("ddpm", 1.0)])
    write_summary(tmp_path, "w8", [summary_row("ddpm", 3.0)])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.md").write_text("an earlier comparison")

    def broken_figure(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cm.compare, "sweep_figure", broken_figure)
    with pytest.raises(OSError, match="disk full"):
        compare(params, ["w16", "w8"], "model.ch", tmp_path / "out", tmp_path)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["summary.md"]
    assert (tmp_path / "out" / "summary.md").read_text() == "an earlier comparison"
    assert not list(tmp_path.glob(".out.*"))


def test_a_report_without_an_interval_shows_mean_and_std(tmp_path):
    params = params_with_widths([8])
    write_summary(tmp_path, "w8", [summary_row("ddpm", 3.0, interval=False)])
    compare(params, ["w8"], "model.ch", tmp_path / "out", tmp_path)
    table = (tmp_path / "out/summary.md").read_text()
    assert "| 8 | ddpm | 3 | 3.00 ± 0.10 | 4.00 ± 0.20 | 6.00 ± 0.40 | +2.00 |" in table


def test_experiments_that_ran_other_seeds_are_refused_in_one_line(tmp_path):
    params = params_with_widths([8, 16])
    write_summary(tmp_path, "w8", [summary_row("ddpm", 3.0), summary_row("cm", 2.0)])
    write_summary(tmp_path, "w16", [summary_row("ddpm", 1.0, seeds=1, seed_list="0"), summary_row("cm", 0.5)])
    with pytest.raises(ConfigError, match=r"^--experiments: w8 \(ddpm\) ran seeds \[0 1 2\], w16 \(ddpm\) seeds \[0\]; "
                                          r"a comparison needs the same seeds in every experiment and method"):
        compare(params, ["w8", "w16"], "model.ch", tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()  # nothing written
    old = {k: v for k, v in summary_row("ddpm", 1.0).items() if k != "seed_list"}
    (tmp_path / "w16/report/summary.csv").write_text(to_csv([old]))
    with pytest.raises(DataError, match=r"w16/report/summary.csv has no seed_list column .*report stage again"):
        compare(params, ["w8", "w16"], "model.ch", tmp_path / "out", tmp_path)
