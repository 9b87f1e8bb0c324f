"""Choose an ensemble's weights on a validation split, from each member's own predictions there.

    .venv/bin/age-detect evaluate --model RUN_A --split val --out A      # each member, one split
    .venv/bin/age-detect evaluate --model RUN_B --split val --out B
    .venv/bin/python experiments/ensemble_weights.py A/predictions.csv B/predictions.csv

The ensemble's age is the weighted mean of its members' ages (the expectation of the mixture of their
distributions, modeling/ensemble.py), so its MAE for any weights follows from the members' predictions
on the same images without running it. Prints the correlation of the members' errors and the MAE of
each weighting of a grid; pick on validation faces only, never on the test split or the real-photo sets
it will be judged on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("first", help="predictions.csv of the first member")
    parser.add_argument("second", help="predictions.csv of the second member, on the same images")
    parser.add_argument("--steps", type=int, default=8, help="weights of the first member: 0, 1/N, ..., 1")
    args = parser.parse_args(argv)
    for path in (args.first, args.second):
        if not Path(path).is_file():
            print(
                f"{path} does not exist: make it with `age-detect evaluate --model RUN --split val --out DIR`"
            )
            return 2
    a, b = (pd.read_csv(path, usecols=["path", "age", "predicted"]) for path in (args.first, args.second))
    both = a.merge(b, on=["path", "age"], suffixes=("_a", "_b"), validate="one_to_one")
    if len(both) != len(a) or len(both) != len(b):
        print(f"the two files do not hold the same images ({len(a)}, {len(b)}, {len(both)} shared)")
        return 2
    errors = both["predicted_a"] - both["age"], both["predicted_b"] - both["age"]
    print(
        f"{len(both):,} images; correlation of the two members' errors {errors[0].corr(errors[1]):.3f} "
        f"(the closer to 1, the less an ensemble can average away)\n\n"
        "| weight of the first | MAE |\n|---:|---:|"
    )
    for step in range(args.steps + 1):
        w = step / args.steps
        mae = (w * both["predicted_a"] + (1 - w) * both["predicted_b"] - both["age"]).abs().mean()
        print(f"| {w:.3f} | {mae:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
