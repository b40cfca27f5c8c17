"""Experiments compared along one setting (the capacity sweep: FID of the few and the many classes
against the U-Net's width): a table and a figure from the experiments' report/summary.csv."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cm import config as cfg
from cm import io
from cm.errors import ConfigError, DataError
from cm.report.figures import pyplot, save_figure
from cm.report.tables import to_csv

COLUMNS = ["fid", "fid_many", "fid_medium", "fid_few"]
OUTPUTS = ("summary.csv", "summary.md", "sweep.png")


def setting(experiment: dict, key: str):
    """The value of a dotted key of an experiment, e.g. `model.ch` (a preset name gives no width)."""
    value = experiment
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"--x {key}: the experiment has no setting {part!r} here ({value!r})")
        value = value[part]
    if isinstance(value, dict):
        raise ConfigError(f"--x {key} is a block, not a value: name one of "
                          + ", ".join(f"{key}.{name}" for name in value))
    return value


def _number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def check_seeds(summaries: dict[str, list[dict]]) -> None:
    """Experiments compared side by side must have run the same seeds; one line naming them if not."""
    seeds = {}
    for name, rows in summaries.items():
        if any("seed_list" not in row for row in rows):
            raise DataError(f"results/{name}/report/summary.csv has no seed_list column (an older report): "
                            f"run the experiment's report stage again")
        seeds.update({(name, row["method"]): row["seed_list"] for row in rows})
    first, a = next(iter(seeds.items()), (None, None))
    for other, b in seeds.items():
        if b != a:
            raise ConfigError(f"--experiments: {first[0]} ({first[1]}) ran seeds [{a}], {other[0]} ({other[1]}) "
                              f"seeds [{b}]; a comparison needs the same seeds in every experiment and method "
                              f"(run them with --config 'seeds=[...]' alike)")


def sweep_rows(experiments: dict[str, dict], summaries: dict[str, list[dict]], x: str) -> list[dict]:
    """A row per (experiment, method), experiments ordered by their value of `x`: mean, std and 95%
    interval (as the report made it) over seeds of FID overall, many, medium and few, and the gap
    few minus many (its spread over seeds is not recoverable from the means; the gap of the means
    is reported)."""
    rows = []
    for name in sorted(experiments, key=lambda n: setting(experiments[n], x)):
        for row in summaries[name]:
            out = {"experiment": name, x: setting(experiments[name], x), "method": row["method"],
                   "seeds": int(row["seeds"]), "seed_list": row["seed_list"]}
            for col in COLUMNS:
                out[col], out[f"{col}_std"] = float(row[col]), float(row[f"{col}_std"])
                out[f"{col}_lo"], out[f"{col}_hi"] = _number(row[f"{col}_lo"]), _number(row[f"{col}_hi"])
            out["gap_few_many"] = out["fid_few"] - out["fid_many"]
            rows.append(out)
    return rows


def sweep_markdown(rows: list[dict], x: str) -> str:
    """The table: mean ± std over seeds [95% interval] of each FID, and the gap few - many."""
    def cell(r, col):
        text = f"{r[col]:.2f} ± {r[col + '_std']:.2f}"
        return text + (f" [{r[col + '_lo']:.2f}, {r[col + '_hi']:.2f}]" if r[col + "_lo"] is not None else "")

    lines = [f"| {x} | method | seeds | FID | FID many | FID few | few - many |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[x]} | {r['method']} | {r['seeds']} | {cell(r, 'fid')} | {cell(r, 'fid_many')} | "
                     f"{cell(r, 'fid_few')} | {r['gap_few_many']:+.2f} |")
    return "\n".join(lines) + "\n"


def sweep_figure(rows: list[dict], x: str, path: Path, title: str) -> None:
    """FID of the many and of the few classes against `x`, a line per method (error bars: the 95%
    interval, or the std over seeds where a report has none), and the gap few minus many."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        xs = [r[x] for r in mine]
        for ax, col in zip(axes[:2], ("fid_many", "fid_few")):
            bars = [(r[col] - r[f"{col}_lo"], r[f"{col}_hi"] - r[col]) if r[f"{col}_lo"] is not None
                    else (r[f"{col}_std"],) * 2 for r in mine]
            ax.errorbar(xs, [r[col] for r in mine], yerr=list(zip(*bars)), marker="o", ms=3, capsize=2, label=method)
        axes[2].plot(xs, [r["gap_few_many"] for r in mine], marker="o", ms=3, label=method)
    for ax, label in zip(axes, ("FID, many classes", "FID, few classes", "FID few - FID many")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r[x] for r in rows}), [str(v) for v in sorted({r[x] for r in rows})])
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def compare(params: dict, names: list[str], x: str, out_dir: str | Path, results: str | Path = "results") -> list[dict]:
    """summary.csv, summary.md and sweep.png under `out_dir` for the experiments `names`, each read
    from `<results>/<name>/report/summary.csv` (run them first)."""
    experiments = {name: cfg.experiment(params, name) for name in names}
    out_dir = Path(out_dir)
    owned = _pipeline_folder(out_dir, params, results)
    if owned is not None:
        raise ConfigError(f"--out-dir {out_dir} is inside {owned}, which the pipeline's stages write (Snakemake and "
                          "DVC own its files): name a folder of its own, e.g. results/capacity_sweep")
    summaries = {}
    for name in names:
        path = Path(results) / name / "report" / "summary.csv"
        if not path.is_file():
            raise DataError(f"{path} does not exist: run the experiment {name!r} first "
                            f"(snakemake --cores all --config 'run=[{','.join(names)}]')")
        summaries[name] = io.read_csv(path)
    check_seeds(summaries)
    rows = sweep_rows(experiments, summaries, x)
    # Every file made in a scratch folder first, then moved in: a failure leaves out_dir as it was.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as scratch:
        scratch = Path(scratch)
        io.write_text(scratch / "summary.csv", to_csv(rows))
        io.write_text(scratch / "summary.md", sweep_markdown(rows, x))
        sweep_figure(rows, x, scratch / "sweep.png",
                     title=f"{', '.join(names)}: FID against {x} (mean and 95% interval over seeds)")
        out_dir.mkdir(exist_ok=True)
        for name in OUTPUTS:
            os.replace(scratch / name, out_dir / name)
    return rows


def _pipeline_folder(out_dir: Path, params: dict, results: str | Path) -> Path | None:
    """The experiment folder of `results` that holds out_dir, if any: every stage writes under
    <results>/<experiment>/, so none of it is a comparison's to write."""
    target = out_dir.resolve()
    for name in params["experiments"]:
        folder = (Path(results) / name).resolve()
        if target == folder or folder in target.parents:
            return Path(results) / name
    return None
