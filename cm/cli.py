"""`python -m cm <stage>`: one subcommand per pipeline stage, explicit input and output paths.

Snakemake rules and DVC stages call exactly these commands, so the two orchestrators run the same
code on the same paths. Every stage reads and validates params.yaml first; a user mistake ends in
one line on stderr (exit status 2) and no output written.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cm import config as cfg
from cm import io
from cm.errors import USER_ERRORS, ConfigError, DataError
from cm.pipeline import RESOURCES, THREAD_DEPENDENT, threads_key

log = logging.getLogger("cm")

# What BLAS and OpenMP libraries loaded later in the process (scipy's own BLAS) read at load time.
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
# Stages that pick up where a killed run stopped (training checkpoints, finished sample batches).
_RESUMES = ("train", "sample")


def _setup(args, *, uses_torch: bool = True) -> tuple[dict, dict]:
    """Validate params.yaml, resolve the experiment (and method), pin the thread count."""
    params = cfg.load_params(args.params)
    experiment = cfg.experiment(params, args.experiment)
    if getattr(args, "method", None) is not None:
        cfg.check_method(args.method, trained=args.stage == "train")
    _pin_threads(args, params, uses_torch=uses_torch)
    return params, experiment


def stage_threads(args, params: dict) -> int:
    """The thread count a stage computes with: params.yaml's for it, unless --threads overrides it."""
    stage = args.stage.replace("-", "_")
    key = threads_key(stage)
    configured = params["resources"][RESOURCES[stage]]["threads"]
    threads = configured if args.threads is None else args.threads
    if threads < 1:
        raise ConfigError(f"--threads = {threads} is not allowed: must be an integer >= 1")
    if threads != configured and stage in THREAD_DEPENDENT:
        log.warning("--threads %d differs from params.yaml's %s = %d, which Snakemake, DVC and dvc.lock use: "
                    "this run's numbers will not match theirs bit for bit; drop --threads to match them, or "
                    "set %s in params.yaml to change it for every orchestrator", threads, key, configured, key)
    return threads


def _pin_threads(args, params: dict, *, uses_torch: bool) -> None:
    """Compute with the stage's thread count in torch, BLAS and OpenMP, whatever the machine or scheduler."""
    threads = stage_threads(args, params)
    allotted = os.environ.get("OMP_NUM_THREADS")  # Snakemake sets it to the cores it granted the job
    if allotted is not None and allotted != str(threads):
        log.info("OMP_NUM_THREADS=%s ignored: computing with %s = %d, so that the numbers do not depend on "
                 "the scheduler's allotment", allotted, threads_key(args.stage.replace("-", "_")), threads)
    os.environ.update({var: str(threads) for var in _THREAD_ENV})
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)  # BLAS/OpenMP already loaded (numpy's)
    if uses_torch:
        import torch

        torch.set_num_threads(threads)


def _progress() -> bool:
    """Progress bars unless CM_PROGRESS=0 (the tests set it)."""
    return os.environ.get("CM_PROGRESS", "1") != "0"


def cmd_check(args) -> None:
    params = cfg.load_params(args.params)
    print(f"{args.params}: valid; run {params['run']}, methods {params['methods']}, seeds {params['seeds']}")


def cmd_prepare_data(args) -> None:
    from cm.data import build_manifest
    from cm.tracking import stage_run

    params, experiment = _setup(args, uses_torch=False)
    with stage_run(params["tracking"], stage="prepare_data", experiment=args.experiment,
                   params={"data": experiment["data"]}) as run:
        try:
            manifest = build_manifest(experiment["data"])
        except DataError as err:
            raise ConfigError(f"experiments.{args.experiment}.data: {err}") from None
        io.write_json(args.out, manifest)
        log.info("%s: %d images, per-class counts %s", args.out, manifest["num_images"], manifest["class_counts"])
        run.log(metrics={"num_images": manifest["num_images"], "num_classes": manifest["num_classes"]},
                artifacts=[args.out])


def cmd_train_evaluator(args) -> None:
    from cm.evaluate import train_evaluator
    from cm.tracking import stage_run

    params, experiment = _setup(args)
    with stage_run(params["tracking"], stage="train_evaluator", experiment=args.experiment,
                   params=experiment["evaluate"]) as run:
        report = train_evaluator(experiment=experiment, out=args.out, report_out=args.report,
                                 device=_device(params), progress=_progress())
        log.info("local feature network: test accuracy %.4f", report["test_accuracy"])
        run.log(metrics=report, artifacts=[args.report])


def cmd_reference_features(args) -> None:
    from cm.evaluate import reference_features
    from cm.tracking import stage_run

    params, experiment = _setup(args)
    with stage_run(params["tracking"], stage="reference_features", experiment=args.experiment) as run:
        info = reference_features(experiment=experiment, evaluator=args.evaluator, out=args.out,
                                  stats_out=args.stats_out, device=_device(params))
        run.log(metrics=info)


def cmd_pretrain(args) -> None:
    from cm.pretrain import pretrain
    from cm.tracking import stage_run

    params, experiment = _setup(args)
    with stage_run(params["tracking"], stage="pretrain", experiment=args.experiment,
                   params={"finetune": experiment.get("finetune"), "model": experiment["model"]}) as run:
        summary = pretrain(experiment=experiment, out=Path(args.out), checkpoint_root=Path(args.checkpoints),
                           history_out=Path(args.history), device=_device(params), progress=_progress())
        history = summary.pop("history", [])
        log.info("pretrain %s: %s", args.experiment, summary)
        run.log(metrics=summary, history=history)


def cmd_train(args) -> None:
    from cm import distributed
    from cm.method_names import param_sections
    from cm.pipeline import train_processes
    from cm.tracking import stage_run
    from cm.train import train

    params, experiment = _setup(args)
    if experiment.get("finetune") and not args.pretrained:
        raise ConfigError(f"experiment {args.experiment!r} fine-tunes (it has a finetune section): --pretrained "
                          f"must name its pretrain stage's output (results/{args.experiment}/pretrain/model.pt)")
    # resources.train.gpu > 1: the same command again under torchrun, one process per GPU.
    distributed.relaunch_under_torchrun(train_processes(params), params["device"])
    method_params = params["method_params"]
    tracked = {"model": experiment["model"], "train": experiment["train"], "diffusion": experiment["diffusion"],
               "method": {s: method_params[s] for s in param_sections(args.method)}}
    tracking = params["tracking"] if distributed.is_main() else {**params["tracking"], "enabled": False}
    with stage_run(tracking, stage="train", experiment=args.experiment, method=args.method,
                   seed=args.seed, params=tracked) as run:
        manifest = io.read_json(args.manifest)
        try:
            summary = train(manifest=manifest, experiment=experiment, method_name=args.method,
                            method_params=method_params, seed=args.seed, out=Path(args.out),
                            checkpoint_root=Path(args.checkpoints), history_out=Path(args.history),
                            device=_device(params), progress=_progress(),
                            pretrained=Path(args.pretrained) if args.pretrained else None)
        finally:
            distributed.shutdown()
        history = summary.pop("history")
        log.info("trained %s seed %d: %s", args.method, args.seed, summary)
        run.log(metrics=summary, history=history, artifacts=[args.history])


def cmd_merge(args) -> None:
    from cm.merge import merge
    from cm.method_names import MERGE_ONLY
    from cm.tracking import stage_run

    params, _ = _setup(args)
    with stage_run(params["tracking"], stage="merge", experiment=args.experiment, method=args.method,
                   seed=args.seed) as run:
        report = merge(args.model, args.out, drop_branches=args.method in MERGE_ONLY)
        log.info("merged %s -> %s: %s", args.model, args.out, report)
        run.log(metrics=report)


def cmd_sample(args) -> None:
    from cm.sample import sample
    from cm.tracking import stage_run

    params, experiment = _setup(args)
    with stage_run(params["tracking"], stage="sample", experiment=args.experiment, method=args.method,
                   seed=args.seed, params=experiment["sample"]) as run:
        info = sample(merged_path=args.model, out=args.out, experiment=experiment, seed=args.seed,
                      device=_device(params), progress=_progress())
        log.info("sampled %s seed %d: %s", args.method, args.seed, info)
        run.log(metrics=info)


def cmd_evaluate(args) -> None:
    from cm.evaluate import evaluate
    from cm.tracking import stage_run

    params, experiment = _setup(args)
    with stage_run(params["tracking"], stage="evaluate", experiment=args.experiment, method=args.method,
                   seed=args.seed, params=experiment["evaluate"]) as run:
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


def cmd_probe(args) -> None:
    from cm.probe import probe_model
    from cm.tracking import stage_run

    params, experiment = _setup(args)
    with stage_run(params["tracking"], stage="probe", experiment=args.experiment, method=args.method,
                   seed=args.seed, params=experiment["probe"]) as run:
        try:
            result = probe_model(args.model, io.read_json(args.manifest), experiment)
        except ValueError as err:  # a model or settings that do not fit the data: the user's to fix
            raise ConfigError(f"probe {args.method} seed {args.seed}: {err}") from None
        io.write_json(args.out, result)
        dominance = result["dominance"]["overall"]
        log.info("probed %s seed %d: pruning %.0f%% of weights, majority-dominated matrices %s of %s",
                 args.method, args.seed, 100 * experiment["probe"]["fraction"], dominance["majority_dominated"],
                 dominance["defined"])
        run.log(metrics={"majority_dominated_fraction": dominance["fraction"]}, artifacts=[args.out])


def cmd_report(args) -> None:
    from cm.method_names import MERGE_ONLY, evaluated_methods
    from cm.report import REPORT_FILES, write_report
    from cm.tracking import stage_run

    params, _ = _setup(args)
    # Snakemake passes its selection (which --config may change); DVC's is params.yaml's.
    methods, seeds = args.methods or evaluated_methods(params), args.seeds or params["seeds"]
    with stage_run(params["tracking"], stage="report", experiment=args.experiment) as run:
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
                            out_dir=out_dir, probes=probes,
                            probe_fraction=params["experiments"][args.experiment]["probe"]["fraction"],
                            histories=histories)
        print((out_dir / "summary.md").read_text())
        run.log(metrics={f"{row['method']}.{k}": v for row in rows for k, v in row.items()},
                artifacts=[out_dir / name for name in REPORT_FILES] + sorted((out_dir / "grids").glob("*.png")))


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


def cmd_compare(args) -> None:
    from cm.compare import compare

    compare(cfg.load_params(args.params), args.experiments, args.x, args.out_dir, args.results)
    print((Path(args.out_dir) / "summary.md").read_text(), end="")


def cmd_export_diffusers(args) -> None:
    """A merged model of a fine-tuning from a diffusers folder, as a plain diffusers U-Net folder."""
    from cm.merge import load_merged

    net, meta = load_merged(args.merged)
    if not meta["config"].get("diffusers"):
        raise ConfigError(f"{args.merged}: a {meta['method']!r} model of this project's U-Net; only a fine-tuning "
                          f"that started from a diffusers folder (model: diffusers) exports to diffusers")
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"--out {out} exists: nothing is overwritten; remove it or name a new folder")
    from cm.finetune.diffusers_models import save_merged_pretrained

    partial = out.with_name(f".{out.name}.partial")  # renamed when complete: no half-written folder
    shutil.rmtree(partial, ignore_errors=True)
    save_merged_pretrained(net, partial)
    partial.rename(out)
    print(f"{out}: {type(net.unet).__name__} (from_pretrained loads it; the prompts' text encoder is the "
          f"starting pipeline's)")


def _read_yaml_mapping(path: str, what: str, *, required: str | None = None) -> dict:
    """A YAML (or JSON) file that must hold a mapping (with the key `required`): one line otherwise."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: {'is a folder, not' if file.is_dir() else 'no such'} file ({what} expected)")
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise io.CorruptFileError(f"{path}: not {what} ({type(err).__name__})") from None
    if not isinstance(data, dict) or (required is not None and required not in data):
        raise io.CorruptFileError(f"{path}: not {what} (a mapping with '{required or '...'}' expected, found "
                                  f"{type(data).__name__})")
    return data


def cmd_lock_diff(args) -> None:
    """Exit 1, one line per difference, when a reproduced dvc.lock differs from the committed one in
    an input; on the lock's machine kind (`--made-on`) also in a derived entry, on another kind the
    derived ones are reported and `--metrics` checks the default's metrics against their tolerance."""
    from cm.lockdiff import compare_locks, machine_kind, metric_differences

    committed, reproduced = (_read_yaml_mapping(path, "a dvc.lock", required="stages")
                             for path in (args.committed, args.reproduced))
    differences, inputs, derived = compare_locks(committed, reproduced)
    made_on = Path(args.made_on).read_text().strip() if args.made_on else None
    here = machine_kind()
    other_kind = made_on is not None and made_on != here
    metric_lines = []
    if args.metrics:
        expected = _read_yaml_mapping(args.metrics, "an expected-metrics file", required="metrics")
        metric_lines = metric_differences(expected, _read_yaml_mapping(expected["source"], "a report's metrics.json"))
    for line in [d.text for d in differences] + metric_lines:
        print(line, file=sys.stderr)
    differing_inputs = sum(d.kind == "input" for d in differences)
    differing_derived = len(differences) - differing_inputs
    failing = differing_inputs + (0 if other_kind else differing_derived) + len(metric_lines)
    print(f"inputs: {inputs} parameters and dependencies no stage produces compared, "
          + ("all equal" if not differing_inputs else f"{differing_inputs} differ"))
    if not other_kind:
        print(f"derived: {derived} outputs and dependencies on them compared, "
              + ("all the same bytes" if not differing_derived else f"{differing_derived} differ"))
    else:
        print(f"derived: {differing_derived} of {derived} outputs and dependencies on them differ, as floats may on "
              f"another CPU (reported, not failed): the lock was made on '{made_on}', this is '{here}'")
    if args.metrics:
        print(f"metrics: {sum(len(m) for m in expected['metrics'].values())} of {expected['source']} checked "
              f"against {args.metrics} ({expected['tolerance']})")
    if failing:
        print(f"{failing} difference(s) from {args.committed}: not reproduced", file=sys.stderr)
        raise SystemExit(1)


def cmd_expected_metrics(args) -> None:
    """Write the metrics a reproduction of the default must reach on another CPU (lock-diff --metrics)."""
    from cm.lockdiff import expected_metrics, machine_kind

    values = _read_yaml_mapping(args.metrics, "a report's metrics.json")
    spread = _read_yaml_mapping(args.spread, "a report's metrics.json")
    missing = sorted(set(values) - set(spread))
    if missing:
        raise DataError(f"{args.spread}: no seed spread for {', '.join(missing)}; run those methods with several seeds")
    try:
        expected = expected_metrics(values, spread, source=args.metrics, made_on=machine_kind())
    except ValueError as err:
        raise DataError(f"{args.spread}: {err}") from None
    io.write_json(args.out, expected)
    print(f"{args.out}: {expected['tolerance']}")


def cmd_machine(args) -> None:
    from cm.lockdiff import machine_kind

    print(machine_kind())


def _device(params: dict) -> str:
    from cm.train import resolve_device

    return str(resolve_device(params["device"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def stage(name, func, help_text, *, experiment=True, run=False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default=cfg.PARAMS_FILE, help="configuration file (default: params.yaml)")
        rule = name.replace("-", "_")
        if rule in RESOURCES:
            p.add_argument("--threads", type=int, metavar="N",
                           help=f"CPU threads to compute with (default: params.yaml's {threads_key(rule)}, "
                                "as under Snakemake and DVC; another count changes the last bits of the results)")
        if experiment:
            p.add_argument("--experiment", required=True, help="a key of params.yaml's experiments")
        if run:
            p.add_argument("--method", required=True,
                           help="an entry of params.yaml's methods (merge, sample, evaluate: also <method>_gonly, "
                                "the theta_g-only model of one)")
            p.add_argument("--seed", type=int, required=True, help="the training and sampling seed")
        p.set_defaults(func=func)
        return p

    stage("check", cmd_check, "validate params.yaml and exit", experiment=False)
    p = stage("prepare-data", cmd_prepare_data, "build the long-tailed set and write its manifest")
    p.add_argument("--out", required=True, help="the manifest to write (.json)")
    p = stage("train-evaluator", cmd_train_evaluator, "train the local feature network on balanced real data")
    p.add_argument("--out", required=True, help="the feature network's weights to write (.pt)")
    p.add_argument("--report", required=True, help="its held-out accuracy and settings to write (.json)")
    p = stage("reference-features", cmd_reference_features,
              "features and per-class statistics of the full balanced real set")
    p.add_argument("--evaluator", required=True, help="the feature network (train-evaluator's --out)")
    p.add_argument("--out", required=True, help="the reference features to write (.npz)")
    p.add_argument("--stats-out", required=True, help="the per-class reference statistics to write (.npz)")
    p = stage("train", cmd_train, "train one method with one seed (resumes from checkpoints)", run=True)
    p.add_argument("--manifest", required=True, help="the training set's manifest (prepare-data's --out)")
    p.add_argument("--out", required=True, help="the final checkpoint to write (.pt)")
    p.add_argument("--history", required=True, help="the loss history to write (.csv)")
    p.add_argument("--checkpoints", required=True, help="folder kept across runs for resuming")
    p.add_argument("--pretrained", help="the experiment's pretrain output (pretrain's --out); needed to fine-tune")
    p = stage("pretrain", cmd_pretrain, "train the model a fine-tuning experiment starts from (or record that "
              "it trains from scratch)")
    p.add_argument("--out", required=True, help="the pretrained model, or the from-scratch record, to write (.pt)")
    p.add_argument("--history", required=True, help="the pretraining's loss history to write (.csv)")
    p.add_argument("--checkpoints", required=True, help="folder kept across runs for resuming")
    p = stage("merge", cmd_merge, "fold low-rank branches into plain U-Net weights", run=True)
    p.add_argument("--model", required=True, help="a trained checkpoint (train's --out)")
    p.add_argument("--out", required=True, help="the merged U-Net to write (.pt)")
    p = stage("sample", cmd_sample, "class-balanced generation from a merged model", run=True)
    p.add_argument("--model", required=True, help="a merged model (merge's --out)")
    p.add_argument("--out", required=True, help="the images and labels to write (.npz)")
    p = stage("evaluate", cmd_evaluate, "FID/KID/accuracy, overall, per class, many/medium/few", run=True)
    for name, text in (("samples", "generated images and labels (sample's --out)"),
                       ("evaluator", "the feature network (train-evaluator's --out)"),
                       ("reference", "the reference features (reference-features' --out)"),
                       ("stats", "the per-class reference statistics (reference-features' --stats-out)"),
                       ("manifest", "the training set's manifest, for the many/medium/few split"),
                       ("out", "the metrics to write (.json)"),
                       ("features-out", "the generated images' features to write (.npz)")):
        p.add_argument(f"--{name}", required=True, help=text)
    p = stage("probe", cmd_probe, "pruning probe, theta_g probe and gradient dominance of a trained model",
              run=True)
    p.add_argument("--model", required=True, help="a trained checkpoint (train's --out)")
    p.add_argument("--manifest", required=True, help="the training set's manifest (prepare-data's --out)")
    p.add_argument("--out", required=True, help="the probes' results to write (.json)")
    p = stage("report", cmd_report, "summary tables and sample grids of one experiment")
    p.add_argument("--metrics-dir", required=True, help="holds <method>/seed<seed>.json per run")
    p.add_argument("--samples-dir", required=True, help="holds <method>/seed<seed>/samples.npz per run")
    p.add_argument("--probe-dir", required=True, help="holds <method>/seed<seed>.json per trained model")
    p.add_argument("--history-dir", required=True, help="holds <method>/seed<seed>.csv per trained model")
    p.add_argument("--manifest", required=True, help="the training set's manifest (prepare-data's --out)")
    p.add_argument("--evaluator-report", required=True, help="the feature network's report (its accuracy)")
    p.add_argument("--out-dir", required=True, help="folder for summary.csv/.md, per_class.csv and grids/")
    p.add_argument("--methods", nargs="+", help="models to report (default: params.yaml's methods + theta_g_only)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds to report (default: params.yaml's seeds)")
    p = stage("register-dvc", cmd_register_dvc, "record Snakemake-made outputs with DVC (dvc commit)",
              experiment=False)
    p.add_argument("--experiments", nargs="+", required=True,
                   help="experiments whose DVC stages to commit (those not in params.yaml's run are skipped)")
    p.add_argument("--out", required=True, help="the list of committed stages to write (.txt)")
    p = stage("compare", cmd_compare, "compare finished experiments along one setting (the capacity sweep)",
              experiment=False)
    p.add_argument("--experiments", nargs="+", required=True, help="experiments whose reports to compare")
    p.add_argument("--x", required=True, help="the setting they differ in, a dotted key of an experiment (model.ch)")
    p.add_argument("--results", default="results", help="the results folder (default: results)")
    p.add_argument("--out-dir", required=True, help="folder for summary.csv, summary.md and sweep.png")
    p = sub.add_parser("export-diffusers", help="write a merged fine-tuned model as a diffusers U-Net folder",
                       description="Write the plain U-Net of a merged model (merge's --out) of an experiment with "
                                   "model: diffusers with save_pretrained: it replaces unet/ of the starting pipeline.")
    p.add_argument("merged", help="the merged model (results/<exp>/merged/<method>/seed<s>/model.pt)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.set_defaults(func=cmd_export_diffusers, stage="export-diffusers")
    p = sub.add_parser("lock-diff", help="compare a reproduced dvc.lock with the committed one",
                       description="Exit 1, with one line per differing parameter, dependency or output "
                                   "(naming the stage), when a reproduced dvc.lock differs from the committed one.")
    p.add_argument("committed", help="the committed lock (e.g. `git show HEAD:dvc.lock > committed.lock`)")
    p.add_argument("reproduced", help="the lock `dvc repro` wrote (dvc.lock)")
    p.add_argument("--made-on", metavar="FILE",
                   help="the machine kind the committed lock was made on (python -m cm machine's line): on "
                        "another kind, differing outputs are reported but do not fail")
    p.add_argument("--metrics", metavar="FILE",
                   help="expected metrics (python -m cm expected-metrics): each must lie within its tolerance")
    p.set_defaults(func=cmd_lock_diff)
    p = sub.add_parser("expected-metrics", help="write the default's metrics with tolerances from the seed spread",
                       description="Write the metrics a reproduction must reach on any CPU (lock-diff --metrics): "
                                   "the values of --metrics, each with a tolerance from the seed spread of --spread.")
    p.add_argument("--metrics", required=True, help="the committed run's report metrics.json")
    p.add_argument("--spread", required=True, help="the report metrics.json of the same experiment with several seeds")
    p.add_argument("--out", required=True, help="the file to write (.json)")
    p.set_defaults(func=cmd_expected_metrics)
    p = sub.add_parser("machine", help="print the machine kind that decides the bits of a CPU result",
                       description="Print architecture, CPU model, torch's SIMD level and version: dvc.lock's "
                                   "outputs are byte-identical between machines that print the same line.")
    p.set_defaults(func=cmd_machine)
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
