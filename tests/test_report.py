"""Report tables: mean and spread over seeds computed as stated; grids ordered head to tail."""

from __future__ import annotations

import statistics

import matplotlib.image
import numpy as np
import pytest

from cm.data.profiles import head_to_tail
from cm.report import (
    COLUMNS,
    WITH_FLOOR,
    experiment_metrics,
    grid_canvas,
    per_class_fid_rows,
    per_class_rows,
    sample_grid,
    summarise,
    to_csv,
    to_markdown,
    training_loss_rows,
)


def fake_metrics(value):
    return {"feature_extractor": "local", **{c: value + i for i, c in enumerate(COLUMNS)},
            **{f"{c}_floor": 0.5 for c in WITH_FLOOR},
            "per_class": {"fid": [value, 2 * value, 3 * value], "acc": [0.5, 0.25, value / 10],
                          "fid_floor": [0.1, 0.2, 0.3]}}


def test_summary_mean_and_std_over_seeds():
    runs = [{"method": "ddpm", "seed": s, "metrics": fake_metrics(v)} for s, v in enumerate([1.0, 2.0, 4.0])]
    runs.append({"method": "cm", "seed": 0, "metrics": fake_metrics(0.5)})
    rows = summarise(runs)
    assert [r["method"] for r in rows] == ["ddpm", "cm"]
    assert rows[0]["fid"] == statistics.mean([1.0, 2.0, 4.0])
    assert abs(rows[0]["fid_std"] - statistics.stdev([1.0, 2.0, 4.0])) < 1e-12
    assert rows[1]["seeds"] == 1 and rows[1]["fid_std"] == 0.0
    manifest = {"class_counts": [3, 2, 1], "source": {"name": "digits"}, "profile": "exponential",
                "imbalance_ratio": 3, "splits": {"many": [0], "medium": [1], "few": [2]}}
    text = to_markdown(rows, experiment="x", manifest=manifest, evaluator={"test_accuracy": 0.9})
    # 95% interval of the mean of 3 seeds: t(0.975, 2 df) = 4.303 (published tables) x 1.528 / sqrt(3).
    half = 4.302653 * statistics.stdev([1.0, 2.0, 4.0]) / 3 ** 0.5
    assert (rows[0]["fid_lo"], rows[0]["fid_hi"]) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    assert rows[1]["fid_lo"] is None  # one seed and no bootstrap in its metrics: no interval
    assert "`local` extractor" in text
    assert f"| ddpm | 3 | 2.33 ± 1.53 [{7 / 3 - half:.2f}, {7 / 3 + half:.2f}] |" in text
    assert "| cm | 1 | 0.50 | 1.5000 |" in text
    assert "| *real vs real (floor)* | | 0.50 | 0.5000 |" in text
    assert to_csv(rows).splitlines()[0].startswith(
        "method,seeds,seed_list,feature_extractor,fid_mode,inception_weights,inception_weights_sha256,"
        "generated_dtype,fid,fid_std,fid_lo,fid_hi,fid_floor")
    # DVC's metrics: keyed by method and column, never by seed, so experiments with other seeds line up.
    metrics = experiment_metrics(rows)
    assert list(metrics) == ["ddpm", "cm"] and metrics["cm"]["seeds"] == 1
    assert metrics["ddpm"]["fid"] == statistics.mean([1.0, 2.0, 4.0]) and "fid_floor" not in metrics["ddpm"]
    assert set(metrics["ddpm"]) == {"seeds", *(f"{c}{part}" for c in COLUMNS for part in ("", "_std", "_lo", "_hi"))}


def test_grid_has_a_row_per_class_head_first(tmp_path):
    counts = [1, 9, 5]  # head is class 1, then 2, then 0
    images = np.stack([np.full((4, 4, 1), 80 * c, np.uint8) for c in (0, 1, 2) for _ in range(3)])
    labels = np.repeat([0, 1, 2], 3)
    manifest = {"class_counts": counts, "class_names": ["a", "b", "c"]}
    assert head_to_tail(counts) == [1, 2, 0]
    canvas = grid_canvas(images, labels, head_to_tail(counts), per_row=3)
    assert canvas.shape == (3 * 5, 3 * 5, 1)
    assert [int(canvas[r * 5, 0, 0]) for r in range(3)] == [80, 160, 0]  # rows: class 1, 2, 0
    path = tmp_path / "grid.png"
    sample_grid(images, labels, manifest, path, per_row=3)
    assert matplotlib.image.imread(path).shape[2] in (3, 4)


def test_per_class_table_head_to_tail_with_spread_over_seeds():
    runs = [{"method": "cm", "seed": s, "metrics": fake_metrics(v)} for s, v in enumerate([1.0, 3.0])]
    runs.append({"method": "ddpm", "seed": 0, "metrics": fake_metrics(2.0)})
    manifest = {"class_counts": [5, 9, 1], "class_names": ["a", "b", "c"]}
    rows = per_class_rows(runs, manifest)
    assert [r["name"] for r in rows] == ["b", "a", "c"]
    b = rows[0]  # class 1: cm FIDs 2 and 6, ddpm 4
    assert b["train_count"] == 9 and b["fid_floor"] == pytest.approx(0.2)
    assert b["cm.fid"] == 4.0 and b["cm.fid_std"] == pytest.approx(statistics.stdev([2.0, 6.0]))
    assert b["ddpm.fid"] == 4.0 and b["ddpm.fid_std"] == 0.0 and b["cm.acc"] == 0.25


def fake_probe(changes, theta_g=None, shares=(0.5, 1.0, 0.25), margin=0.1):
    """A probe stage's JSON with the given per-class relative changes and block shares; margins `margin`
    overall, twice it in the encoder, thrice in the middle, 4x in the decoder (batch std 0.01, 0.02, ...),
    0.5 on W_g and None on BA (no defined matrix)."""
    def comparison(values):
        return {"relative_change": list(values), "relative_change_se": [0.01] * len(values)}

    def entry(fraction, k):
        return {"fraction": fraction, "margin": k * margin, "margin_batch_std": k / 100}

    blocks = dict(zip(("encoder", "middle", "decoder"), shares))
    return {"pruning": comparison(changes), "theta_g": None if theta_g is None else comparison(theta_g),
            "dominance": {"overall": entry(float(np.mean(shares)), 1),
                          "by_block": {k: entry(v, i + 2) for i, (k, v) in enumerate(blocks.items())},
                          "by_part": {"W_g": {"fraction": 0.5, "margin": 0.5, "margin_batch_std": 0.05},
                                      **({"BA": {"fraction": 1.0, "margin": None, "margin_batch_std": None}}
                                         if theta_g else {})}}}


def test_probe_tables_average_seeds_and_groups_as_stated(tmp_path):
    from cm.report import dominance_rows, probe_markdown, probe_rows, write_report

    manifest = {"class_counts": [1, 3, 2], "class_names": ["a", "b", "c"],
                "splits": {"many": [1], "medium": [2], "few": [0]}, "source": {"name": "digits"},
                "profile": "exponential", "imbalance_ratio": 3}
    probes = [{"method": "ddpm", "seed": 0, "result": fake_probe([0.3, 0.1, 0.2])},
              {"method": "ddpm", "seed": 1, "result": fake_probe([0.5, 0.1, 0.4], margin=0.2)},
              {"method": "cm", "seed": 0, "result": fake_probe([0.2, 0.0, 0.1], theta_g=[0.6, 0.0, 0.2])}]
    rows = probe_rows(probes, manifest)
    assert [(r["method"], r["class"]) for r in rows] == [("ddpm", 1), ("ddpm", 2), ("ddpm", 0),
                                                         ("cm", 1), ("cm", 2), ("cm", 0)]  # head to tail
    few = rows[2]
    assert few["pruning_change"] == pytest.approx(0.4) and few["pruning_change_std"] == pytest.approx(
        statistics.stdev([0.3, 0.5]))
    assert "theta_g_change" not in few and rows[5]["theta_g_change"] == pytest.approx(0.6)
    dominance = dominance_rows(probes)
    assert dominance[0]["decoder"] == 0.25 and dominance[1]["BA"] == 1.0 and "BA" not in dominance[0]
    # Margins: mean over seeds; spread the std over seeds with two seeds, the batch std with one.
    ddpm, cm = dominance
    assert ddpm["seeds"] == 2 and cm["seeds"] == 1
    assert ddpm["overall.margin"] == pytest.approx(0.15) and ddpm["decoder.margin"] == pytest.approx(0.6)
    assert ddpm["decoder.margin_spread"] == pytest.approx(statistics.stdev([0.4, 0.8]))
    assert cm["middle.margin"] == pytest.approx(0.3) and cm["middle.margin_spread"] == 0.03
    assert cm["BA.margin"] is None and cm["BA.margin_spread"] is None and cm["W_g.margin_spread"] == 0.05
    text = probe_markdown(rows, dominance, manifest, 0.1)
    assert "| cm | theta_g only | +0 | +0.2 | +0.6 |" in text  # many, medium, few
    assert "| ddpm | pruned | +0.1 | +0.3 | +0.4 |" in text
    assert "| ddpm | 0.58 | 0.50 | 1.00 | 0.25 | 0.50 |  |" in text
    assert "| method | seeds | all | encoder | middle | decoder | W_g | BA |" in text
    assert (f"| ddpm | 2 | +0.150 ± {statistics.stdev([0.1, 0.2]):.3f} | +0.300 ± {statistics.stdev([0.2, 0.4]):.3f}"
            in text)
    assert "| cm | 1 | +0.100 ± 0.010 | +0.200 ± 0.020 | +0.300 ± 0.030 | +0.400 ± 0.040 | +0.500 ± 0.050 |  |" in text
    runs = [{"method": "ddpm", "seed": 0, "metrics": fake_metrics(1.0)}]
    write_report(experiment="x", runs=runs, samples={}, manifest=manifest, evaluator={}, out_dir=tmp_path,
                 probes=probes, probe_fraction=0.1)
    assert matplotlib.image.imread(tmp_path / "probe.png").shape[0] > 100
    assert (tmp_path / "probe.csv").read_text().splitlines()[0].startswith("method,class,count,seeds,pruning_change")


def test_theta_g_table_pairs_each_cm_run_with_its_theta_g_only_model():
    from cm.report import theta_g_markdown

    runs = [{"method": "cm", "seed": 0, "metrics": fake_metrics(1.0)},
            {"method": "cm_gonly", "seed": 0, "metrics": fake_metrics(1.5)},
            {"method": "ddpm", "seed": 0, "metrics": fake_metrics(3.0)}]
    text = theta_g_markdown(summarise(runs))
    fid, many = COLUMNS.index("fid"), COLUMNS.index("fid_many")
    assert f"| cm | full | {1.0 + fid:.2f} | {1.0 + many:.2f} |" in text
    assert f"| cm | theta_g only | {1.5 + fid:.2f} | {1.5 + many:.2f} |" in text
    assert "| cm | change | +0.50 | +0.50 | +0.50 | +0.50 |" in text and "ddpm" not in text
    assert theta_g_markdown(summarise(runs[2:])) == ""


def test_training_loss_rows_average_seeds_on_common_steps_head_first():
    manifest = {"class_counts": [1, 9], "class_names": ["rare", "common"]}
    def history(seed, steps):
        return [{"step": str(s), "loss": str(s + seed), "loss_class_0": str(10 * s + seed),
                 "loss_class_1": str(s - seed)} for s in steps]
    histories = [{"method": "cm", "seed": 0, "rows": history(0, [50, 100])},
                 {"method": "cm", "seed": 1, "rows": history(1, [50, 100, 150])}]  # 150: one seed only
    rows = training_loss_rows(histories, manifest)
    assert [(r["step"], r["name"]) for r in rows] == [(50, "common"), (50, "rare"), (100, "common"), (100, "rare")]
    assert rows[0]["class_loss"] == 50 - 0.5 and rows[1]["class_loss"] == 500 + 0.5
    assert rows[2]["loss"] == 100.5 and rows[3]["train_count"] == 1


def test_per_class_fid_rows_are_long_with_a_row_per_method():
    per_class = [{"class": 1, "name": "b", "train_count": 9, "ddpm.fid": 1.0, "ddpm.fid_std": 0.1,
                  "cm.fid": 2.0, "cm.fid_std": 0.2}]
    rows = per_class_fid_rows(per_class, ["ddpm", "cm"])
    assert rows == [{"class": 1, "name": "b", "train_count": 9, "method": "ddpm", "fid": 1.0, "fid_std": 0.1},
                    {"class": 1, "name": "b", "train_count": 9, "method": "cm", "fid": 2.0, "fid_std": 0.2}]
