"""The report's tables of one experiment: a row per method (mean and spread over seeds), per class
head to tail, the training curves in long form, the capacity probes, as CSV and markdown."""

from __future__ import annotations

import csv
import io as _io

import numpy as np

from cm.data.profiles import head_to_tail
from cm.errors import DataError
from cm.report.stats import t_interval

COLUMNS = ["fid", "kid", "fid_many", "fid_medium", "fid_few", "precision", "recall",
           "acc", "acc_many", "acc_medium", "acc_few"]
# Distances whose real-versus-real floor the report prints beside them.
WITH_FLOOR = ["fid", "kid", "fid_many", "fid_medium", "fid_few"]

# What each clean-fid mode of the `inception` extractor is, for the table captions.
FID_MODES = {
    "clean": "clean-fid's TorchScript Inception-v3, PIL bicubic resize to 299",
    "legacy_pytorch": "pytorch-fid's TF-ported Inception-v3, bilinear resize to 299, as CBDM, OC and CM computed FID",
}
# The metrics that say what made the features; every run of one table must agree on them.
FEATURE_SPACE = ["feature_extractor", "fid_mode", "inception_weights", "inception_weights_sha256", "generated_dtype"]


def decimals(metric: str) -> int:
    """Decimal places a table prints `metric` with: KID is of order 1e-3, FID of order 1, rates in [0, 1]."""
    return 4 if metric.startswith("kid") else (2 if metric.startswith("fid") else 3)


def feature_space(metrics: dict) -> dict:
    """Extractor, fid_mode, weights file and hash, and the generated images' dtype of an evaluate
    stage's metrics (None where they do not apply). Metrics without these keys are read as clean-fid's
    mode `clean` on uint8 samples."""
    inception = metrics["feature_extractor"] == "inception"
    return {"feature_extractor": metrics["feature_extractor"],
            "fid_mode": metrics.get("fid_mode", "clean" if inception else None),
            "inception_weights": metrics.get("inception_weights"),
            "inception_weights_sha256": metrics.get("inception_weights_sha256"),
            "generated_dtype": metrics.get("generated_dtype", "uint8")}


def describe_features(row: dict) -> str:
    """The caption's words for a feature space (a summary row, or one run's metrics): extractor,
    for Inception its mode and weights, and what the generated images were fed as."""
    space = feature_space(row)
    text = f"`{space['feature_extractor']}` extractor"
    if space["feature_extractor"] == "inception":
        mode, sha = space["fid_mode"], space["inception_weights_sha256"]
        text += f", fid_mode `{mode}` ({FID_MODES.get(mode, mode)}; weights `{space['inception_weights']}`"
        text += f", sha256 `{sha[:16]}...`)" if sha else ", hash not recorded)"
    return text + f"; generated images fed as {space['generated_dtype']}"


def mean_std(values) -> tuple[float, float]:
    """Mean and standard deviation over seeds (ddof=1; 0 for one seed)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(runs: list[dict]) -> list[dict]:
    """One row per method: of every column the mean, the standard deviation (ddof=1; 0 for one
    seed) and a 95% interval `<col>_lo`, `<col>_hi`: of the mean over seeds (Student's t) with two
    seeds or more; with one, the evaluate stage's bootstrap interval where it made one (FID, KID,
    group FIDs), else none. `<col>_boot_se` is the bootstrap's standard error, mean over seeds:
    the part of the seed spread that the finite generated set explains.

    `runs` holds dicts with keys method, seed and metrics (an evaluate stage's JSON).
    """
    spaces = {tuple(feature_space(run["metrics"]).values()): run for run in runs}
    if len(spaces) > 1:  # numbers of two feature spaces are never mixed in one table
        (a, ra), (b, rb) = list(spaces.items())[:2]
        raise DataError(f"metrics of {ra['method']} seed {ra['seed']} and {rb['method']} seed {rb['seed']} come "
                         f"from different feature spaces ({', '.join(FEATURE_SPACE)}: {a} vs {b}); "
                         "evaluate them again with one setting")
    rows = []
    for method in dict.fromkeys(run["method"] for run in runs):
        mine = [run for run in runs if run["method"] == method]
        row = {"method": method, "seeds": len(mine), "seed_list": " ".join(str(run["seed"]) for run in mine),
               **feature_space(mine[0]["metrics"])}
        for col in COLUMNS:
            values = [run["metrics"][col] for run in mine]
            row[col], row[f"{col}_std"] = mean_std(values)
            bootstrapped = f"{col}_lo" in mine[0]["metrics"]
            if len(mine) > 1:
                row[f"{col}_lo"], row[f"{col}_hi"] = t_interval(values)
            else:
                row[f"{col}_lo"], row[f"{col}_hi"] = ((mine[0]["metrics"][f"{col}_lo"], mine[0]["metrics"][f"{col}_hi"])
                                                      if bootstrapped else (None, None))
            if bootstrapped:
                row[f"{col}_boot_se"] = float(np.mean([run["metrics"][f"{col}_se"] for run in mine]))
            if col in WITH_FLOOR:
                row[f"{col}_floor"] = float(np.mean([run["metrics"][f"{col}_floor"] for run in mine]))
        rows.append(row)
    return rows


def per_class_rows(runs: list[dict], manifest: dict) -> list[dict]:
    """One row per class, head to tail: its training count, the real floor of its FID, and per
    method the mean and std over seeds of its FID and accuracy."""
    rows = []
    methods = list(dict.fromkeys(run["method"] for run in runs))
    for c in head_to_tail(manifest["class_counts"]):
        row = {"class": c, "name": manifest["class_names"][c], "train_count": manifest["class_counts"][c],
               "fid_floor": float(np.mean([run["metrics"]["per_class"]["fid_floor"][c] for run in runs]))}
        for method in methods:
            for key in ("fid", "acc"):
                row[f"{method}.{key}"], row[f"{method}.{key}_std"] = mean_std(
                    [run["metrics"]["per_class"][key][c] for run in runs if run["method"] == method])
        rows.append(row)
    return rows


def per_class_fid_rows(per_class: list[dict], methods: list[str]) -> list[dict]:
    """`per_class_rows` in long form, a row per (class, method), head to tail: the per-class FID's
    DVC plot (one colour per method needs the method as a field)."""
    return [{"class": r["class"], "name": r["name"], "train_count": r["train_count"], "method": m,
             "fid": r[f"{m}.fid"], "fid_std": r[f"{m}.fid_std"]} for r in per_class for m in methods]


def training_loss_rows(histories: list[dict], manifest: dict) -> list[dict]:
    """The training logs in long form: a row per (method, logged step, class), head to tail, with the
    class's training loss of that window (history's `loss_class_<c>`) and the total `loss`, both mean
    over seeds. histories: {"method", "seed", "rows"}, rows as read from history.csv. Steps every
    seed of a method logged."""
    rows = []
    for method in dict.fromkeys(h["method"] for h in histories):
        logs = [{int(float(r["step"])): r for r in h["rows"]} for h in histories if h["method"] == method]
        for step in sorted(set.intersection(*(set(log) for log in logs))):
            total = float(np.mean([float(log[step]["loss"]) for log in logs]))
            for c in head_to_tail(manifest["class_counts"]):
                rows.append({"method": method, "step": step, "class": c, "name": manifest["class_names"][c],
                             "train_count": manifest["class_counts"][c], "loss": total,
                             "class_loss": float(np.mean([float(log[step][f"loss_class_{c}"]) for log in logs]))})
    return rows


def to_csv(rows: list[dict]) -> str:
    buffer = _io.StringIO()
    # Every key of any row, in first-seen order; a row without one leaves its cell empty.
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def experiment_metrics(rows: list[dict]) -> dict:
    """The experiment's metrics for DVC, keyed by method whatever the seeds: {method: {column: mean
    over seeds, column_std, ..., seeds}}, so `dvc exp show` lines up experiments run with other seeds."""
    return {row["method"]: {"seeds": row["seeds"], **{key: row[key] for col in COLUMNS
                                                      for key in (col, f"{col}_std", f"{col}_lo", f"{col}_hi")}}
            for row in rows}


def to_markdown(rows: list[dict], *, experiment: str, manifest: dict, evaluator: dict) -> str:
    """The summary table with what produced it: feature extractor (for Inception its fid_mode and
    weights), data, class split."""
    def cell(row, col):
        digits = decimals(col)
        text = f"{row[col]:.{digits}f}" + (f" ± {row[col + '_std']:.{digits}f}" if row["seeds"] > 1 else "")
        return text + (f" [{row[col + '_lo']:.{digits}f}, {row[col + '_hi']:.{digits}f}]"
                       if row[col + "_lo"] is not None else "")

    counts = manifest["class_counts"]
    lines = [
        f"# {experiment}: summary",
        "",
        f"Features: {describe_features(rows[0])}. Local classifier's test accuracy on real data "
        f"{evaluator.get('test_accuracy', float('nan')):.3f}. FID/KID: lower is better; precision/recall "
        "(k-NN, Kynkaanniemi et al.) and acc (the local classifier's accuracy on generated samples): "
        "higher is better. Mean ± std over seeds and, in brackets, the 95% interval of the mean (Student's t "
        "over seeds; with one seed, the bootstrap interval of the generated set where there is one).",
        f"Training set: {manifest['source']['name']}, {manifest['profile']} profile, imbalance ratio "
        f"{manifest['imbalance_ratio']}, {sum(counts)} images, per-class counts {counts}.",
        "Splits: " + "; ".join(f"{k} = classes {v}" for k, v in manifest["splits"].items()) + ".",
        "",
        "| method | seeds | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {row['seeds']} | " + " | ".join(cell(row, c) for c in COLUMNS) + " |")
    floor = rows[0]  # the same real halves for every method: one floor row
    lines.append("| *real vs real (floor)* | | " + " | ".join(
        f"{floor[c + '_floor']:.{decimals(c)}f}" if c in WITH_FLOOR else "" for c in COLUMNS)
        + " |")
    lines += ["", "The floor row is each distance between two disjoint random halves of the real reference, "
              "each half as large per class as a generated set: values near it cannot be told apart from "
              "real data by this extractor."]
    return "\n".join(lines) + "\n"


PROBES = {"pruning": ("loss_raw", "pruned"), "theta_g": ("loss_full", "theta_g only")}


def probe_rows(probes: list[dict], manifest: dict) -> list[dict]:
    """Per trained method and class, head to tail: the relative loss change of the pruning probe and
    (CM runs) of theta_g against the full model, mean and std over seeds (the probes' JSONs)."""
    rows = []
    for method in dict.fromkeys(p["method"] for p in probes):
        runs = [p["result"] for p in probes if p["method"] == method]
        for c in head_to_tail(manifest["class_counts"]):
            row = {"method": method, "class": c, "count": manifest["class_counts"][c], "seeds": len(runs)}
            for probe in PROBES:
                if runs[0][probe] is not None:
                    row[f"{probe}_change"], row[f"{probe}_change_std"] = mean_std(
                        [r[probe]["relative_change"][c] for r in runs])
                    row[f"{probe}_change_se"] = float(np.mean([r[probe]["relative_change_se"][c] for r in runs]))
            rows.append(row)
    return rows


def _margin_and_spread(entries: list[dict]) -> tuple[float | None, float | None]:
    """Mean over seeds of a group's dominance margin, and its spread: the std over seeds (ddof=1) with
    more than one seed, else the one seed's std over its probe batches; None where undefined."""
    margins = [e["margin"] for e in entries if e["margin"] is not None]
    if not margins:
        return None, None
    if len(entries) == 1:
        return margins[0], entries[0]["margin_batch_std"]
    return float(np.mean(margins)), float(np.std(margins, ddof=1)) if len(margins) > 1 else None


def dominance_rows(probes: list[dict]) -> list[dict]:
    """Per trained method (`seeds`: its runs): the share of parameter matrices the majority dominates,
    `overall`, per block and, for CM runs, per part (W_g, BA), mean over seeds; and for each of these
    groups `<group>.margin`, the graded margin cos(G_all, G_many) - cos(G_all, G_few) of
    cm/probe/dominance.py (mean over the group's matrices), mean over seeds, with `<group>.margin_spread`:
    the std over seeds (ddof=1) when the method has more than one seed, else the one seed's
    margin_batch_std (the std over its probe batches of the per-batch margin)."""
    rows = []
    for method in dict.fromkeys(p["method"] for p in probes):
        runs = [p["result"]["dominance"] for p in probes if p["method"] == method]
        row = {"method": method, "seeds": len(runs),
               "overall": float(np.mean([r["overall"]["fraction"] for r in runs]))}
        row["overall.margin"], row["overall.margin_spread"] = _margin_and_spread([r["overall"] for r in runs])
        for group in ("by_block", "by_part"):
            for key in runs[0][group]:
                shares = [r[group][key]["fraction"] for r in runs if r[group][key]["fraction"] is not None]
                row[key] = float(np.mean(shares)) if shares else None
                row[f"{key}.margin"], row[f"{key}.margin_spread"] = _margin_and_spread([r[group][key] for r in runs])
        rows.append(row)
    return rows


def trend_markdown(trends: list[dict]) -> str:
    """The summary's check that training had converged: the loss's change over the last fifth."""
    lines = ["", "## Training loss over the last fifth of the steps", "",
             "Change of a least-squares line through the logged training loss across the last fifth of the steps, "
             "relative to its mean there, mean over seeds [95% interval]: an interval holding 0 means the loss "
             "was flat, i.e. training had converged as far as these logs can tell.", "",
             "| method | seeds | change | flat |", "|---|---|---|---|"]
    for row in trends:
        interval = f" [{row['lo']:+.1%}, {row['hi']:+.1%}]" if row["lo"] is not None else ""
        flat = {True: "yes", False: "no", None: "–"}[row["flat"]]
        lines.append(f"| {row['method']} | {row['seeds']} | {row['change']:+.1%}{interval} | {flat} |")
    return "\n".join(lines) + "\n"


def quotable(row: dict) -> str:
    """'cm - ddpm, fid_few: -1.18 [-2.01, -0.35], 3 seeds', the interval left out where there is none."""
    digits = decimals(row["metric"])
    text = f"{row['comparison']}, {row['metric']}: {row['difference']:+.{digits}f}"
    if row["lo"] is not None:
        text += f" [{row['lo']:+.{digits}f}, {row['hi']:+.{digits}f}]"
    return text + f", {row['seeds']} seed{'s' if row['seeds'] > 1 else ''}"


def paired_markdown(paired: list[dict], resolve: float) -> str:
    """The summary's paired comparisons, a line per method and metric in words one can quote."""
    if not paired:
        return ""
    baseline = paired[0]["baseline"]
    lines = ["", f"## Against {baseline}, seed by seed", "",
             f"Each method minus {baseline} on the same seeds: the mean difference and its 95% interval (paired "
             "Student's t over seeds; with one seed, normal from the two bootstrap standard errors). **yes**: the "
             f"interval excludes zero. Last column: the seeds a paired comparison needs to resolve a difference of "
             f"{resolve:.0%} of {baseline}'s value (δ; 95% interval, 80% power), from the spread of these differences.",
             "", "| comparison | excludes 0 | seeds to resolve δ (δ) |", "|---|---|---|"]
    for row in paired:
        if row["seeds"] < 2:
            needed = "needs 2 seeds or more to estimate"
        else:
            needed = str(row["seeds_needed"]) if row["seeds_needed"] is not None else "more than 1000"
        resolved = {True: "**yes**", False: "no", None: "–"}[row["resolved"]]
        lines.append(f"| {quotable(row)} | {resolved} | {needed} ({row['resolve']:.3g}) |")
    return "\n".join(lines) + "\n"


def theta_g_markdown(rows: list[dict]) -> str:
    """Table 7 (left) of the paper: every CM run beside its theta_g-only model (branches dropped),
    FID overall and by many/medium/few, and the change theta_g-only minus full (empty without
    theta_g_only runs)."""
    by_method = {row["method"]: row for row in rows}
    pairs = [(m, f"{m}_gonly") for m in by_method if f"{m}_gonly" in by_method]
    if not pairs:
        return ""
    columns = ["fid", "fid_many", "fid_medium", "fid_few"]
    lines = ["", "## theta_g only against the full model", "",
             "FID of each CM run with its reserved branches merged (full) and dropped (theta_g only, the "
             "paper's Table 7); the change is theta_g only minus full, mean over seeds: a positive change on "
             "the few classes means they relied on the reserved capacity.", "",
             "| method | model | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for full, gonly in pairs:
        for label, name in (("full", full), ("theta_g only", gonly)):
            lines.append(f"| {full} | {label} | " + " | ".join(f"{by_method[name][c]:.2f}" for c in columns) + " |")
        lines.append(f"| {full} | change | " + " | ".join(
            f"{by_method[gonly][c] - by_method[full][c]:+.2f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def probe_markdown(rows: list[dict], dominance: list[dict], manifest: dict, fraction: float) -> str:
    """The probes' section of summary.md: relative loss change by many/medium/few, dominance by block
    and part: the majority-dominated share, then the margin ± its spread (see `dominance_rows`)."""
    splits = manifest["splits"]
    lines = ["", "## Capacity probes", "",
             f"Relative change of each class's diffusion loss, (L_modified - L) / L, averaged over the classes "
             f"of each group: `pruned` zeroes the {fraction:.0%} smallest-|w| weights (paper Fig. 1b), "
             "`theta_g only` drops CM's reserved branches (Table 7). Larger means the group relied more on "
             "what was removed.", "",
             "| method | probe | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for probe, (_, label) in PROBES.items():
            if f"{probe}_change" in mine[0]:
                cells = [np.mean([r[f"{probe}_change"] for r in mine if r["class"] in classes])
                         for classes in splits.values()]
                lines.append(f"| {method} | {label} | " + " | ".join(f"{v:+.3g}" for v in cells) + " |")
    parts = [key for key in dict.fromkeys(k for row in dominance for k in row)
             if "." not in key and key not in ("method", "seeds", "overall")]
    lines += ["", "Share of parameter matrices whose full-batch gradient follows the many classes' gradient "
              "more than the few classes' (cosine; Thm. 2.1 measured):", "",
              "| method | all | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]
    for row in dominance:
        lines.append(f"| {row['method']} | {row['overall']:.2f} | "
                     + " | ".join("" if row.get(k) is None else f"{row[k]:.2f}" for k in parts) + " |")

    def margin(row, key):
        value, spread = row.get(f"{key}.margin"), row.get(f"{key}.margin_spread")
        return "" if value is None else f"{value:+.3f}" + ("" if spread is None else f" ± {spread:.3f}")

    lines += ["", "Margin cos(G_all, G_many) - cos(G_all, G_few), mean over the matrices: 0 when neither group "
              "leads, positive and growing as the many classes' gradient outweighs the few classes' "
              "((rho - 1) / sqrt(rho^2 + 1), towards 1, for orthogonal group gradients of norm ratio rho), so it "
              "still moves where the share has reached 1; ± is the std over seeds, or with one seed the std "
              "over the probe's batches:",
              "", "| method | seeds | all | " + " | ".join(parts) + " |", "|---|---|---|" + "---|" * len(parts)]
    for row in dominance:
        lines.append(f"| {row['method']} | {row['seeds']} | {margin(row, 'overall')} | "
                     + " | ".join(margin(row, k) for k in parts) + " |")
    return "\n".join(lines) + "\n"

