"""How far apart the groups of people are aged, at equal age: the age-standardised signed error per value
of a label column, from `evaluate --by` predictions.

    .venv/bin/age-detect evaluate --model RUN --split val --by ethnicity --out DIR    # each model
    .venv/bin/python experiments/ethnic_bias.py "bundle's member=DIR_A" "balanced=DIR_B"

A group's mean signed error mixes its bias with its ages (the old are aged too young whoever they are,
and UTKFace's Asian faces are younger than its white faces). Standardised, each group's signed error is
the mean over the age groups (0–9 ... 70+) of its signed error there, weighted by the whole set's share of
each age group (over the age groups where it has faces). The spread is the mean absolute difference of
the VALUES' standardised errors (--values, default UTKFace's four large groups) from their mean: 0 when
every group of people is aged alike at equal age.

The rule for `--balance-by ethnicity`, fixed before its runs were measured: a balanced model replaces the
one it is the twin of (the ResNet-50 member's third stage; then, a later run, the MobileNetV2 member's
8 epochs from ImageNet) if, on UTKFace's validation split, its spread is at least 0.25 years smaller and
its MAE at most 0.03 worse.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from age_detect_resnet.evaluation.metrics import age_metrics

DEFAULT_VALUES = ("asian", "black", "indian", "white")


def standardised(frame: pd.DataFrame, column: str, values: list[str]) -> pd.DataFrame:
    """Per value: faces, MAE, mean signed error and age-standardised signed error."""
    everyone = age_metrics(frame["age"], frame["predicted"])["groups"]
    shares = {g: m["count"] / len(frame) for g, m in everyone.items()}
    rows = {}
    for value in values:
        part = frame[frame[column].astype(str) == value]
        if part.empty:
            continue
        metrics = age_metrics(part["age"], part["predicted"])
        cells = {g: m["mean_signed_error"] for g, m in metrics["groups"].items()}
        weights = np.array([shares[g] for g in cells])
        rows[value] = {
            "faces": len(part),
            "MAE": metrics["mae"],
            "signed": metrics["mean_signed_error"],
            "standardised signed": float(np.dot(list(cells.values()), weights) / weights.sum()),
            **{f"signed {g}": cells.get(g, np.nan) for g in shares},
        }
    return pd.DataFrame(rows).T


def markdown(table: pd.DataFrame) -> str:
    lines = ["| | " + " | ".join(table.columns) + " |", "|---|" + "---:|" * len(table.columns)]
    for value, row in table.iterrows():
        cells = [f"{v:,.0f}" if name == "faces" else f"{v:.2f}" for name, v in row.items()]
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("reports", nargs="+", help="LABEL=DIR: an `evaluate --by COLUMN` output folder")
    parser.add_argument("--column", default="ethnicity")
    parser.add_argument("--values", nargs="+", default=list(DEFAULT_VALUES))
    args = parser.parse_args(argv)
    summary = []
    for spec in args.reports:
        label, equals, folder = spec.partition("=")
        if not equals or not folder:
            parser.error(f"{spec!r}: expected LABEL=DIR, e.g. 'UTKFace test=results/NAME/utkface-test'")
        path = Path(folder) / "predictions.csv"
        if not path.is_file():
            print(
                f"{path} does not exist: make it with `age-detect evaluate ... --by {args.column} "
                f"--out {folder}`"
            )
            return 2
        frame = pd.read_csv(path)
        if args.column not in frame.columns:
            print(f"{path} has no {args.column} column: evaluate with --by {args.column}")
            return 2
        present = set(frame[args.column].dropna().astype(str))
        absent = [value for value in args.values if value not in present]
        if absent:  # the spread would be over the others alone, silently
            print(
                f"note: {label} has no {args.column} {', '.join(absent)} (its values: "
                f"{', '.join(sorted(present))}); the spread is over the rest: choose them with --values",
                file=sys.stderr,
            )
        table = standardised(frame, args.column, args.values)
        spread = (table["standardised signed"] - table["standardised signed"].mean()).abs().mean()
        summary.append((label, len(frame), frame["error"].abs().mean(), spread, table["standardised signed"]))
        print(f"## {label} ({folder})\n")
        print(markdown(table), "\n")
    values = [v for v in args.values if all(v in s[4].index for s in summary)]
    header = ["model", "faces", "MAE", "spread", *[f"{v} (std. signed)" for v in values]]
    print("| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1))
    for label, faces, mae, spread, signed in summary:
        cells = [label, f"{faces:,}", f"{mae:.3f}", f"{spread:.2f}", *[f"{signed[v]:+.2f}" for v in values]]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
