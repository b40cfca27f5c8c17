"""Tables and figures of one experiment: a row per method (mean and spread over seeds), per-class
FID, training curves, capacity probes and a sample grid per method with a row per class, head to tail.
`tables` computes and formats them, `figures` draws them; `write_report` writes the report stage's files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cm import io
from cm.report.figures import (
    grid_canvas,
    per_class_fid_figure,
    probe_figure,
    pyplot,
    sample_grid,
    save_figure,
    training_curves_figure,
)
from cm.report.stats import paired_rows, trend_rows
from cm.report.tables import (
    COLUMNS,
    WITH_FLOOR,
    dominance_rows,
    experiment_metrics,
    paired_markdown,
    per_class_fid_rows,
    per_class_rows,
    probe_markdown,
    probe_rows,
    summarise,
    theta_g_markdown,
    to_csv,
    to_markdown,
    training_loss_rows,
    trend_markdown,
)

# What `write_report` writes beside grids/ when it is given probes and histories (the CLI's stage).
REPORT_FILES = ["summary.csv", "summary.md", "paired.csv", "metrics.json", "per_class.csv", "per_class_fid.csv",
                "per_class_fid.png", "training_loss.csv", "training_curves.png", "probe.csv", "probe.png"]


def write_report(*, experiment: str, runs: list[dict], samples: dict[str, str], manifest: dict,
                 evaluator: dict, out_dir: str | Path, baseline: str | None = None, resolve: float = 0.1,
                 probes: list[dict] = (), probe_fraction: float = 0.1, histories: list[dict] = ()) -> list[dict]:
    """summary.csv, paired.csv (every method minus `baseline`, default the first, seed by seed;
    `resolve`: the difference, as a fraction of the baseline's value, whose seeds needed it states),
    per_class.csv, per_class_fid.png and .csv (long, for DVC's plot), summary.md, metrics.json and
    grids/<method>.png under `out_dir`; with histories ({"method", "seed", "rows"}
    per trained model, its history.csv) also training_loss.csv and training_curves.png; with probes
    ({"method", "seed", "result"} per trained model, from the probe stage) also probe.csv, probe.png
    and the probes' section of summary.md."""
    out_dir = Path(out_dir)
    rows = summarise(runs)
    io.write_text(out_dir / "summary.csv", to_csv(rows))
    paired = paired_rows(runs, baseline or rows[0]["method"], COLUMNS, resolve)
    io.write_text(out_dir / "paired.csv", to_csv(paired) if paired else "")
    io.write_json(out_dir / "metrics.json", experiment_metrics(rows))
    per_class = per_class_rows(runs, manifest)
    io.write_text(out_dir / "per_class.csv", to_csv(per_class))
    methods = [row["method"] for row in rows]
    io.write_text(out_dir / "per_class_fid.csv", to_csv(per_class_fid_rows(per_class, methods)))
    per_class_fid_figure(per_class, methods, out_dir / "per_class_fid.png",
                         title=f"{experiment}: per-class FID in the {rows[0]['feature_extractor']} extractor's space")
    if histories:
        curves = training_loss_rows(histories, manifest)
        io.write_text(out_dir / "training_loss.csv", to_csv(curves))
        training_curves_figure(curves, manifest, out_dir / "training_curves.png",
                               title=f"{experiment}: training loss (mean over seeds)")
    summary = (to_markdown(rows, experiment=experiment, manifest=manifest, evaluator=evaluator)
               + paired_markdown(paired, resolve) + theta_g_markdown(rows))
    if histories:
        summary += trend_markdown(trend_rows(histories))
    if probes:
        per_class_probes, dominance = probe_rows(probes, manifest), dominance_rows(probes)
        io.write_text(out_dir / "probe.csv", to_csv(per_class_probes))
        summary += probe_markdown(per_class_probes, dominance, manifest, probe_fraction)
        probe_figure(per_class_probes, dominance, manifest, out_dir / "probe.png",
                     title=f"{experiment}: capacity probes (pruning {probe_fraction:.0%} of weights; "
                           "gradient dominance per block)")
    io.write_text(out_dir / "summary.md", summary)
    for method, path in samples.items():
        arrays = io.load_npz(path, required=("images", "labels"))
        images = arrays["images"]
        if images.dtype != np.uint8:  # unquantised samples (sample.quantize: false) are float in [0, 1]
            images = np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)
        sample_grid(images, arrays["labels"], manifest, out_dir / "grids" / f"{method}.png",
                    title=f"{experiment}: {method} (rows: classes, head to tail; training count)")
    return rows


__all__ = ["COLUMNS", "REPORT_FILES", "WITH_FLOOR", "dominance_rows", "experiment_metrics", "grid_canvas",
           "paired_markdown", "paired_rows", "per_class_fid_rows", "per_class_rows", "probe_markdown", "probe_rows",
           "pyplot", "sample_grid",
           "save_figure", "summarise", "theta_g_markdown", "to_csv", "to_markdown", "training_loss_rows",
           "write_report"]
