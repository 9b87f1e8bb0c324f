"""Age-estimation metrics over samples (never means of batch means): MAE, RMSE, CS@k, per-group errors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CS_THRESHOLDS = tuple(range(1, 11))
GROUP_WIDTH = 10
OLDEST_GROUP_START = 70
# Under this many images a group's MAE moves by a year or more between samples of the same people: such
# groups are reported but flagged, and not called out as the worst (the age bands) or ranked in the
# largest gap (`evaluate --by`, groups.py) when reliable groups exist.
MIN_RELIABLE_COUNT = 30
# An age group whose upper end is this or above is open-ended: 70,100 is named 70+ (the CSV adapter's
# advice writes 70+ so; the ages a model is trained on end at 100).
OPEN_GROUP_END = 100


def age_group_label(age: float) -> str:
    start = min(int(age // GROUP_WIDTH) * GROUP_WIDTH, OLDEST_GROUP_START)
    return f"{start}+" if start == OLDEST_GROUP_START else f"{start}-{start + GROUP_WIDTH - 1}"


def age_group_order(label: str) -> int:
    return int(label.split("-")[0].rstrip("+"))


def age_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Overall and per-age-group errors of predictions `pred` for true ages `true` (both in years)."""
    true, pred = np.asarray(true, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    if true.size == 0:
        raise ValueError("no predictions to evaluate")
    error = pred - true
    absolute = np.abs(error)
    groups: dict[str, dict[str, float]] = {}
    labels = np.array([age_group_label(a) for a in true])
    for label in sorted(set(labels), key=age_group_order):
        mask = labels == label
        groups[label] = {
            "count": int(mask.sum()),
            "mae": float(absolute[mask].mean()),
            "mean_signed_error": float(error[mask].mean()),
        }
    return {
        "count": int(true.size),
        "mae": float(absolute.mean()),
        "rmse": float(np.sqrt((error**2).mean())),
        "mean_signed_error": float(error.mean()),
        "cs": {str(k): float((absolute <= k).mean()) for k in CS_THRESHOLDS},
        "groups": groups,
    }


def worst_groups(metrics: dict[str, Any], n: int = 2, min_count: int = MIN_RELIABLE_COUNT) -> list[str]:
    """The age groups with the highest MAE (the ones a report should call out), among those of
    `min_count` images or more: a group of a few images is worst or best by chance as often as not."""
    groups = {g: stats for g, stats in metrics["groups"].items() if stats["count"] >= min_count}
    return sorted(groups, key=lambda g: groups[g]["mae"], reverse=True)[:n]


def classification_metrics(true_class: np.ndarray, pred_class: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy, macro F1 and the confusion matrix (rows: true class, columns: predicted)."""
    true_class, pred_class = np.asarray(true_class, dtype=int), np.asarray(pred_class, dtype=int)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (true_class, pred_class), 1)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(axis=0), out=np.zeros(n_classes), where=confusion.sum(axis=0) > 0)
    recall = np.divide(tp, confusion.sum(axis=1), out=np.zeros(n_classes), where=confusion.sum(axis=1) > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(n_classes), where=precision + recall > 0
    )
    present = confusion.sum(axis=1) > 0
    return {
        "accuracy": float(tp.sum() / max(confusion.sum(), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "confusion": confusion.tolist(),
    }


def interval_coverage(true: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> dict[str, float]:
    true = np.asarray(true, dtype=np.float64)
    inside = (true >= lower) & (true <= upper)
    return {"coverage": float(inside.mean()), "mean_width": float(np.mean(upper - lower))}


def group_name(low: float, high: float) -> str:
    """An age group named from its bounds as the labelled groups are (20-29; 70+ for an open one)."""
    return f"{low:g}+" if high >= OPEN_GROUP_END else f"{low:g}-{high:g}"


def _blank(label: object) -> bool:
    return label is None or (isinstance(label, float) and math.isnan(label)) or not str(label).strip()


def interval_label_metrics(
    low: np.ndarray, high: np.ndarray, pred: np.ndarray, labels: np.ndarray | None = None
) -> dict[str, Any] | None:
    """For datasets labelled with age GROUPS (`low`-`high` years, both inclusive): the share of
    predictions inside the labelled group, and the distance in years from each prediction to it
    (0 inside; signed > 0 when predicted older than the group), overall and per labelled group.
    Only rows with both bounds count (`count` says how many): a CSV may mix in rows with an exact age
    alone. Groups without a name in `labels` are named from their bounds (`group_name`). None where no
    row has bounds."""
    low, high, pred = (np.asarray(a, dtype=np.float64) for a in (low, high, pred))
    if pred.size == 0:
        raise ValueError("no predictions to evaluate")
    bounded = np.isfinite(low) & np.isfinite(high)
    if not bounded.any():
        return None
    names = np.array(
        [
            group_name(lo, hi) if labels is None or _blank(label) else str(label).strip()
            for lo, hi, label in zip(low, high, [None] * len(low) if labels is None else labels, strict=True)
        ],
        dtype=object,
    )
    low, high, pred, labels = low[bounded], high[bounded], pred[bounded], names[bounded]
    signed = pred - np.clip(pred, low, high)
    distance = np.abs(signed)
    order = sorted(set(labels), key=lambda g: low[labels == g].min())
    groups = {
        g: {
            "count": int((labels == g).sum()),
            "inside": float((distance[labels == g] == 0).mean()),
            "mean_distance": float(distance[labels == g].mean()),
            "mean_signed_distance": float(signed[labels == g].mean()),
        }
        for g in order
    }
    return {
        "count": int(pred.size),
        "inside": float((distance == 0).mean()),
        "mean_distance": float(distance.mean()),
        "mean_signed_distance": float(signed.mean()),
        "groups": groups,
    }
