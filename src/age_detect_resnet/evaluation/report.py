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
    MIN_RELIABLE_COUNT,
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

# Label columns a dataset may carry that the predictions keep: age-group labels (see metrics), and which
# rows' `age` is only their group's midpoint (csv_table).
GROUP_LABEL_COLUMNS = ("age_group", "age_low", "age_high", "age_from_group")


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


def ages_from_group(frame: pd.DataFrame) -> np.ndarray:
    """Which rows' `age` is only the midpoint of their labelled age group (no exact age given)."""
    if "age_from_group" not in frame:
        return np.zeros(len(frame), dtype=bool)
    return frame["age_from_group"].fillna(False).to_numpy(dtype=bool)


def evaluation_metrics(frame: pd.DataFrame, head: AgeHead) -> dict[str, Any]:
    """The report's metrics of `frame`; `head` gives the settings they are read against (the interval's
    nominal coverage, the bins' labels)."""
    metrics = age_metrics(frame["age"].to_numpy(), frame["predicted"].to_numpy())
    metrics["worst_groups"] = worst_groups(metrics)
    midpoints = ages_from_group(frame)
    if {"age_low", "age_high"} <= set(frame.columns):
        labelled = interval_label_metrics(
            frame["age_low"].to_numpy(),
            frame["age_high"].to_numpy(),
            frame["predicted"].to_numpy(),
            frame["age_group"].to_numpy() if "age_group" in frame else None,
        )
        if labelled is not None:
            metrics["labelled_groups"] = {**labelled, "ages_from_group": int(midpoints.sum())}
    if "lower" in frame:
        metrics["interval"] = interval_metrics(frame, head.interval, exact=~midpoints)
    if "predicted_group" in frame:
        metrics["classification"] = {
            "groups": head.labels(),
            **classification_metrics(frame["true_group"], frame["predicted_group"], len(head.labels())),
        }
    return metrics


def interval_metrics(frame: pd.DataFrame, nominal: float, *, exact: np.ndarray) -> dict[str, Any]:
    """The age interval's mean width over every row, and its real coverage over the `exact` rows only
    (None where there are none): an age group's midpoint is no person's age, so whether it falls in the
    interval says nothing of the interval."""
    lower, upper = frame["lower"].to_numpy(dtype=float), frame["upper"].to_numpy(dtype=float)
    coverage = (
        interval_coverage(frame["age"].to_numpy()[exact], lower[exact], upper[exact])["coverage"]
        if exact.any()
        else None
    )
    return {
        "nominal": nominal,
        "coverage": coverage,
        "coverage_images": int(exact.sum()),
        "mean_width": float(np.mean(upper - lower)),
    }


def labelled_groups_markdown(metrics: dict[str, Any]) -> list[str]:
    """The table of a dataset labelled with age groups, saying over which images it is and what the MAE
    below is measured to (each group's midpoint, the exact ages given, or both)."""
    stats = metrics["labelled_groups"]
    which = (
        f" ({stats['count']:,} of the {metrics['count']:,} images; the others have an exact age alone)"
        if stats["count"] < metrics["count"]
        else ""
    )
    midpoints = stats.get("ages_from_group", stats["count"])
    if midpoints == metrics["count"]:
        mae_to = "the MAE below is to each group's midpoint"
    elif midpoints == 0:
        mae_to = "the MAE below is to the exact ages given"
    else:
        mae_to = (
            f"the MAE below is to the exact age where one is given, and to the group's midpoint for the "
            f"{midpoints:,} images labelled with a group alone"
        )
    lines = [
        f"Labelled with age groups{which}: {stats['inside']:.1%} of the predictions fall inside the "
        f"labelled group; mean distance to it {stats['mean_distance']:.2f} years "
        f"(signed {stats['mean_signed_distance']:+.2f}; {mae_to}).",
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


def interval_markdown(iv: dict[str, Any], count: int) -> str:
    """The age interval's line: its real coverage where measured, on which images, and why not where not."""
    width = f"mean width {iv['mean_width']:.1f} years"
    if iv.get("coverage") is None:
        return (
            f"{iv['nominal']:.0%} age interval: {width}; its real coverage is not measured, as every age "
            "here is an age group's midpoint, which is no person's true age."
        )
    on = iv.get("coverage_images", count)
    where = (
        f" on the {on:,} images with an exact age (not those labelled with an age group alone, whose "
        "midpoint is no person's true age)"
        if on < count
        else ""
    )
    return f"{iv['nominal']:.0%} age interval: real coverage {iv['coverage']:.1%}{where}, {width}."


def worst_groups_markdown(metrics: dict[str, Any]) -> str:
    worst = metrics["worst_groups"]
    if not worst:
        return f"No age group has {MIN_RELIABLE_COUNT} images or more to call out as the worst."
    return f"Worst groups (of {MIN_RELIABLE_COUNT}+ images): {', '.join(worst)}."


def metrics_markdown(metrics: dict[str, Any]) -> str:
    lines = [
        *(labelled_groups_markdown(metrics) if "labelled_groups" in metrics else []),
        "| images | MAE | RMSE | mean signed error | CS@5 |",
        "|---:|---:|---:|---:|---:|",
        f"| {metrics['count']:,} | {metrics['mae']:.2f} | {metrics['rmse']:.2f} | "
        f"{metrics['mean_signed_error']:+.2f} | {metrics['cs']['5']:.1%} |",
        "",
        "Error per true age group (signed error > 0: predicted too old; groups under "
        f"{MIN_RELIABLE_COUNT} images are marked *: too few to compare):",
        "",
        "| age group | images | MAE | mean signed error |",
        "|---|---:|---:|---:|",
    ]
    for group, stats in metrics["groups"].items():
        small = "*" if stats["count"] < MIN_RELIABLE_COUNT else ""
        lines.append(
            f"| {group} | {stats['count']:,}{small} | {stats['mae']:.2f} | "
            f"{stats['mean_signed_error']:+.2f} |"
        )
    lines += ["", worst_groups_markdown(metrics), ""]
    cs = metrics["cs"]
    lines += ["CS@k (share within k years): " + ", ".join(f"@{k} {v:.1%}" for k, v in cs.items()), ""]
    if "interval" in metrics:
        lines += [interval_markdown(metrics["interval"], metrics["count"]), ""]
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
