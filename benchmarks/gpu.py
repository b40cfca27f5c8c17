"""GPU benchmark of the training loop and the sampler, on random CIFAR-shaped data.

    bash benchmarks/gpu.sh [--budget-s 330] [--batches 64 128] [--timed-steps 20] [--warmup-steps 5]
    bash benchmarks/gpu.sh --smoke      # every part at toy sizes on the CPU; the figures mean nothing

No data set is read and nothing is downloaded: the images are random uint8-like 3x32x32 tensors
scaled to [-1, 1], the labels random over 10 classes, the class counts CIFAR-10-LT's (5000 .. 50).
On the `ddpm_cifar` U-Net (35.7 M parameters) it measures:

  1. training steps/s of cm.trainer.Trainer.step (the real loop's step: autocast, clipping, Adam,
     EMA) at batch 64 and 128 for ddpm, cm (two passes), cm with the shared encoder, cm+oc and
     cbdm, each in fp32, bf16 and bf16 + torch.compile, with the peak GPU memory of each
     configuration; compile time is printed on its own, outside steps/s;
  2. guided DDIM-50 images/s (guidance 1.5, batch 1000) of the merged plain U-Net in fp32, bf16
     and bf16 + compile, and the projected time of 50,000 samples;
  3. the projected wall time of the paper's budgets (200k and 300k steps) at batch 64 and 128;
  4. 2-GPU scaling: DDP steps/s under torchrun with the same global batch (the first of
     --batches), bf16 + compile, against 1 GPU (skipped with fewer than 2 GPUs);
  5. host synchronisations flagged by torch.cuda.set_sync_debug_mode("warn") in Trainer.step
     between two log reads (expected 0), also for cm+cbdm in the shared-encoder mode.

Order (`training_plan`): what matters most runs first, and a time guard (--budget-s, default 330 s)
skips what would not fit, with a note, so a run ends within 6 minutes on one H100/H200; a watchdog
prints what was measured and ends the run should one configuration overrun by far.

  a. ddpm batch 64 fp32: the baseline;
  b. bf16 + compile at batch 64: ddpm, then cm (two new compiles of the U-Net's encode and decode,
     forward and backward: 1-3 minutes each on a 35.7 M U-Net), then cm:shared_encoder and cm+oc,
     which reuse cm's graphs (Dynamo's cache is kept between rows; only shapes and the network's
     structure decide), then cbdm (new graphs for its doubled batch);
  c. the host-synchronisation check; bf16 eager at batch 64; DDIM in fp32 and bf16; DDP;
  d. fp32 at batch 64; batch 128 in bf16, fp32, then bf16 + compile (new shapes: new compiles);
     DDIM with compile.

A 6-minute run (330 s budget) on one H100/H200 is expected to cover a and b up to cm+oc, and some
of c when the compiles take under 2 minutes each (an estimate: no GPU has run this yet); the
guard records each kind's measured time and skips the rest with a note. --budget-s longer, where
the lease allows, measures the rest.

--smoke runs every part on the CPU at toy sizes (preset `tiny`, 8x8 images, batch 4, 2 timed
steps, DDIM over 2 steps, torch.compile with Dynamo's `eager` backend, the DDP worker as 2 gloo
processes under torchrun): tests/test_gpu_benchmark.py runs it so that this script cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from gpu_env import cuda_problem  # this script's folder is first on sys.path

from cm import accel, distributed
from cm.data.images import scale
from cm.data.profiles import exponential_counts
from cm.diffusion import GaussianDiffusion
from cm.method_names import parse_method
from cm.methods import PARAM_DEFAULTS, build_method
from cm.models import build_unet
from cm.trainer import Trainer

NUM_CLASSES, CHANNELS = 10, 3
CLASS_COUNTS = exponential_counts(5000, NUM_CLASSES, 100)  # CIFAR-10-LT, imbalance ratio 100
LR = 2e-4
TRAIN_CFG = {"lr": LR, "grad_clip": 1.0, "ema_decay": 0.9999, "label_drop": 0.1, "channels_last": False,
             "adam": "auto"}
# Table label -> (method name, method_params.cm.passes).
METHODS = {"ddpm": ("ddpm", "two"), "cm": ("cm", "two"), "cm:shared_encoder": ("cm", "shared_encoder"),
           "cm+oc": ("cm+oc", "two"), "cbdm": ("cbdm", "two")}
# Table label -> (precision setting, torch.compile).
PRECISIONS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True)}
PAPER_STEPS = (200_000, 300_000)
PAPER_SAMPLES = 50_000
DDIM_STEPS, GUIDANCE = 50, 1.5
DDP_METHODS = ("ddpm", "cm")
DDP_PRECISION = "bf16+compile"
# Checked for host synchronisations besides METHODS: CBDM's batched pair under the shared encoder.
SYNC_ONLY = {"cm+cbdm:shared_encoder": ("cm+cbdm", "shared_encoder")}
DDP_TAG = "DDP_RESULT "
# Until a configuration of a kind has been measured, the guard assumes these seconds for it (GPU).
# train+compile: a row that compiles new graphs (1-3 min on a 35.7 M U-Net); train+compiled: one that
# reuses graphs an earlier row compiled; ddp: two ranks compiling at once, then timing.
GUESS_S = {"train": 20.0, "train+compile": 150.0, "train+compiled": 30.0, "sync": 10.0, "ddim": 40.0,
           "ddim+compile": 150.0, "ddp": 240.0}
SMOKE_GUESS_S = dict.fromkeys(GUESS_S, 5.0)
# A step already running when the budget ends may overrun it; past this the watchdog ends the run.
WATCHDOG_GRACE_S = 20.0
# Dynamo's cache is kept across rows (graphs are reused); each encode/decode variant (batch shape,
# labels or none, branches on or off, grad mode) is one entry, more than the default limit of 8.
RECOMPILE_LIMIT = 64
# Inductor's C++ build of the U-Net takes minutes on 2 CPU cores; the smoke run compiles with Dynamo
# alone (graph capture, guards, recompiles), which exercises the same code path in seconds.
SMOKE_COMPILE_BACKEND = "eager"


@dataclass(frozen=True)
class Sizes:
    """What one run measures on: the full GPU sizes, or the smoke run's toy ones."""

    smoke: bool
    device: torch.device
    preset: str
    image_size: int
    batches: tuple[int, ...]
    warmup: int
    timed: int
    ddim_batch: int
    ddim_timed_steps: int
    sync_steps: int
    compile_backend: str | None  # None: torch.compile's default (Inductor)


@dataclass
class TrainRow:
    method: str
    batch: int
    precision: str
    steps_per_s: float | None = None
    peak_bytes: int | None = None
    compile_s: float | None = None
    note: str = ""


@dataclass
class SampleRow:
    precision: str
    images_per_s: float | None = None
    batch_s: float | None = None
    peak_bytes: int | None = None
    compile_s: float | None = None
    note: str = ""


@dataclass
class Report:
    sizes: Sizes
    train: list[TrainRow] = field(default_factory=list)
    sample: list[SampleRow] = field(default_factory=list)
    ddp: list[dict] = field(default_factory=list)
    ddp_note: str = ""
    sync: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    compiled: set = field(default_factory=set)  # graphs compiled so far (see `compiled_graphs`)


class Budget:
    """Wall-clock budget of the run, and the cost of each kind of configuration seen so far."""

    def __init__(self, seconds: float, guesses: dict[str, float]):
        self.seconds, self.start, self.last = seconds, time.perf_counter(), dict(guesses)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def skip_note(self, kind: str) -> str | None:
        """Why a configuration of `kind` must be skipped, or None when it fits."""
        need = self.last[kind]
        if self.left() >= need:
            return None
        return f"skipped: time budget ({max(0.0, self.left()):.0f} s left, ~{need:.0f} s needed)"

    def record(self, kind: str, seconds: float) -> None:
        self.last[kind] = seconds


def progress(budget: Budget, text: str) -> None:
    print(f"[{budget.elapsed():6.1f} s] {text}", flush=True)


# ----------------------------------------------------------------------------- device helpers

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():  # the slowest rank decides a DDP step's time
        dist.barrier()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def release_memory(device: torch.device) -> None:
    """Free the last configuration's tensors, so that they do not count in the next one's peak.
    Dynamo's cache stays: a later network of the same structure and shapes reuses its graphs (its
    guards do not keep an earlier network alive)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def compile_backend(backend: str | None):
    """torch.compile's backend while a network is prepared: cm.accel reads CM_COMPILE_BACKEND then
    (the compiled wrappers keep it); None leaves the environment's choice (default inductor)."""
    if backend is None:
        yield
        return
    saved = os.environ.get("CM_COMPILE_BACKEND")
    os.environ["CM_COMPILE_BACKEND"] = backend
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CM_COMPILE_BACKEND"]
        else:
            os.environ["CM_COMPILE_BACKEND"] = saved


def random_batch(batch: int, sizes: Sizes, device: torch.device, seed: int = 0):
    """Random uint8-like images scaled to [-1, 1] and random labels, made on the CPU from a seed so
    that every DDP rank holds the same global batch."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, CHANNELS, sizes.image_size, sizes.image_size), generator=gen,
                           dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return scale(images.to(device)), labels.to(device)


# ----------------------------------------------------------------------------- training

def method_params(passes: str) -> dict:
    return {**PARAM_DEFAULTS, "cm": {**PARAM_DEFAULTS["cm"], "passes": passes}}


def build_trainer(label: str, precision_label: str, sizes: Sizes, device: torch.device):
    """The real loop's Trainer for a table row: method, U-Net (with CM's branches), precision."""
    name, passes = {**METHODS, **SYNC_ONLY}[label]
    precision, compiled = PRECISIONS[precision_label]
    accel.configure_backends(precision, device)
    diffusion = GaussianDiffusion(timesteps=1000, beta_start=1e-4, beta_end=0.02)
    method = build_method(name, diffusion=diffusion, train=TRAIN_CFG, all_params=method_params(passes),
                          class_counts=CLASS_COUNTS)
    net = build_unet(sizes.preset, num_classes=NUM_CLASSES, in_channels=CHANNELS, image_size=sizes.image_size)
    method.prepare(net)
    cfg = {**TRAIN_CFG, "precision": precision, "compile": compiled}
    with compile_backend(sizes.compile_backend if compiled else None):
        trainer = Trainer(net, method, cfg, device)
    return trainer, method


@contextlib.contextmanager
def forced_label_drop(method, probability: float):
    """Set the label-drop probability of a method (CM's lives on its base objective)."""
    holders = [m for m in (method, getattr(method, "base", None)) if hasattr(m, "label_drop")]
    saved = [m.label_drop for m in holders]
    for m in holders:
        m.label_drop = probability
    try:
        yield
    finally:
        for m, value in zip(holders, saved):
            m.label_drop = value


def warm_up(trainer, method, x0, y, steps: int, device: torch.device) -> float:
    """One unconditional and one conditional step (each compiles its own graphs, and CBDM's batch
    differs between them), then `steps` ordinary ones; returns the first two steps' seconds."""
    synchronize(device)
    start = time.perf_counter()
    for probability in (1.0, 0.0):
        with forced_label_drop(method, probability):
            trainer.step(x0, y, LR)
    synchronize(device)
    first_s = time.perf_counter() - start
    for _ in range(steps):
        trainer.step(x0, y, LR)
    return first_s


def timed_steps_per_s(trainer, x0, y, steps: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(x0, y, LR)
    synchronize(device)
    return steps / (time.perf_counter() - start)


def measure_training(row: TrainRow, sizes: Sizes) -> None:
    """Fill a row: steps/s over the timed steps, peak memory, compile time."""
    device = sizes.device
    reset_peak_memory(device)
    trainer, method = build_trainer(row.method, row.precision, sizes, device)
    x0, y = random_batch(row.batch, sizes, device)
    first_s = warm_up(trainer, method, x0, y, sizes.warmup, device)
    row.steps_per_s = timed_steps_per_s(trainer, x0, y, sizes.timed, device)
    trainer.read_window()  # the loop's log read: also checks the steps were finite
    row.peak_bytes = peak_memory(device)
    row.compile_s = first_s if PRECISIONS[row.precision][1] else None


COMPILED = "bf16+compile"


Rows = list[tuple[str, int, str]]


def training_plan(batches: tuple[int, ...]) -> tuple[Rows, Rows, Rows]:
    """The training rows (method, batch, precision) in the order they run, in three groups: before
    the sync check, between it and sampling, and after DDP (the module docstring's a-b, c and d)."""
    first, larger = batches[0], batches[1:]
    before = [("ddpm", first, "fp32"),
              *((label, first, COMPILED) for label in ("ddpm", "cm", "cm:shared_encoder", "cm+oc", "cbdm"))]
    middle = [(label, first, "bf16") for label in METHODS]
    after = [*((label, first, "fp32") for label in METHODS if label != "ddpm"),
             *((label, batch, precision) for batch in larger for precision in ("bf16", "fp32", COMPILED)
               for label in METHODS)]
    return before, middle, after


def compiled_graphs(label: str, batch: int) -> set[tuple[str, int]]:
    """What a compiled row's graphs depend on: the network's structure (CM's methods add decoder
    branches) and the batch shapes of its steps (CBDM's conditional steps double the batch)."""
    name, _ = METHODS[label]
    structure = "plain" if parse_method(name).variant is None else "branched"
    return {(structure, batch), (structure, 2 * batch)} if name == "cbdm" else {(structure, batch)}


def run_training(report: Report, budget: Budget, rows: list[tuple[str, int, str]]) -> None:
    sizes = report.sizes
    for label, batch, precision in rows:
        graphs = compiled_graphs(label, batch) if PRECISIONS[precision][1] else set()
        kind = "train" if not graphs else "train+compiled" if graphs <= report.compiled else "train+compile"
        row = TrainRow(label, batch, precision)
        report.train.append(row)
        row.note = run_guarded(report, budget, kind, f"train {label} batch {batch} {precision}",
                               lambda row=row: measure_training(row, sizes),
                               lambda row=row: f"{row.steps_per_s:.2f} steps/s")
        if row.steps_per_s:
            report.compiled |= graphs


def run_guarded(report: Report, budget: Budget, kind: str, what: str, measure, result) -> str:
    """Run one measurement unless the budget forbids it; returns the row's note ("" when measured).
    A failure is noted and the run goes on: one broken configuration must not hide the others."""
    note = budget.skip_note(kind)
    if note:
        progress(budget, f"{what}: {note}")
        return note
    start, note = time.perf_counter(), ""
    try:
        measure()
        progress(budget, f"{what}: {result()}")
    except Exception as err:
        first_line = str(err).splitlines()[0] if str(err) else ""
        note = f"error: {type(err).__name__}: {first_line}"[:120]
        report.failures.append(f"{what}: {note}")
        progress(budget, f"{what}: FAILED\n{traceback.format_exc()}")
    finally:
        release_memory(report.sizes.device)
    budget.record(kind, time.perf_counter() - start)
    return note


# ----------------------------------------------------------------------------- sampling

def measure_sampling(row: SampleRow, sizes: Sizes) -> None:
    """Guided DDIM with the plain U-Net (what a merged checkpoint is), timed over
    `ddim_timed_steps` steps and scaled to 50: every step is the same guided forward pass."""
    device = sizes.device
    precision, compiled = PRECISIONS[row.precision]
    accel.configure_backends(precision, device)
    reset_peak_memory(device)
    net = build_unet(sizes.preset, num_classes=NUM_CLASSES, in_channels=CHANNELS, image_size=sizes.image_size)
    net = net.to(device).eval()
    with compile_backend(sizes.compile_backend if compiled else None):
        accel.prepare_network(net, channels_last=False, compile=compiled)
    diffusion = GaussianDiffusion(timesteps=1000, beta_start=1e-4, beta_end=0.02)
    y = torch.arange(sizes.ddim_batch, device=device) % NUM_CLASSES
    shape = (sizes.ddim_batch, CHANNELS, sizes.image_size, sizes.image_size)
    generator = torch.Generator(device=device).manual_seed(0)

    def run(steps: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        with accel.autocast(precision, device):
            diffusion.ddim_sample(net, y, shape, steps=steps, guidance=GUIDANCE, generator=generator)
        synchronize(device)
        return time.perf_counter() - start

    warm_s = run(min(2, sizes.ddim_timed_steps))  # compiles, and lets cuDNN pick its kernels
    row.batch_s = run(sizes.ddim_timed_steps) * DDIM_STEPS / sizes.ddim_timed_steps
    row.images_per_s = sizes.ddim_batch / row.batch_s
    row.peak_bytes = peak_memory(device)
    row.compile_s = warm_s if compiled else None


def run_sampling(report: Report, budget: Budget, precisions: list[str]) -> None:
    for precision in precisions:
        row = SampleRow(precision)
        report.sample.append(row)
        kind = "ddim+compile" if PRECISIONS[precision][1] else "ddim"
        row.note = run_guarded(report, budget, kind, f"DDIM-{DDIM_STEPS} {precision}",
                               lambda row=row: measure_sampling(row, report.sizes),
                               lambda row=row: f"{row.images_per_s:.1f} images/s")


# ----------------------------------------------------------------------------- host synchronisations

@contextlib.contextmanager
def flagged_syncs(device: torch.device):
    """The warnings torch.cuda.set_sync_debug_mode("warn") raises for each host synchronisation in
    the block (autograd replays those of its backward threads in the caller); None on the CPU,
    where there is nothing to flag."""
    if device.type != "cuda":
        yield None
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, not once per line
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def error_mode_raises(trainer, x0, y, steps: int) -> str:
    """A cross-check that does not rely on warnings reaching Python: in "error" mode the first
    synchronisation raises. Returns its message, or "" when none did."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            trainer.step(x0, y, LR)
    except RuntimeError as err:
        return str(err).splitlines()[0][:80]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return ""


def count_host_syncs(label: str, sizes: Sizes) -> dict:
    """Trainer.step between two log reads, as in the loop; the steps before the first read move
    constants to the device once (a synchronising copy each), so they are not watched."""
    device, batch = sizes.device, sizes.batches[0]
    trainer, method = build_trainer(label, "bf16", sizes, device)
    x0, y = random_batch(batch, sizes, device)
    warm_up(trainer, method, x0, y, 1, device)
    trainer.read_window()
    with flagged_syncs(device) as caught:
        for _ in range(sizes.sync_steps):
            trainer.step(x0, y, LR)
    trainer.read_window()
    if caught is None:
        return {"note": "CPU: no CUDA synchronisations to flag; the steps ran"}
    flagged = [w for w in caught if "synchroniz" in str(w.message)]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in flagged})
    raised = error_mode_raises(trainer, x0, y, 2)
    return {"flagged": len(flagged), "error_mode": "raised" if raised else "none",
            "note": " ".join(where + ([f"(error mode: {raised})"] if raised else []))}


def run_sync_check(report: Report, budget: Budget) -> None:
    sizes = report.sizes
    for label in (*METHODS, *SYNC_ONLY):
        row = {"method": label, "batch": sizes.batches[0], "steps": sizes.sync_steps, "flagged": None,
               "error_mode": None, "note": ""}
        report.sync.append(row)
        note = run_guarded(report, budget, "sync", f"host syncs {label}",
                           lambda row=row, label=label: row.update(count_host_syncs(label, sizes)),
                           lambda row=row: f"flagged {'n/a on the CPU' if row['flagged'] is None else row['flagged']}")
        row["note"] = note or row["note"]


# ----------------------------------------------------------------------------- 2-GPU scaling

def ddp_processes(sizes: Sizes) -> int:
    """2 when the scaling part runs: two GPUs, or two CPU processes (gloo) in the smoke run."""
    if sizes.smoke:
        return 2
    return 2 if torch.cuda.device_count() >= 2 else 0


def launch_ddp(sizes: Sizes, batch: int, precision: str, timeout_s: float, argv: list[str]) -> dict:
    """torchrun of this script's DDP worker; its rank 0 prints one tagged JSON line."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), "--worker-ddp", "--ddp-batch", str(batch),
               "--ddp-precision", precision, *argv]
    # A session of its own: on a timeout the workers go too, not only torchrun.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TimeoutError(f"torchrun did not finish within {timeout_s:.0f} s") from None
    for line in output.splitlines():
        if line.startswith(DDP_TAG):
            return json.loads(line[len(DDP_TAG):])
    raise RuntimeError(f"torchrun exited {proc.returncode} without a result:\n{output[-3000:]}")


def run_ddp(report: Report, budget: Budget, argv: list[str]) -> None:
    sizes = report.sizes
    if not ddp_processes(sizes):
        report.ddp_note = f"skipped: {torch.cuda.device_count()} GPU(s) visible, 2 needed"
        progress(budget, f"2-GPU scaling: {report.ddp_note}")
        return
    batch, precision = sizes.batches[0], DDP_PRECISION
    measured: dict = {}
    report.ddp_note = run_guarded(
        report, budget, "ddp", f"2-process DDP batch {batch} {precision}",
        lambda: measured.update(launch_ddp(sizes, batch, precision, max(30.0, budget.left()), argv)),
        lambda: ", ".join(f"{k} {v:.2f} steps/s" for k, v in measured.items()))
    for label in DDP_METHODS:
        single = next((r.steps_per_s for r in report.train
                       if (r.method, r.batch, r.precision) == (label, batch, precision)), None)
        report.ddp.append({"method": label, "batch": batch, "precision": PRECISIONS[precision][0], "one": single,
                           "two": measured.get(label)})


def ddp_worker(args) -> None:
    """One torchrun rank: DDP steps of each DDP method on this rank's rows of the global batch."""
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    sizes = make_sizes(args)
    device = distributed.init(sizes.device.type)
    sizes = dataclasses.replace(sizes, device=device)
    torch.manual_seed(0)  # every rank draws the same label-drop coins, as in the loop
    rows = distributed.local_rows(args.ddp_batch)
    result = {}
    for label in DDP_METHODS:
        trainer, method = build_trainer(label, args.ddp_precision, sizes, device)
        x0, y = random_batch(args.ddp_batch, sizes, device)  # the same global batch on every rank
        x0, y = x0[rows], y[rows]
        warm_up(trainer, method, x0, y, sizes.warmup, device)
        result[label] = timed_steps_per_s(trainer, x0, y, sizes.timed, device)
        trainer.read_window()
        del trainer
        release_memory(device)
    main = distributed.is_main()
    distributed.shutdown()
    if main:
        print(DDP_TAG + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- output

def table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Aligned plain-text columns: the first `left` columns left-aligned, the others right-aligned;
    a last column named `note` is left-aligned and unpadded."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = []
    for cells in [headers, *rows]:
        parts = []
        for i, (cell, width) in enumerate(zip(cells, widths)):
            if headers[i] == "note":
                parts.append(str(cell))
            else:
                parts.append(str(cell).ljust(width) if i < left else str(cell).rjust(width))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def fmt_bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours}h{minutes:02d}m"


def device_line(sizes: Sizes) -> str:
    if sizes.device.type == "cuda":
        props = torch.cuda.get_device_properties(sizes.device)
        return (f"{torch.cuda.get_device_name(sizes.device)}, {props.total_memory / 2**30:.1f} GiB, "
                f"{torch.cuda.device_count()} GPU(s) visible; CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}")
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} thread(s)); no GPU used"


def print_header(sizes: Sizes, budget_s: float) -> None:
    net = build_unet(sizes.preset, num_classes=NUM_CLASSES, in_channels=CHANNELS, image_size=sizes.image_size)
    params_m = sum(p.numel() for p in net.parameters()) / 1e6
    size = f"{CHANNELS}x{sizes.image_size}x{sizes.image_size}"
    compiler = sizes.compile_backend or os.environ.get("CM_COMPILE_BACKEND", "inductor")
    print("== GPU benchmark: cm training and sampling ==")
    if sizes.smoke:
        print("SMOKE RUN: toy sizes on the CPU; every figure below is meaningless, the run only checks "
              "that each part works")
    print(f"device    {device_line(sizes)}")
    print(f"torch     {torch.__version__}, Python {platform.python_version()}")
    print(f"data      random tensors, no data set: uint8-like {size} images scaled to [-1, 1], "
          f"{NUM_CLASSES} classes, class counts {CLASS_COUNTS[0]}..{CLASS_COUNTS[-1]}")
    print(f"model     {sizes.preset} U-Net, {params_m:.2f} M parameters without CM's branches")
    print(f"timing    per configuration: one unconditional and one conditional step, {sizes.warmup} more "
          f"warm-up step(s), then {sizes.timed} timed steps between device synchronisations")
    print("precision fp32 = float32 with TF32 off; bf16 = bfloat16 autocast, TF32 for what stays float32 "
          "(cm.accel); Adam fused on CUDA")
    print(f"compile   torch.compile backend {compiler}; compile time = the first two steps, not in steps/s"
          + (" (Dynamo only: Inductor's C++ build takes minutes on 2 cores)" if sizes.smoke else ""))
    print(f"budget    {budget_s:.0f} s: fp32 baseline, compiled batch-{sizes.batches[0]} rows, sync check, then the "
          "rest (gpu.py's docstring); what would not fit is skipped with a note", flush=True)


def training_section(report: Report) -> str:
    methods, precisions = list(METHODS), list(PRECISIONS)
    rows = sorted(report.train, key=lambda r: (methods.index(r.method), r.batch, precisions.index(r.precision)))
    body = [[r.method, r.batch, r.precision, fmt(r.steps_per_s),
             fmt(1000 / r.steps_per_s if r.steps_per_s else None, ".1f"),
             fmt(r.steps_per_s * r.batch if r.steps_per_s else None, ".0f"),
             fmt_bytes(r.peak_bytes) if r.steps_per_s else "-", fmt(r.compile_s, ".1f"), r.note] for r in rows]
    head = ["method", "batch", "precision", "steps/s", "ms/step", "img/s", "peak mem", "compile s", "note"]
    return (f"== 1. Training throughput: Trainer.step, {report.sizes.preset} U-Net ==\n"
            + table(head, body))


def sampling_section(report: Report) -> str:
    s = report.sizes
    body = [[r.precision, fmt(r.images_per_s, ".1f"), fmt(r.batch_s, ".2f"),
             fmt_duration(PAPER_SAMPLES / r.images_per_s if r.images_per_s else None),
             fmt_bytes(r.peak_bytes) if r.images_per_s else "-", fmt(r.compile_s, ".1f"), r.note]
            for r in report.sample]
    head = ["precision", "img/s", "s/batch", f"{PAPER_SAMPLES // 1000}k samples", "peak mem", "compile s", "note"]
    return (f"== 2. Guided DDIM-{DDIM_STEPS} sampling: plain U-Net, guidance {GUIDANCE}, batch {s.ddim_batch}, "
            f"timed over {s.ddim_timed_steps} of {DDIM_STEPS} steps ==\n" + table(head, body))


def fastest(report: Report, label: str, batch: int) -> TrainRow | None:
    rows = [r for r in report.train if r.method == label and r.batch == batch and r.steps_per_s]
    return max(rows, key=lambda r: r.steps_per_s, default=None)


def projection_section(report: Report) -> str:
    body = []
    for label in METHODS:
        for batch in report.sizes.batches:
            best = fastest(report, label, batch)
            rate = best.steps_per_s if best else None
            body.append([label, batch, best.precision if best else "-", fmt(rate),
                         *(fmt_duration(steps / rate if rate else None) for steps in PAPER_STEPS)])
    head = ["method", "batch", "fastest precision", "steps/s", *(f"{s // 1000}k steps" for s in PAPER_STEPS)]
    return ("== 3. Projected wall time of the paper's budgets (one GPU, the fastest measured precision; "
            "the paper trains CIFAR at batch 64) ==\n" + table(head, body))


def ddp_section(report: Report) -> str:
    title = f"== 4. 2-GPU scaling: DDP under torchrun, same global batch, {DDP_PRECISION}"
    title += " (smoke: 2 CPU processes, gloo) ==" if report.sizes.smoke else " =="
    if not report.ddp:
        return f"{title}\n{report.ddp_note or 'not run'}"
    body = [[r["method"], r["batch"], r["precision"], fmt(r["one"]), fmt(r["two"]),
             fmt(r["two"] / r["one"] if r["one"] and r["two"] else None), report.ddp_note] for r in report.ddp]
    head = ["method", "global batch", "precision", "1 proc steps/s", "2 procs steps/s", "speed-up", "note"]
    return f"{title}\n" + table(head, body)


def sync_section(report: Report) -> str:
    steps = report.sizes.sync_steps
    body = [[r["method"], r["batch"], r["steps"], "n/a" if r["flagged"] is None else r["flagged"],
             r["error_mode"] or "n/a", r["note"]] for r in report.sync]
    head = ["method", "batch", "steps", "flagged", "error mode", "note"]
    return (f"== 5. Host synchronisations in Trainer.step: set_sync_debug_mode('warn'), {steps} bf16 steps "
            "between two log reads (expected 0); then 2 steps in 'error' mode (expected none raised) ==\n"
            + table(head, body))


def summary_line(report: Report, budget: Budget) -> str:
    measured = [r for r in report.train if r.steps_per_s]
    skipped = sum(r.note.startswith("skipped") for r in report.train)
    best = max(measured, key=lambda r: r.steps_per_s * r.batch, default=None)
    best_text = (f", best {best.method} batch {best.batch} {best.precision} {best.steps_per_s:.2f} steps/s"
                 if best else "")
    samplers = [r for r in report.sample if r.images_per_s]
    fast_sampler = max(samplers, key=lambda r: r.images_per_s, default=None)
    sample_text = (f"DDIM-{DDIM_STEPS} {fast_sampler.images_per_s:.1f} img/s ({fast_sampler.precision}, "
                   f"{PAPER_SAMPLES // 1000}k in {fmt_duration(PAPER_SAMPLES / fast_sampler.images_per_s)})"
                   if fast_sampler else "DDIM not measured")
    speedups = [r["two"] / r["one"] for r in report.ddp if r["one"] and r["two"]]
    ddp_text = f"2-GPU x{max(speedups):.2f}" if speedups else "2-GPU " + (report.ddp_note or "not measured")
    flags = [r["flagged"] for r in report.sync if r["flagged"] is not None]
    raised = sum(r["error_mode"] == "raised" for r in report.sync)
    sync_text = (f"host syncs flagged {sum(flags)}" + (f", error mode raised for {raised} method(s)" if raised else "")
                 if flags else "host syncs n/a")
    mode = "smoke (figures meaningless)" if report.sizes.smoke else torch.cuda.get_device_name(report.sizes.device)
    status = f"{len(report.failures)} FAILED" if report.failures else "ok"
    return (f"summary: {status}; {mode}; training {len(measured)}/{len(report.train)} configurations "
            f"({skipped} skipped for time){best_text}; {sample_text}; {ddp_text}; {sync_text}; "
            f"{budget.elapsed():.0f} s of {budget.seconds:.0f} s")


_printed = threading.Lock()


def print_report(report: Report, budget: Budget, note: str = "") -> bool:
    """The five tables and the summary, once (the watchdog and the normal end may race)."""
    if not _printed.acquire(blocking=False):
        return False
    sections = [training_section(report), sampling_section(report), projection_section(report),
                ddp_section(report), sync_section(report)]
    print("\n" + "\n\n".join(sections) + "\n", flush=True)
    if note:
        print(note)
    for failure in report.failures:
        print(f"FAILED {failure}")
    print(summary_line(report, budget), flush=True)
    return True


def start_watchdog(report: Report, budget: Budget) -> None:
    """If one step overruns the budget by far (a compile that never ends), print what was measured
    and end the process, so the run still ends in time."""
    def expire():
        if print_report(report, budget, f"ABORTED: still running {WATCHDOG_GRACE_S:.0f} s after the budget"):
            os._exit(3)

    timer = threading.Timer(budget.seconds + WATCHDOG_GRACE_S, expire)
    timer.daemon = True
    timer.start()


# ----------------------------------------------------------------------------- main

def make_sizes(args) -> Sizes:
    if args.smoke:
        return Sizes(smoke=True, device=torch.device("cpu"), preset="tiny", image_size=8, batches=(4,),
                     warmup=1, timed=2, ddim_batch=4, ddim_timed_steps=2, sync_steps=2,
                     compile_backend=SMOKE_COMPILE_BACKEND)
    return Sizes(smoke=False, device=torch.device("cuda"), preset="ddpm_cifar", image_size=32,
                 batches=tuple(args.batches), warmup=args.warmup_steps, timed=args.timed_steps,
                 ddim_batch=args.ddim_batch, ddim_timed_steps=args.ddim_timed_steps, sync_steps=20,
                 compile_backend=None)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every part at toy sizes on the CPU")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip what would run past this")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--timed-steps", type=int, default=20)
    parser.add_argument("--ddim-batch", type=int, default=1000)
    parser.add_argument("--ddim-timed-steps", type=int, default=20,
                        help=f"DDIM steps timed, scaled to {DDIM_STEPS} (each step costs the same)")
    parser.add_argument("--worker-ddp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-batch", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-precision", default=DDP_PRECISION, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker_argv(args) -> list[str]:
    """The options a DDP worker needs to rebuild the same sizes."""
    return (["--smoke"] if args.smoke else []) + ["--warmup-steps", str(args.warmup_steps),
                                                  "--timed-steps", str(args.timed_steps)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_ddp:
        ddp_worker(args)
        return 0
    problem = None if args.smoke else cuda_problem()
    if problem:
        print(f"{problem}\nRun on a GPU, or `bash benchmarks/gpu.sh --smoke` for the CPU check.", file=sys.stderr)
        return 2
    sizes = make_sizes(args)
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    if sizes.smoke:  # toy sizes gain nothing from threads; on a shared machine a second one only waits
        torch.set_num_threads(1)
    report, budget = Report(sizes), Budget(args.budget_s, SMOKE_GUESS_S if sizes.smoke else GUESS_S)
    start_watchdog(report, budget)
    print_header(sizes, args.budget_s)
    torch.manual_seed(0)
    before, middle, after = training_plan(sizes.batches)  # the order of the module docstring's a-d
    run_training(report, budget, before)
    run_sync_check(report, budget)
    run_training(report, budget, middle)
    run_sampling(report, budget, ["fp32", "bf16"])
    run_ddp(report, budget, worker_argv(args))
    run_training(report, budget, after)
    run_sampling(report, budget, [COMPILED])
    print_report(report, budget)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
