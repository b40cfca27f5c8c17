"""`python -m cm <stage>`: one subcommand per pipeline stage, explicit input and output paths.

Snakemake rules and DVC stages call exactly these commands, so the two orchestrators run the same
code on the same paths. Every stage reads and validates params.yaml first; a user mistake ends in
one line on stderr (exit status 2) and no output written.

`STAGES` wires every stage in one row: its options, the module that computes it, what its MLflow
run logs as parameters, and the call. The set-up they share (params.yaml, the experiment, the
thread count, the MLflow run) is `_run`'s. The tools beside the stages are cm/tools.py's.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cm import config as cfg
from cm import io, tools
from cm.errors import USER_ERRORS, ConfigError, DataError
from cm.pipeline import RESOURCES, threads_key, train_processes
from cm.threads import pin_threads

log = logging.getLogger("cm")

# Stages that pick up where a killed run stopped (training checkpoints, finished sample batches).
_RESUMES = ("train", "sample")


@dataclass(frozen=True)
class Stage:
    """One subcommand of the pipeline."""

    help: str
    run: Callable[..., None]  # (args, params, experiment, MLflow run); for a plain command (args)
    module: str = ""  # the module that computes the stage
    options: tuple[tuple[str, dict], ...] = ()
    per_run: bool = False  # --method and --seed: one model of the experiment
    tracked: Callable[..., dict | None] = lambda args, params, experiment: None  # the MLflow run's params
    uses_torch: bool = True
    validate: Callable[..., None] | None = None  # (args, experiment): a mistake found before anything runs
    torchrun: bool = False  # may run as several processes (resources.train.gpu > 1); rank 0 tracks
    plain: bool = False  # no experiment, thread count or MLflow run: `run(args)` alone


def _opt(flag: str, help_text: str, **kwargs) -> tuple[str, dict]:
    """A stage option, required unless `required=False` is given."""
    return flag, {"required": True, "help": help_text, **kwargs}


def _setup(args, *, uses_torch: bool = True) -> tuple[dict, dict]:
    """Validate params.yaml, resolve the experiment (and method), pin the thread count."""
    params = cfg.load_params(args.params)
    experiment = cfg.experiment(params, args.experiment)
    if getattr(args, "method", None) is not None:
        cfg.check_method(args.method, trained=args.stage == "train")
    pin_threads(args, params, uses_torch=uses_torch)
    return params, experiment


def _progress() -> bool:
    """Progress bars unless CM_PROGRESS=0 (the tests set it)."""
    return os.environ.get("CM_PROGRESS", "1") != "0"


def _device(params: dict) -> str:
    from cm.accel import resolve_device

    return str(resolve_device(params["device"]))


def _run(args) -> None:
    """Run one stage: its module loaded, params.yaml and the experiment checked, the threads pinned,
    then the stage inside its MLflow run."""
    stage = STAGES[args.stage]
    if stage.plain:
        stage.run(args)
        return
    # The stage's module first: the thread pinning then covers the libraries it loaded (threadpoolctl)
    # and, through the environment, those loaded later.
    importlib.import_module(stage.module)
    from cm.tracking import stage_run

    params, experiment = _setup(args, uses_torch=stage.uses_torch)
    if stage.validate is not None:
        stage.validate(args, experiment)
    tracking = params["tracking"]
    if stage.torchrun:
        from cm import distributed

        # resources.train.gpu > 1: the same command again under torchrun, one process per GPU.
        distributed.relaunch_under_torchrun(train_processes(params), params["device"])
        if not distributed.is_main():
            tracking = {**tracking, "enabled": False}
    with stage_run(tracking, stage=args.stage.replace("-", "_"), experiment=args.experiment,
                   method=getattr(args, "method", None), seed=getattr(args, "seed", None),
                   params=stage.tracked(args, params, experiment)) as run:
        stage.run(args, params, experiment, run)


# ----------------------------------------------------------------------------------------------
# The stages' calls


def _check(args) -> None:
    params = cfg.load_params(args.params)
    if args.show:
        print(cfg.shown(params, args.show), end="")
        return
    print(f"{args.params}: valid; run {params['run']}, methods {params['methods']}, seeds {params['seeds']}")


def _prepare_data(args, params, experiment, run) -> None:
    from cm.data import build_manifest

    try:
        manifest = build_manifest(experiment["data"])
    except DataError as err:
        raise ConfigError(f"experiments.{args.experiment}.data: {err}") from None
    io.write_json(args.out, manifest)
    log.info("%s: %d images, per-class counts %s", args.out, manifest["num_images"], manifest["class_counts"])
    run.log(metrics={"num_images": manifest["num_images"], "num_classes": manifest["num_classes"]},
            artifacts=[args.out])


def _train_evaluator(args, params, experiment, run) -> None:
    from cm.evaluate import train_evaluator

    report = train_evaluator(experiment=experiment, out=args.out, report_out=args.report,
                             device=_device(params), progress=_progress())
    log.info("local feature network: test accuracy %.4f", report["test_accuracy"])
    run.log(metrics=report, artifacts=[args.report])


def _reference_features(args, params, experiment, run) -> None:
    from cm.evaluate import reference_features

    info = reference_features(experiment=experiment, evaluator=args.evaluator, out=args.out,
                              stats_out=args.stats_out, device=_device(params))
    run.log(metrics=info)


def _pretrain(args, params, experiment, run) -> None:
    from cm.pretrain import pretrain

    summary = pretrain(experiment=experiment, out=Path(args.out), checkpoint_root=Path(args.checkpoints),
                       history_out=Path(args.history), device=_device(params), progress=_progress())
    history = summary.pop("history", [])
    log.info("pretrain %s: %s", args.experiment, summary)
    run.log(metrics=summary, history=history)


def _needs_pretrained(args, experiment) -> None:
    if experiment.get("finetune") and not args.pretrained:
        raise ConfigError(f"experiment {args.experiment!r} fine-tunes (it has a finetune section): --pretrained "
                          f"must name its pretrain stage's output (results/{args.experiment}/pretrain/model.pt)")


def _train_tracked(args, params, experiment) -> dict:
    from cm.method_names import param_sections

    return {"model": experiment["model"], "train": experiment["train"], "diffusion": experiment["diffusion"],
            "method": {s: params["method_params"][s] for s in param_sections(args.method)}}


def _train(args, params, experiment, run) -> None:
    from cm import distributed
    from cm.train import train

    manifest = io.read_json(args.manifest)
    try:
        summary = train(manifest=manifest, experiment=experiment, method_name=args.method,
                        method_params=params["method_params"], seed=args.seed, out=Path(args.out),
                        checkpoint_root=Path(args.checkpoints), history_out=Path(args.history),
                        device=_device(params), progress=_progress(),
                        pretrained=Path(args.pretrained) if args.pretrained else None)
    finally:
        distributed.shutdown()
    history = summary.pop("history")
    log.info("trained %s seed %d: %s", args.method, args.seed, summary)
    run.log(metrics=summary, history=history, artifacts=[args.history])


def _merge(args, params, experiment, run) -> None:
    from cm.merge import merge
    from cm.method_names import MERGE_ONLY

    report = merge(args.model, args.out, drop_branches=args.method in MERGE_ONLY)
    log.info("merged %s -> %s: %s", args.model, args.out, report)
    run.log(metrics=report)


def _sample(args, params, experiment, run) -> None:
    from cm.sample import sample

    info = sample(merged_path=args.model, out=args.out, experiment=experiment, seed=args.seed,
                  device=_device(params), progress=_progress())
    log.info("sampled %s seed %d: %s", args.method, args.seed, info)
    run.log(metrics=info)


def _evaluate(args, params, experiment, run) -> None:
    from cm.evaluate import evaluate

    metrics = evaluate(samples=args.samples, evaluator=args.evaluator, reference=args.reference,
                       stats=args.stats, features_out=args.features_out,
                       manifest=io.read_json(args.manifest), experiment=experiment, out=args.out,
                       device=_device(params))
    log.info("%s seed %d: fid %.3f (floor %.3f), kid %.4f, fid_few %.3f (floor %.3f)", args.method, args.seed,
             metrics["fid"], metrics["fid_floor"], metrics["kid"], metrics["fid_few"], metrics["fid_few_floor"])
    per_class = metrics.pop("per_class")
    run.log(metrics={**{k: v for k, v in metrics.items() if not isinstance(v, list)},
                     **{f"fid_class_{c}": v for c, v in enumerate(per_class["fid"])}},
            artifacts=[args.out])


def _probe(args, params, experiment, run) -> None:
    from cm.probe import probe_model

    try:
        result = probe_model(args.model, io.read_json(args.manifest), experiment)
    except ValueError as err:  # a model or settings that do not fit the data: the user's to fix
        raise ConfigError(f"probe {args.method} seed {args.seed}: {err}") from None
    io.write_json(args.out, result)
    dominance = result["dominance"]["overall"]
    log.info("probed %s seed %d: pruning %.0f%% of weights, majority-dominated matrices %s of %s",
             args.method, args.seed, 100 * experiment["probe"]["fraction"], dominance["majority_dominated"],
             dominance["defined"])
    run.log(metrics={"majority_dominated_fraction": dominance["fraction"], "dominance_margin": dominance["margin"]},
            artifacts=[args.out])


def _report(args, params, experiment, run) -> None:
    from cm.method_names import MERGE_ONLY, evaluated_methods
    from cm.report import REPORT_FILES, write_report

    # Snakemake passes its selection (which --config may change); DVC's is params.yaml's.
    methods, seeds = args.methods or evaluated_methods(params), args.seeds or params["seeds"]
    runs = [{"method": m, "seed": s, "metrics": io.read_json(Path(args.metrics_dir) / m / f"seed{s}.json")}
            for m in methods for s in seeds]
    # The grid of a method shows its first seed.
    grids = {m: Path(args.samples_dir) / m / f"seed{seeds[0]}" / "samples.npz" for m in methods}
    trained = [(m, s) for m in methods if m not in MERGE_ONLY for s in seeds]
    probes = [{"method": m, "seed": s, "result": io.read_json(Path(args.probe_dir) / m / f"seed{s}.json")}
              for m, s in trained]
    histories = [{"method": m, "seed": s, "rows": io.read_csv(Path(args.history_dir) / m / f"seed{s}.csv")}
                 for m, s in trained]
    out_dir = Path(args.out_dir)
    rows = write_report(experiment=args.experiment, runs=runs, samples=grids,
                        manifest=io.read_json(args.manifest), evaluator=io.read_json(args.evaluator_report),
                        out_dir=out_dir, baseline=args.baseline or params["report"]["baseline"] or methods[0],
                        resolve=params["report"]["resolve"], probes=probes,
                        probe_fraction=params["experiments"][args.experiment]["probe"]["fraction"],
                        histories=histories)
    print((out_dir / "summary.md").read_text())
    run.log(metrics={f"{row['method']}.{k}": v for row in rows for k, v in row.items()},
            artifacts=[out_dir / name for name in REPORT_FILES] + sorted((out_dir / "grids").glob("*.png")))


_MANIFEST = _opt("--manifest", "the training set's manifest (prepare-data's --out)")
_CHECKPOINTS = _opt("--checkpoints", "folder kept across runs for resuming")
_TRAINED = _opt("--model", "a trained checkpoint (train's --out)")
_EVALUATOR = _opt("--evaluator", "the feature network (train-evaluator's --out)")

STAGES: dict[str, Stage] = {
    "check": Stage("validate params.yaml and exit", _check, plain=True, options=(
        _opt("--show", "print this experiment's settings as its stages get them (defaults filled in)",
             required=False, metavar="EXPERIMENT"),)),
    "prepare-data": Stage(
        "build the long-tailed set and write its manifest", _prepare_data, "cm.data", uses_torch=False,
        tracked=lambda a, p, e: {"data": e["data"]},
        options=(_opt("--out", "the manifest to write (.json)"),)),
    "train-evaluator": Stage(
        "train the local feature network on balanced real data", _train_evaluator, "cm.evaluate",
        tracked=lambda a, p, e: e["evaluate"],
        options=(_opt("--out", "the feature network's weights to write (.pt)"),
                 _opt("--report", "its held-out accuracy and settings to write (.json)"))),
    "reference-features": Stage(
        "features and per-class statistics of the full balanced real set", _reference_features, "cm.evaluate",
        options=(_EVALUATOR, _opt("--out", "the reference features to write (.npz)"),
                 _opt("--stats-out", "the per-class reference statistics to write (.npz)"))),
    "train": Stage(
        "train one method with one seed (resumes from checkpoints)", _train, "cm.train", per_run=True,
        tracked=_train_tracked, validate=_needs_pretrained, torchrun=True,
        options=(_MANIFEST, _opt("--out", "the final checkpoint to write (.pt)"),
                 _opt("--history", "the loss history to write (.csv)"), _CHECKPOINTS,
                 _opt("--pretrained", "the experiment's pretrain output (pretrain's --out); needed to fine-tune",
                      required=False))),
    "pretrain": Stage(
        "train the model a fine-tuning experiment starts from (or record that it trains from scratch)", _pretrain,
        "cm.pretrain",
        tracked=lambda a, p, e: {"finetune": e.get("finetune"), "model": e["model"]},
        options=(_opt("--out", "the pretrained model, or the from-scratch record, to write (.pt)"),
                 _opt("--history", "the pretraining's loss history to write (.csv)"), _CHECKPOINTS)),
    "merge": Stage(
        "fold low-rank branches into plain U-Net weights", _merge, "cm.merge", per_run=True,
        options=(_TRAINED, _opt("--out", "the merged U-Net to write (.pt)"))),
    "sample": Stage(
        "class-balanced generation from a merged model", _sample, "cm.sample", per_run=True,
        tracked=lambda a, p, e: e["sample"],
        options=(_opt("--model", "a merged model (merge's --out)"),
                 _opt("--out", "the images and labels to write (.npz)"))),
    "evaluate": Stage(
        "FID/KID/accuracy, overall, per class, many/medium/few", _evaluate, "cm.evaluate", per_run=True,
        tracked=lambda a, p, e: e["evaluate"],
        options=(_opt("--samples", "generated images and labels (sample's --out)"), _EVALUATOR,
                 _opt("--reference", "the reference features (reference-features' --out)"),
                 _opt("--stats", "the per-class reference statistics (reference-features' --stats-out)"),
                 _opt("--manifest", "the training set's manifest, for the many/medium/few split"),
                 _opt("--out", "the metrics to write (.json)"),
                 _opt("--features-out", "the generated images' features to write (.npz)"))),
    "probe": Stage(
        "pruning probe, theta_g probe and gradient dominance of a trained model", _probe, "cm.probe", per_run=True,
        tracked=lambda a, p, e: e["probe"],
        options=(_TRAINED, _MANIFEST, _opt("--out", "the probes' results to write (.json)"))),
    "report": Stage(
        "summary tables and sample grids of one experiment", _report, "cm.report",
        options=(_opt("--metrics-dir", "holds <method>/seed<seed>.json per run"),
                 _opt("--samples-dir", "holds <method>/seed<seed>/samples.npz per run"),
                 _opt("--probe-dir", "holds <method>/seed<seed>.json per trained model"),
                 _opt("--history-dir", "holds <method>/seed<seed>.csv per trained model"), _MANIFEST,
                 _opt("--evaluator-report", "the feature network's report (its accuracy)"),
                 _opt("--out-dir", "folder for summary.csv/.md, per_class.csv and grids/"),
                 _opt("--methods", "models to report (default: params.yaml's methods + theta_g_only)", nargs="+",
                      required=False),
                 _opt("--seeds", "seeds to report (default: params.yaml's seeds)", nargs="+", type=int,
                      required=False),
                 _opt("--baseline", "the method the others are compared with (default: params.yaml's "
                      "report.baseline, else the first method)", required=False))),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        p.add_argument("--params", default=cfg.PARAMS_FILE, help="configuration file (default: params.yaml)")
        rule = name.replace("-", "_")
        if rule in RESOURCES:
            p.add_argument("--threads", type=int, metavar="N",
                           help=f"CPU threads to compute with (default: params.yaml's {threads_key(rule)}, "
                                "as under Snakemake and DVC; another count changes the last bits of the results)")
        if not stage.plain:
            p.add_argument("--experiment", required=True, help="a key of params.yaml's experiments")
        if stage.per_run:
            p.add_argument("--method", required=True,
                           help="an entry of params.yaml's methods (merge, sample, evaluate: also <method>_gonly, "
                                "the theta_g-only model of one)")
            p.add_argument("--seed", type=int, required=True, help="the training and sampling seed")
        for flag, kwargs in stage.options:
            p.add_argument(flag, **kwargs)
        p.set_defaults(func=_run)
    tools.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except USER_ERRORS as err:  # the user's to act on: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: atomic writes left no half-written output, so no traceback
        print(_interrupted(args), file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    return 0


def _interrupted(args) -> str:
    """One line naming the interrupted job and how to finish it."""
    job = " ".join(str(part) for part in (args.stage, getattr(args, "experiment", None),
                                          getattr(args, "method", None)) if part is not None)
    if getattr(args, "seed", None) is not None:
        job += f" seed {args.seed}"
    then = "to resume" if args.stage in _RESUMES else "to redo it (nothing half-written was kept)"
    return f"interrupted: {job}; run the same command again {then}"
