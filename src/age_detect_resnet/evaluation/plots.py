"""PNG figures of a run: training curves, predicted vs true age, error per group, confusion matrix, grids.

Figures are drawn with matplotlib's object API on the Agg canvas: no window ever opens and no global
pyplot state is touched, so plotting is safe in servers, tests and worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from age_detect_resnet.atomic import atomic_path


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)


def plot_curves(history: pd.DataFrame, out_dir: Path) -> list[Path]:
    """loss.png and mae.png: train and validation per epoch."""
    written = []
    for metric, ylabel in (("loss", "loss"), ("mae", "MAE (years)")):
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for split in ("train", "val"):
            column = f"{split}_{metric}"
            if column in history:
                ax.plot(history["epoch"], history[column], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(_save(fig, Path(out_dir) / f"{metric}.png"))
    return written


def plot_predicted_vs_true(true: np.ndarray, predicted: np.ndarray, path: Path, *, title: str = "") -> Path:
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot()
    ax.scatter(true, predicted, s=6, alpha=0.35, edgecolors="none")
    low = float(min(np.min(true), np.min(predicted), 0))
    high = float(max(np.max(true), np.max(predicted)))
    ax.plot([low, high], [low, high], color="black", linewidth=1, label="perfect")
    ax.set_xlabel("true age")
    ax.set_ylabel("predicted age")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_group_errors(groups: dict[str, dict[str, float]], path: Path) -> Path:
    labels = list(groups)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [groups[g]["mae"] for g in labels], width=0.4, label="MAE")
    ax.bar(x + 0.2, [groups[g]["mean_signed_error"] for g in labels], width=0.4, label="mean signed error")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, labels)
    ax.set_xlabel("true age group")
    ax.set_ylabel("years")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _save(fig, path)


def plot_cs_curve(cs: dict[str, float], path: Path) -> Path:
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    ax.plot([int(k) for k in cs], list(cs.values()), marker="o")
    ax.set_xlabel("error threshold (years)")
    ax.set_ylabel("share of predictions within threshold")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: Path) -> Path:
    matrix = np.asarray(confusion, dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted age group")
    ax.set_ylabel("true age group")
    fig.colorbar(image, ax=ax, label="share of the true group")
    return _save(fig, path)


def plot_prediction_grid(
    images: Sequence[Image.Image], captions: Sequence[str], path: Path, *, columns: int = 4
) -> Path:
    """Photos in a grid, each titled with its caption (e.g. 'true 34 / predicted 31.2')."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig = Figure(figsize=(3 * columns, 3.3 * rows))
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(image)
        ax.set_title(caption, fontsize=10)
        ax.axis("off")
    return _save(fig, path)
