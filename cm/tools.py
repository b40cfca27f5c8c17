"""`python -m cm <tool>`: the commands beside the pipeline's stages. They record, export, compare
and check what the stages made; none of them is a stage of Snakemake's or DVC's pipeline.

    register-dvc      record Snakemake-made outputs in dvc.lock and the DVC cache
    compare           compare finished experiments along one setting
    export-diffusers  a merged fine-tuned model as a diffusers U-Net folder
    lock-diff         a reproduced dvc.lock against the committed one (exit 1 when they differ)
    expected-metrics  the metrics a reproduction on another CPU must reach, with tolerances
    machine           the machine kind that decides the bits of a CPU result
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
from cm.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The tools' subcommands, each with its arguments and function (`func`)."""

    def with_params(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", default=cfg.PARAMS_FILE, help="configuration file (default: params.yaml)")
        p.set_defaults(func=func)
        return p

    p = with_params("register-dvc", cmd_register_dvc, "record Snakemake-made outputs with DVC (dvc commit)")
    p.add_argument("--experiments", nargs="+", required=True,
                   help="experiments whose DVC stages to commit (those not in params.yaml's run are skipped)")
    p.add_argument("--out", required=True, help="the list of committed stages to write (.txt)")
    p = with_params("compare", cmd_compare, "compare finished experiments along one setting (the capacity sweep)")
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
    from cm.checkpoint import load_merged

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
