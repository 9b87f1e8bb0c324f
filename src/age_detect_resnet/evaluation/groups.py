"""Error by group (`evaluate --by gender,ethnicity`): is the model worse for some people than for others?

For each attribute value: images, MAE with a 95% confidence interval, mean signed error (and, for data
labelled with age groups, the share inside the labelled group); the same per value x true age group,
because a value with many old faces has a higher MAE for that reason alone. The gaps are called out, and
groups with too few images to support a comparison are flagged rather than ranked as if they did.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from age_detect_resnet.evaluation.metrics import (
    MIN_RELIABLE_COUNT,
    age_group_label,
    age_group_order,
    age_metrics,
    interval_label_metrics,
)
from age_detect_resnet.evaluation.plots import _save

# MIN_RELIABLE_COUNT (metrics.py): groups under it are reported but flagged, and kept out of the
# "largest gap" when reliable groups exist.
Z_95 = 1.959964  # two-sided 95% quantile of the standard normal
WORST_CELLS = 3


def attribute_values(values: pd.Series) -> pd.Series:
    """Group names as text; missing values (NaN, None, "" as IMDB-WIKI writes an unknown gender) -> None.

    Whole numbers read as floats (a 0/1 column with a gap reads as 0.0/1.0) are named as integers."""

    def name(value: object) -> str | None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if isinstance(value, float | np.floating) and float(value).is_integer():
            return str(int(value))
        text = str(value).strip()
        return text or None

    return pd.Series([name(v) for v in values], index=values.index, dtype=object)


def standard_error(values: np.ndarray, clusters: np.ndarray) -> float | None:
    """Standard error of the mean of `values`, with the images of one cluster (one person) counted as
    one draw: two photos of the same face are not two independent measurements. With every image its
    own cluster this is the usual s / sqrt(n). None below two clusters."""
    sums = pd.Series(values - values.mean()).groupby(clusters).sum().to_numpy()
    if sums.size < 2:
        return None
    return math.sqrt(sums.size / (sums.size - 1) * float((sums**2).sum())) / values.size


def _interval(mean: float, se: float | None) -> list[float] | None:
    # An MAE is never negative: the normal interval is cut at 0.
    return None if se is None else [max(mean - Z_95 * se, 0.0), mean + Z_95 * se]


def _value_stats(frame: pd.DataFrame, clusters: np.ndarray, min_count: int) -> dict[str, Any]:
    true, pred = frame["age"].to_numpy(dtype=float), frame["predicted"].to_numpy(dtype=float)
    overall = age_metrics(true, pred)
    se = standard_error(np.abs(pred - true), clusters)
    stats: dict[str, Any] = {
        "count": overall["count"],
        "people": int(pd.unique(clusters).size),
        "mae": overall["mae"],
        "mae_se": se,
        "mae_ci95": _interval(overall["mae"], se),
        "mean_signed_error": overall["mean_signed_error"],
        "reliable": overall["count"] >= min_count,
    }
    if {"age_low", "age_high"} <= set(frame.columns):
        # Over the images labelled with a group only (None if this value has none: exact ages alone)
        labelled = interval_label_metrics(frame["age_low"], frame["age_high"], pred)
        if labelled is not None:
            stats.update({k: labelled[k] for k in ("inside", "mean_distance", "mean_signed_distance")})
            stats["labelled_count"] = labelled["count"]
    cells = {
        group: {**cell, "reliable": cell["count"] >= min_count} for group, cell in overall["groups"].items()
    }
    return {"stats": stats, "cells": cells}


def gap_standard_error(
    worst: tuple[np.ndarray, np.ndarray], best: tuple[np.ndarray, np.ndarray]
) -> float | None:
    """Standard error of MAE(worst) - MAE(best), each given as (absolute errors, person clusters). With
    different people in the two groups the variances add. Where people are in both (the same person
    neutral and smiling, frontal and turned), their two errors move together: each person's shares of
    both means are summed before squaring (the clustered standard error of the difference), so that what
    the person adds to both cancels out instead of widening the interval. None below two people."""
    (errors_w, people_w), (errors_b, people_b) = worst, best
    if not set(people_w) & set(people_b):
        errors = [standard_error(errors_w, people_w), standard_error(errors_b, people_b)]
        return None if None in errors else math.hypot(*errors)
    shares = np.concatenate(
        [(errors_w - errors_w.mean()) / errors_w.size, (errors_b.mean() - errors_b) / errors_b.size]
    )
    sums = pd.Series(shares).groupby(np.concatenate([people_w, people_b])).sum().to_numpy()
    if sums.size < 2:
        return None
    return math.sqrt(sums.size / (sums.size - 1) * float((sums**2).sum()))


def _gap(
    values: dict[str, dict[str, Any]], samples: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, Any] | None:
    """The best and the worst value by MAE, among the reliable values where there are two of them; else
    among those with an interval at all (two people or more), flagged as not reliable. `samples` holds
    each value's absolute errors and person clusters, for the gap's interval (`gap_standard_error`)."""
    reliable = [v for v, s in values.items() if s["reliable"]]
    with_interval = [v for v, s in values.items() if s["mae_se"] is not None]
    candidates = next((c for c in (reliable, with_interval, list(values)) if len(c) >= 2), None)
    if candidates is None:
        return None
    ranked = sorted(candidates, key=lambda v: values[v]["mae"])
    best, worst = ranked[0], ranked[-1]
    gap = values[worst]["mae"] - values[best]["mae"]
    se = None
    if None not in (values[best]["mae_se"], values[worst]["mae_se"]):
        se = gap_standard_error(samples[worst], samples[best])
    shared = set(samples[worst][1]) & set(samples[best][1])
    return {
        "best": best,
        "worst": worst,
        "mae_gap": gap,
        "mae_gap_ci95": None if se is None else [gap - Z_95 * se, gap + Z_95 * se],
        "people_in_both": len(shared),
        "reliable": len(reliable) >= 2,
    }


def _worst_cells(
    cells: dict[str, dict[str, dict[str, Any]]], age_group_mae: dict[str, float], n: int
) -> list[dict[str, Any]]:
    """Reliable value x age-group cells furthest ABOVE the MAE of all images of that age group: the
    comparison at equal age, so a value is not blamed for the age mix of its images."""
    found = [
        {
            "value": value,
            "age_group": group,
            "count": cell["count"],
            "mae": cell["mae"],
            "age_group_mae": age_group_mae[group],
            "excess_mae": cell["mae"] - age_group_mae[group],
        }
        for value, groups in cells.items()
        for group, cell in groups.items()
        if cell["reliable"] and cell["mae"] > age_group_mae[group]
    ]
    return sorted(found, key=lambda c: c["excess_mae"], reverse=True)[:n]


def person_clusters(frame: pd.DataFrame) -> np.ndarray:
    """One id per image: its `person_id` where it has one, else an id of its own."""
    people = attribute_values(frame["person_id"]) if "person_id" in frame.columns else [None] * len(frame)
    return np.array(
        [f"image {i}" if person is None else f"person {person}" for i, person in enumerate(people)],
        dtype=object,
    )


def group_errors(
    frame: pd.DataFrame, attributes: list[str], *, min_count: int = MIN_RELIABLE_COUNT
) -> dict[str, Any]:
    """Per attribute: errors per value and per value x true age group, the gap, the worst cells.

    `frame` is the evaluation's prediction frame (`age`, `predicted`, optionally `age_low`/`age_high`,
    `person_id`, and the attribute columns). The result is JSON-ready; images without a value are
    counted as missing.
    """
    missing = [a for a in attributes if a not in frame.columns]
    if missing:
        raise ValueError(f"no column {', '.join(missing)} in the predictions to group by")
    absolute_all = (frame["predicted"] - frame["age"]).abs().to_numpy(dtype=float)
    age_groups = np.array([age_group_label(a) for a in frame["age"]])
    age_group_mae = {g: float(absolute_all[age_groups == g].mean()) for g in set(age_groups)}
    clusters = person_clusters(frame)
    by_person = pd.unique(clusters).size < len(frame)
    result: dict[str, Any] = {
        "min_count": min_count,
        "ci": "95% normal approximation of the MAE"
        + (", images of one person_id counted as one draw" if by_person else ""),
        "attributes": {},
    }
    for attribute in attributes:
        names = attribute_values(frame[attribute])
        values, cells, samples = {}, {}, {}
        for value in sorted(names.dropna().unique()):
            mask = (names == value).to_numpy()
            computed = _value_stats(frame[mask], clusters[mask], min_count)
            values[value], cells[value] = computed["stats"], computed["cells"]
            samples[value] = (absolute_all[mask], clusters[mask])
        result["attributes"][attribute] = {
            "missing": int(names.isna().sum()),
            "values": values,
            "age_groups": cells,
            "gap": _gap(values, samples),
            "worst_cells": _worst_cells(cells, age_group_mae, WORST_CELLS),
        }
    return result


def _ci_text(ci: list[float] | None) -> str:
    return f"{ci[0]:.2f}–{ci[1]:.2f}" if ci else "n/a"


def _gap_sentence(attribute: str, gap: dict[str, Any], values: dict[str, Any]) -> str:
    best, worst = gap["best"], gap["worst"]
    text = (
        f"Largest gap in {attribute}: **{worst}** MAE {values[worst]['mae']:.2f} vs **{best}** "
        f"{values[best]['mae']:.2f}, {gap['mae_gap']:.2f} years"
    )
    ci = gap["mae_gap_ci95"]
    if ci:
        paired = gap.get("people_in_both", 0)
        within = f"; {paired:,} people in both groups, each compared with themselves" if paired else ""
        text += f" (95% CI {ci[0]:.2f} to {ci[1]:.2f}{within})"
        if ci[0] <= 0:
            text += ": the interval includes 0, so this sample cannot tell the two apart"
    if not gap["reliable"]:
        text += "; fewer than two values have enough images, so this comparison is not reliable"
    return text + "."


def _labelled_cells(s: dict[str, Any]) -> str:
    """The share inside the labelled group and the mean distance, saying over how many images where only
    some have a group; dashes where none has."""
    if "inside" not in s:
        return " – | – |"
    some = s.get("labelled_count", s["count"])
    of = f" (of {some:,})" if some < s["count"] else ""
    return f" {s['inside']:.1%}{of} | {s['mean_distance']:.2f} |"


def attribute_markdown(attribute: str, stats: dict[str, Any], min_count: int) -> list[str]:
    values = stats["values"]
    if not values:
        return [f"## Error by {attribute}", "", f"No evaluated image has a {attribute}.", ""]
    labelled = any("inside" in s for s in values.values())
    extra_header = " inside the labelled group | mean distance |" if labelled else ""
    lines = [
        f"## Error by {attribute}",
        "",
        f"| {attribute} | images | MAE (95% CI) | mean signed error |{extra_header} note |",
        "|---|---:|---:|---:|" + ("---:|---:|" if labelled else "") + "---|",
    ]
    for value, s in values.items():
        extra = _labelled_cells(s) if labelled else ""
        note = "" if s["reliable"] else f"under {min_count} images: not reliable"
        people = f" ({s['people']:,} {'person' if s['people'] == 1 else 'people'})"
        people = people if s["people"] < s["count"] else ""
        lines.append(
            f"| {value} | {s['count']:,}{people} | {s['mae']:.2f} ({_ci_text(s['mae_ci95'])}) | "
            f"{s['mean_signed_error']:+.2f} |{extra} {note} |"
        )
    lines.append("")
    if stats["missing"]:
        lines += [f"{stats['missing']:,} image(s) with no {attribute} are left out of this section.", ""]
    if stats["gap"]:
        lines += [_gap_sentence(attribute, stats["gap"], values), ""]
    groups = sorted({g for cells in stats["age_groups"].values() for g in cells}, key=age_group_order)
    lines += [
        f"MAE (images) per {attribute} and true age group, to compare at equal age (a value with older "
        f"faces has a higher MAE for that reason alone); cells under {min_count} images are marked *:",
        "",
        f"| {attribute} | " + " | ".join(groups) + " |",
        "|---|" + "---:|" * len(groups),
    ]
    for value, cells in stats["age_groups"].items():
        row = [
            f"{cells[g]['mae']:.2f} ({cells[g]['count']:,}){'' if cells[g]['reliable'] else '*'}"
            if g in cells
            else "–"
            for g in groups
        ]
        lines.append(f"| {value} | " + " | ".join(row) + " |")
    lines.append("")
    if stats["worst_cells"]:
        lines += [
            f"Furthest above the MAE of all images of the same age group (cells of {min_count}+ images): "
            + "; ".join(
                f"{c['value']} {c['age_group']} MAE {c['mae']:.2f} vs {c['age_group_mae']:.2f} "
                f"(+{c['excess_mae']:.2f}, {c['count']:,} images)"
                for c in stats["worst_cells"]
            )
            + ".",
            "",
        ]
    return lines


def groups_markdown(by: dict[str, Any]) -> str:
    """The report's sections, one per attribute (tables, the gap, the worst cells)."""
    lines = [
        f"Error by group: 95% confidence intervals by {by['ci'].removeprefix('95% ')}; values and cells "
        f"under {by['min_count']} images are flagged as not reliable.",
        "",
    ]
    for attribute, stats in by["attributes"].items():
        lines += attribute_markdown(attribute, stats, by["min_count"])
    return "\n".join(lines)


def error_bars(values: dict[str, dict[str, Any]]) -> tuple[list[int], np.ndarray]:
    """The positions (in `values`' order) of the values that have a 95% interval, and the (2, n)
    distances from each of their MAEs down and up to it; a value of one person has none, and gets no
    bar (a zero-width one would look certain)."""
    with_ci = [i for i, s in enumerate(values.values()) if s["mae_ci95"] is not None]
    stats = [list(values.values())[i] for i in with_ci]
    yerr = np.array([[s["mae"] - s["mae_ci95"][0], s["mae_ci95"][1] - s["mae"]] for s in stats])
    return with_ci, np.abs(yerr.reshape(-1, 2).T)


def plot_attribute(attribute: str, stats: dict[str, Any], path: Path) -> Path:
    """MAE per value with 95% CI bars (faded: too few images), and a heat map of value x age group."""
    values = list(stats["values"])
    groups = sorted({g for cells in stats["age_groups"].values() for g in cells}, key=age_group_order)
    fig = Figure(figsize=(12, max(3.5, 0.45 * len(values) + 2)), layout="constrained")  # long value names
    bars, heat = fig.subplots(1, 2, width_ratios=[1, 1.6])
    x = np.arange(len(values))
    maes = np.array([stats["values"][v]["mae"] for v in values])
    alphas = [1.0 if stats["values"][v]["reliable"] else 0.35 for v in values]
    for i in range(len(values)):
        bars.bar(x[i], maes[i], color="tab:blue", alpha=alphas[i])
    with_ci, yerr = error_bars(stats["values"])
    if with_ci:
        bars.errorbar(x[with_ci], maes[with_ci], yerr=yerr, fmt="none", ecolor="black", capsize=4)
    for i in sorted(set(range(len(values))) - set(with_ci)):
        # A bar without a whisker would read as exact: its MAE is one person's, with no interval at all.
        bars.annotate("no CI", (x[i], maes[i]), xytext=(0, 3), textcoords="offset points", ha="center")
    bars.set_xticks(x, [f"{v}\n({stats['values'][v]['count']:,})" for v in values], rotation=30)
    bars.set_ylabel("MAE (years), 95% CI")
    bars.set_title(f"MAE by {attribute} (faded: too few images; no CI: one person)")
    bars.grid(alpha=0.3, axis="y")
    matrix = np.full((len(values), len(groups)), np.nan)
    for i, v in enumerate(values):
        for j, g in enumerate(groups):
            if g in stats["age_groups"][v]:
                matrix[i, j] = stats["age_groups"][v][g]["mae"]
    image = heat.imshow(np.ma.masked_invalid(matrix), cmap="Reds", aspect="auto")
    for i, v in enumerate(values):
        for j, g in enumerate(groups):
            cell = stats["age_groups"][v].get(g)
            if cell:
                heat.text(
                    j,
                    i,
                    f"{cell['mae']:.1f}\n({cell['count']})",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if cell["reliable"] else "grey",
                    bbox={"facecolor": "white", "alpha": 0.6, "edgecolor": "none", "pad": 1},
                )
    heat.set_xticks(range(len(groups)), groups, rotation=45)
    heat.set_yticks(range(len(values)), values)
    heat.set_xlabel("true age group")
    heat.set_title(f"MAE by {attribute} and age (images in brackets; grey: too few)")
    fig.colorbar(image, ax=heat, label="MAE (years)")
    return _save(fig, path)


def plot_groups(by: dict[str, Any], plots_dir: Path) -> dict[str, Path]:
    """One figure per attribute, plots_dir/by_<attribute>.png."""
    return {
        f"by_{attribute}": plot_attribute(
            attribute, stats, Path(plots_dir) / f"by_{_file_part(attribute)}.png"
        )
        for attribute, stats in by["attributes"].items()
        if stats["values"]
    }


def _file_part(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
