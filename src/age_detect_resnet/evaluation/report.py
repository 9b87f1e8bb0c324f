"""Evaluation reports: per-sample predictions, metrics, figures, as CSV + JSON + Markdown."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from age_detect_resnet.atomic import atomic_path, write_text_atomic
from age_detect_resnet.evaluation.groups import groups_markdown, plot_groups
from age_detect_resnet.evaluation.metrics import (
    age_metrics,
    classification_metrics,
    interval_coverage,
    interval_label_metrics,
    worst_groups,
)
from age_detect_resnet.evaluation.plots import (
    plot_confusion,
    plot_cs_curve,
    plot_group_errors,
    plot_predicted_vs_true,
)
from age_detect_resnet.modeling.heads import AgeHead
from age_detect_resnet.modeling.model import AgeModel
from age_detect_resnet.training.engine import Predictions

# Label columns a dataset may carry that the predictions keep: age-group labels (see metrics).
GROUP_LABEL_COLUMNS = ("age_group", "age_low", "age_high")


def prediction_frame(
    table: pd.DataFrame, predictions: Predictions, model: AgeModel, *, extra_columns: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per evaluated image: its table columns, the prediction, and head-specific extras;
    `extra_columns` are further table columns to keep (the attributes `evaluate --by` groups by)."""
    readout: dict[str, np.ndarray] = {"age": predictions.predicted}
    head, outputs = model.head, torch.from_numpy(predictions.outputs)
    if len(predictions.indices):
        outputs = outputs.to(next(head.parameters()).device)
        ages = torch.as_tensor(np.array(predictions.ages, dtype=float))
        # "age" is `predicted` already; the rest (e.g. lower, upper) and the label columns join it
        extras = {**head.predict(outputs), **head.label_columns(outputs, ages)}
        readout |= {name: values.cpu().numpy() for name, values in extras.items() if name != "age"}
    return readout_frame(table, predictions.indices, predictions.ages, readout, extra_columns=extra_columns)


def readout_frame(
    table: pd.DataFrame,
    indices: np.ndarray,
    ages: np.ndarray,
    readout: Mapping[str, np.ndarray],
    *,
    extra_columns: Sequence[str] = (),
) -> pd.DataFrame:
    """The rows of `prediction_frame` from a backend's readout (`AgeHead.output_names` columns, "age"
    first, for the rows `indices` of `table` whose true ages are `ages`)."""
    rows = table.iloc[indices]
    frame = pd.DataFrame({"path": rows["path"].to_numpy(), "age": ages, "predicted": readout["age"]})
    frame["error"] = frame["predicted"] - frame["age"]
    for column in (*GROUP_LABEL_COLUMNS, *extra_columns):
        if column in rows:
            frame[column] = rows[column].to_numpy()
    for name, values in readout.items():
        if name != "age":
            frame[name] = values
    return frame


def evaluation_metrics(frame: pd.DataFrame, head: AgeHead) -> dict[str, Any]:
    """The report's metrics of `frame`; `head` gives the settings they are read against (the interval's
    nominal coverage, the bins' labels)."""
    metrics = age_metrics(frame["age"].to_numpy(), frame["predicted"].to_numpy())
    metrics["worst_groups"] = worst_groups(metrics)
    if {"age_low", "age_high"} <= set(frame.columns):
        metrics["labelled_groups"] = interval_label_metrics(
            frame["age_low"].to_numpy(),
            frame["age_high"].to_numpy(),
            frame["predicted"].to_numpy(),
            frame["age_group"].to_numpy() if "age_group" in frame else None,
        )
    if "lower" in frame:
        metrics["interval"] = {
            "nominal": head.interval,
            **interval_coverage(frame["age"], frame["lower"], frame["upper"]),
        }
    if "predicted_group" in frame:
        metrics["classification"] = {
            "groups": head.labels(),
            **classification_metrics(frame["true_group"], frame["predicted_group"], len(head.labels())),
        }
    return metrics


def labelled_groups_markdown(metrics: dict[str, Any]) -> list[str]:
    """The table of a dataset labelled with age groups (MAE is then only to the group's midpoint)."""
    stats = metrics["labelled_groups"]
    lines = [
        f"Labelled with age groups: {stats['inside']:.1%} of the predictions fall inside the labelled "
        f"group; mean distance to it {stats['mean_distance']:.2f} years "
        f"(signed {stats['mean_signed_distance']:+.2f}; the MAE below is to each group's midpoint).",
        "",
        "| labelled group | images | inside | mean distance | mean signed distance |",
        "|---|---:|---:|---:|---:|",
    ]
    for group, g in stats["groups"].items():
        lines.append(
            f"| {group} | {g['count']:,} | {g['inside']:.1%} | {g['mean_distance']:.2f} | "
            f"{g['mean_signed_distance']:+.2f} |"
        )
    return [*lines, ""]


def metrics_markdown(metrics: dict[str, Any]) -> str:
    lines = [
        *(labelled_groups_markdown(metrics) if "labelled_groups" in metrics else []),
        "| images | MAE | RMSE | mean signed error | CS@5 |",
        "|---:|---:|---:|---:|---:|",
        f"| {metrics['count']:,} | {metrics['mae']:.2f} | {metrics['rmse']:.2f} | "
        f"{metrics['mean_signed_error']:+.2f} | {metrics['cs']['5']:.1%} |",
        "",
        "Error per true age group (signed error > 0: predicted too old):",
        "",
        "| age group | images | MAE | mean signed error |",
        "|---|---:|---:|---:|",
    ]
    for group, stats in metrics["groups"].items():
        lines.append(
            f"| {group} | {stats['count']:,} | {stats['mae']:.2f} | {stats['mean_signed_error']:+.2f} |"
        )
    lines += ["", f"Worst groups: {', '.join(metrics['worst_groups'])}.", ""]
    cs = metrics["cs"]
    lines += ["CS@k (share within k years): " + ", ".join(f"@{k} {v:.1%}" for k, v in cs.items()), ""]
    if "interval" in metrics:
        iv = metrics["interval"]
        lines += [
            f"{iv['nominal']:.0%} age interval: real coverage {iv['coverage']:.1%}, "
            f"mean width {iv['mean_width']:.1f} years.",
            "",
        ]
    if "classification" in metrics:
        cl = metrics["classification"]
        lines += [f"Age groups: accuracy {cl['accuracy']:.1%}, macro F1 {cl['macro_f1']:.3f}.", ""]
    return "\n".join(lines)


def write_evaluation(
    frame: pd.DataFrame,
    metrics: dict[str, Any],
    out_dir: Path,
    *,
    title: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """predictions.csv, evaluation.json, evaluation.md and the figures under out_dir/plots/."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    with atomic_path(out_dir / "predictions.csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.3f")
    document = {**(extra or {}), "metrics": metrics}
    write_text_atomic(out_dir / "evaluation.json", json.dumps(document, indent=2) + "\n")
    written = {
        "pred_vs_true": plot_predicted_vs_true(
            frame["age"],
            frame["predicted"],
            plots / "pred_vs_true.png",
            title=f"{title}: MAE {metrics['mae']:.2f}",
        ),
        "group_errors": plot_group_errors(metrics["groups"], plots / "group_errors.png"),
        "cs_curve": plot_cs_curve(metrics["cs"], plots / "cs_curve.png"),
    }
    if "classification" in metrics:
        cl = metrics["classification"]
        written["confusion"] = plot_confusion(cl["confusion"], cl["groups"], plots / "confusion.png")
    if "by" in metrics:
        written.update(plot_groups(metrics["by"], plots))
    # Written into the folder of an earlier report, the figures of that one that this one does not make
    # (an earlier --by's by_gender.png, a classifier's confusion.png) would be read as this report's.
    # Only a report's own kinds of figure: a run folder's plots/ also holds its training curves.
    made = {path.name for path in written.values()}
    for stale in [*plots.glob("by_*.png"), plots / "confusion.png"]:
        if stale.name not in made:
            stale.unlink(missing_ok=True)
    markdown = [f"# {title}", ""]
    markdown += [f"- {key}: {value}" for key, value in (extra or {}).items()] + [""]
    markdown += [metrics_markdown(metrics)]
    if "by" in metrics:
        markdown += [groups_markdown(metrics["by"])]
    markdown += [f"![{name}](plots/{path.name})" for name, path in written.items()]
    write_text_atomic(out_dir / "evaluation.md", "\n".join(markdown) + "\n")
    return written
