"""The report's figures: a sample grid per method with a row per class head to tail, per-class FID,
training curves and the capacity probes, each a byte-stable 100-dpi PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cm import io
from cm.data.profiles import head_to_tail

BLOCK_ORDER = ["encoder", "middle", "decoder"]


def pyplot():
    """matplotlib's pyplot drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write atomically as a 100-dpi PNG, and free the figure."""
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    pyplot().close(fig)


def grid_canvas(images: np.ndarray, labels: np.ndarray, order: list[int], per_row: int) -> np.ndarray:
    """Row r holds the first `per_row` images of class order[r], with 1-pixel white gaps."""
    h, w, ch = images.shape[1:]
    canvas = np.full((len(order) * (h + 1), per_row * (w + 1), ch), 255, dtype=np.uint8)
    for r, c in enumerate(order):
        for k, img in enumerate(images[labels == c][:per_row]):
            canvas[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = img
    return canvas


def sample_grid(images: np.ndarray, labels: np.ndarray, manifest: dict, path: Path, *, per_row: int = 10,
                title: str = "") -> None:
    """A PNG with one row per class, ordered head to tail by training count."""
    plt = pyplot()
    counts = manifest["class_counts"]
    order = head_to_tail(counts)
    h, w, ch = images.shape[1:]
    canvas = grid_canvas(images, labels, order, per_row)
    scale = 0.6 / h  # inches per pixel: every image about 0.6 inch wide
    fig, ax = plt.subplots(figsize=(per_row * (w + 1) * scale + 1.5, len(order) * (h + 1) * scale + 0.6))
    ax.imshow(canvas.squeeze(-1) if ch == 1 else canvas, cmap="gray" if ch == 1 else None,
              interpolation="nearest")
    names = manifest["class_names"]
    ax.set_yticks([r * (h + 1) + h / 2 for r in range(len(order))],
                  [f"{names[c]} ({counts[c]})" for c in order], fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    for side in ax.spines.values():
        side.set_visible(False)
    save_figure(fig, path)


def probe_figure(rows: list[dict], dominance: list[dict], manifest: dict, path: Path, title: str) -> None:
    """Left: the pruning probe's relative loss change per class, head to tail, a line per method
    (error bars: std over seeds, or the standard error with one seed). Right: the gradient dominance
    margin per block and method (error bars: `margin_spread`, the std over seeds, or over the probe's
    batches with one seed; see tables.dominance_rows)."""
    plt = pyplot()
    order = head_to_tail(manifest["class_counts"])
    names = manifest["class_names"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = {r["class"]: r for r in rows if r["method"] == method}
        spread = "pruning_change_std" if mine[order[0]]["seeds"] > 1 else "pruning_change_se"
        left.errorbar(range(len(order)), [mine[c]["pruning_change"] for c in order],
                      yerr=[mine[c][spread] for c in order], marker="o", ms=3, capsize=2, label=method)
    left.set_xticks(range(len(order)), [f"{names[c]}\n({manifest['class_counts'][c]})" for c in order], fontsize=7)
    left.set_ylabel("relative loss change after pruning")
    left.set_xlabel("class (training count), head to tail")
    left.axhline(0, color="grey", lw=0.5)
    left.legend(fontsize=8)
    width = 0.8 / len(dominance)
    for k, row in enumerate(dominance):
        values = [row.get(f"{b}.margin") for b in BLOCK_ORDER]
        spreads = [row.get(f"{b}.margin_spread") for b in BLOCK_ORDER]
        right.bar([i + k * width for i in range(len(BLOCK_ORDER))], [v or 0.0 for v in values], width=width,
                  yerr=[s or 0.0 for s in spreads], capsize=2, label=row["method"])
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(BLOCK_ORDER))], BLOCK_ORDER)
    right.axhline(0, color="grey", lw=0.5)
    right.set_ylabel("dominance margin, cos(G, G_many) - cos(G, G_few)", fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def per_class_fid_figure(rows: list[dict], methods: list[str], path: Path, title: str) -> None:
    """Per-class FID, classes head to tail, one bar group per class with a bar per method (error
    bars: std over seeds) and the real-versus-real floor as a mark."""
    plt = pyplot()
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) * len(methods) + 2), 3.6))
    for k, method in enumerate(methods):
        ax.bar([i + k * width for i in range(len(rows))], [r[f"{method}.fid"] for r in rows], width=width,
               yerr=[r[f"{method}.fid_std"] for r in rows], capsize=2, label=method)
    centres = [i + 0.4 - width / 2 for i in range(len(rows))]
    ax.scatter(centres, [r["fid_floor"] for r in rows], marker="_", s=200, color="black", label="real vs real")
    ax.set_xticks(centres, [f"{r['name']}\n({r['train_count']})" for r in rows], fontsize=7)
    ax.set_xlabel("class (training count), head to tail")
    ax.set_ylabel("per-class FID (lower is better)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def training_curves_figure(rows: list[dict], manifest: dict, path: Path, title: str) -> None:
    """Left: the training loss against the step, a line per method (mean over seeds). Right: each
    class's loss over the last logged window, head to tail, a line per method."""
    plt = pyplot()
    order = head_to_tail(manifest["class_counts"])
    names = manifest["class_names"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        steps = sorted({r["step"] for r in mine})
        loss = {r["step"]: r["loss"] for r in mine}
        left.plot(steps, [loss[s] for s in steps], label=method)
        last = {r["class"]: r["class_loss"] for r in mine if r["step"] == steps[-1]}
        right.plot(range(len(order)), [last[c] for c in order], marker="o", ms=3, label=method)
    left.set_xlabel("step")
    left.set_ylabel("training loss (window mean)")
    left.set_yscale("log")
    left.legend(fontsize=8)
    right.set_xticks(range(len(order)), [f"{names[c]}\n({manifest['class_counts'][c]})" for c in order], fontsize=7)
    right.set_xlabel("class (training count), head to tail")
    right.set_ylabel("diffusion loss, last logged window")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
