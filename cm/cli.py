"""`python -m cm <stage>`: one subcommand per pipeline stage, explicit input and output paths.

Snakemake rules and DVC stages call exactly these commands, so the two orchestrators run the same
code on the same paths. Every stage reads and validates params.yaml first; a user mistake ends in
one line on stderr (exit status 2) and no output written.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from cm import config as cfg
from cm import io
from cm.errors import USER_ERRORS, ConfigError, DataError

log = logging.getLogger("cm")


def _setup(args, *, uses_torch: bool = True) -> tuple[dict, dict]:
    """Validate params.yaml, resolve the experiment (and method), pin torch's thread count."""
    params = cfg.load_params(args.params)
    experiment = cfg.experiment(params, args.experiment)
    if getattr(args, "method", None) is not None:
        cfg.check_method(args.method, trained=args.stage == "train")
    if uses_torch:
        import torch

        torch.set_num_threads(args.threads)
    return params, experiment


def _progress() -> bool:
    """Progress bars unless CM_PROGRESS=0 (the tests set it)."""
    return os.environ.get("CM_PROGRESS", "1") != "0"


def cmd_check(args) -> None:
    params = cfg.load_params(args.params)
    print(f"{args.params}: valid; run {params['run']}, methods {params['methods']}, seeds {params['seeds']}")


def cmd_prepare_data(args) -> None:
    from cm.data import build_manifest
    from cm.tracking import log_stage

    params, experiment = _setup(args, uses_torch=False)
    try:
        manifest = build_manifest(experiment["data"])
    except DataError as err:
        raise ConfigError(f"experiments.{args.experiment}.data: {err}") from None
    io.write_json(args.out, manifest)
    log.info("%s: %d images, per-class counts %s", args.out, manifest["num_images"], manifest["class_counts"])
    log_stage(params["tracking"], stage="prepare_data", experiment=args.experiment,
              params={"data": experiment["data"]},
              metrics={"num_images": manifest["num_images"], "num_classes": manifest["num_classes"]},
              artifacts=[args.out])


def cmd_train_evaluator(args) -> None:
    from cm.evaluate import train_evaluator
    from cm.tracking import log_stage

    params, experiment = _setup(args)
    report = train_evaluator(experiment=experiment, out=args.out, report_out=args.report,
                             device=_device(params), progress=_progress())
    log.info("local feature network: test accuracy %.4f", report["test_accuracy"])
    log_stage(params["tracking"], stage="train_evaluator", experiment=args.experiment,
              params=experiment["evaluate"], metrics=report, artifacts=[args.report])


def cmd_reference_features(args) -> None:
    from cm.evaluate import reference_features
    from cm.tracking import log_stage

    params, experiment = _setup(args)
    info = reference_features(experiment=experiment, evaluator=args.evaluator, out=args.out,
                              stats_out=args.stats_out, device=_device(params))
    log_stage(params["tracking"], stage="reference_features", experiment=args.experiment, metrics=info)


def cmd_train(args) -> None:
    from cm.method_names import param_sections
    from cm.tracking import log_stage
    from cm.train import train

    params, experiment = _setup(args)
    manifest = io.read_json(args.manifest)
    method_params = params["method_params"]
    summary = train(manifest=manifest, experiment=experiment, method_name=args.method,
                    method_params=method_params, seed=args.seed, out=Path(args.out),
                    checkpoint_root=Path(args.checkpoints), history_out=Path(args.history),
                    device=_device(params), progress=_progress())
    history = summary.pop("history")
    log.info("trained %s seed %d: %s", args.method, args.seed, summary)
    log_stage(params["tracking"], stage="train", experiment=args.experiment, method=args.method,
              seed=args.seed, params={"model": experiment["model"], "train": experiment["train"],
                                      "diffusion": experiment["diffusion"],
                                      "method": {s: method_params[s] for s in param_sections(args.method)}},
              metrics=summary, history=history, artifacts=[args.history])


def cmd_merge(args) -> None:
    from cm.merge import merge
    from cm.method_names import MERGE_ONLY
    from cm.tracking import log_stage

    params, _ = _setup(args)
    report = merge(args.model, args.out, drop_branches=args.method in MERGE_ONLY)
    log.info("merged %s -> %s: %s", args.model, args.out, report)
    log_stage(params["tracking"], stage="merge", experiment=args.experiment, method=args.method,
              seed=args.seed, metrics=report)


def cmd_sample(args) -> None:
    from cm.sample import sample
    from cm.tracking import log_stage

    params, experiment = _setup(args)
    info = sample(merged_path=args.model, out=args.out, experiment=experiment, seed=args.seed,
                  device=_device(params), progress=_progress())
    log.info("sampled %s seed %d: %s", args.method, args.seed, info)
    log_stage(params["tracking"], stage="sample", experiment=args.experiment, method=args.method,
              seed=args.seed, params=experiment["sample"], metrics=info)


def cmd_evaluate(args) -> None:
    from cm.evaluate import evaluate
    from cm.tracking import log_stage

    params, experiment = _setup(args)
    metrics = evaluate(samples=args.samples, evaluator=args.evaluator, reference=args.reference,
                       stats=args.stats, features_out=args.features_out,
                       manifest=io.read_json(args.manifest), experiment=experiment, out=args.out,
                       device=_device(params))
    log.info("%s seed %d: fid %.3f (floor %.3f), kid %.4f, fid_few %.3f (floor %.3f)", args.method, args.seed,
             metrics["fid"], metrics["fid_floor"], metrics["kid"], metrics["fid_few"], metrics["fid_few_floor"])
    per_class = metrics.pop("per_class")
    log_stage(params["tracking"], stage="evaluate", experiment=args.experiment, method=args.method,
              seed=args.seed, params=experiment["evaluate"],
              metrics={**{k: v for k, v in metrics.items() if not isinstance(v, list)},
                       **{f"fid_class_{c}": v for c, v in enumerate(per_class["fid"])}},
              artifacts=[args.out])


def cmd_report(args) -> None:
    from cm.method_names import evaluated_methods
    from cm.report import write_report
    from cm.tracking import log_stage

    params, _ = _setup(args)
    # Snakemake passes its selection (which --config may change); DVC's is params.yaml's.
    methods, seeds = args.methods or evaluated_methods(params), args.seeds or params["seeds"]
    runs = [{"method": m, "seed": s, "metrics": io.read_json(Path(args.metrics_dir) / m / f"seed{s}.json")}
            for m in methods for s in seeds]
    # The grid of a method shows its first seed.
    grids = {m: Path(args.samples_dir) / m / f"seed{seeds[0]}" / "samples.npz" for m in methods}
    out_dir = Path(args.out_dir)
    rows = write_report(experiment=args.experiment, runs=runs, samples=grids,
                        manifest=io.read_json(args.manifest), evaluator=io.read_json(args.evaluator_report),
                        out_dir=out_dir)
    print((out_dir / "summary.md").read_text())
    log_stage(params["tracking"], stage="report", experiment=args.experiment,
              metrics={f"{row['method']}.{k}": v for row in rows for k, v in row.items()},
              artifacts=[out_dir / "summary.csv", out_dir / "per_class.csv", out_dir / "summary.md",
                         *sorted((out_dir / "grids").glob("*.png"))])


def cmd_register_dvc(args) -> None:
    """Record outputs made by Snakemake in dvc.lock and the DVC cache (`dvc commit`)."""
    from cm.pipeline import dvc_stage_names

    params = cfg.load_params(args.params)
    # dvc.yaml's stages follow params.yaml's run list, which `snakemake --config` does not change.
    missing = [name for name in args.experiments if name not in params["run"]]
    if missing:
        log.warning("%s not in params.yaml's run list, so dvc.yaml has no stages for them; their "
                    "outputs are not registered with DVC", ", ".join(missing))
    stages = [stage for name in args.experiments if name in params["run"]
              for stage in dvc_stage_names(params, name)]
    if stages:
        subprocess.run(["dvc", "commit", "--force", "--quiet", *stages], check=True,
                       env={**os.environ, "DVC_NO_ANALYTICS": "1"})
        log.info("registered %d DVC stages", len(stages))
    io.write_text(args.out, "".join(f"{stage}\n" for stage in stages))


def _device(params: dict) -> str:
    from cm.train import resolve_device

    return str(resolve_device(params["device"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name, func, help_text, *, experiment=True, run=False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default=cfg.PARAMS_FILE, help="configuration file (default: params.yaml)")
        p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for torch")
        if experiment:
            p.add_argument("--experiment", required=True, help="a key of params.yaml's experiments")
        if run:
            p.add_argument("--method", required=True)
            p.add_argument("--seed", type=int, required=True)
        p.set_defaults(func=func)
        return p

    stage("check", cmd_check, "validate params.yaml and exit", experiment=False)
    p = stage("prepare-data", cmd_prepare_data, "build the long-tailed set and write its manifest")
    p.add_argument("--out", required=True)
    p = stage("train-evaluator", cmd_train_evaluator, "train the local feature network on balanced real data")
    p.add_argument("--out", required=True)
    p.add_argument("--report", required=True)
    p = stage("reference-features", cmd_reference_features,
              "features and per-class statistics of the full balanced real set")
    p.add_argument("--evaluator", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stats-out", required=True)
    p = stage("train", cmd_train, "train one method with one seed (resumes from checkpoints)", run=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--history", required=True)
    p.add_argument("--checkpoints", required=True, help="folder kept across runs for resuming")
    p = stage("merge", cmd_merge, "fold low-rank branches into plain U-Net weights", run=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p = stage("sample", cmd_sample, "class-balanced generation from a merged model", run=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p = stage("evaluate", cmd_evaluate, "FID/KID/accuracy, overall, per class, many/medium/few", run=True)
    for name in ("samples", "evaluator", "reference", "stats", "manifest", "out", "features-out"):
        p.add_argument(f"--{name}", required=True)
    p = stage("report", cmd_report, "summary tables and sample grids of one experiment")
    p.add_argument("--metrics-dir", required=True, help="holds <method>/seed<seed>.json per run")
    p.add_argument("--samples-dir", required=True, help="holds <method>/seed<seed>/samples.npz per run")
    p.add_argument("--manifest", required=True)
    p.add_argument("--evaluator-report", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--methods", nargs="+", help="models to report (default: params.yaml's methods + theta_g_only)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds to report (default: params.yaml's seeds)")
    p = stage("register-dvc", cmd_register_dvc, "record Snakemake-made outputs with DVC (dvc commit)",
              experiment=False)
    p.add_argument("--experiments", nargs="+", required=True)
    p.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except USER_ERRORS as err:  # the user's to act on: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
