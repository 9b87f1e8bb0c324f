"""The README's side-by-side table of models on the real-photo sets, from `real_photos.sh` reports.

    python experiments/real_photos_table.py "LABEL=DIR[:UTKFACE_EVALUATION_JSON]" ...

DIR holds `portraits/` and `fairface/` (and, where the model has a run folder, `utkface-test/`), each with
the `evaluation.json` that `age-detect evaluate` wrote; UTKFACE_EVALUATION_JSON names another UTKFace test
evaluation where DIR has none (either must be of the model's test split: `--split test`). Prints two
Markdown tables: the headline figures per model, then FairFace's mean distance to each labelled age group
(every model's groups); where the reports were made with `--by head_pose`, a third:
FairFace's distance for frontal and for sideways-turned faces.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def report(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
        document["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not an evaluation report of `age-detect evaluate` ({err})") from err
    return document


def metrics(path: Path) -> dict:
    return report(path)["metrics"]


def test_split_metrics(path: Path) -> dict:
    """The metrics of a UTKFace evaluation on a model's own test split: the column's figure is only
    comparable between models measured on their held-out faces (`--split test`), never on all images."""
    document = report(path)
    if document.get("split") != "test":
        raise SystemExit(
            f"{path}: an evaluation of --split {document.get('split', '(unknown)')}, not of the model's test "
            "split: name the evaluation.json of `age-detect evaluate --split test`"
        )
    return document["metrics"]


def group_order(name: str) -> float:
    """A labelled group's place in age order, from its name's lower end (0-2, 3-9, ..., 70+)."""
    try:
        return float(name.split("-")[0].rstrip("+"))
    except ValueError:
        return float("inf")  # a name without bounds: after the others, in the order first met


def parse(argument: str) -> tuple[str, Path, Path | None]:
    label, sep, rest = argument.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"{argument!r}: expected LABEL=DIR[:UTKFACE_EVALUATION_JSON]")
    folder, _, utkface = rest.partition(":")
    default = Path(folder) / "utkface-test" / "evaluation.json"
    return label, Path(folder), Path(utkface) if utkface else (default if default.is_file() else None)


def main(arguments: list[str]) -> int:
    if not arguments or arguments[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if arguments else 2
    rows, groups, poses = [], {}, {}
    for label, folder, utkface in map(parse, arguments):
        portraits = metrics(folder / "portraits" / "evaluation.json")
        fairface_report = metrics(folder / "fairface" / "evaluation.json")
        fairface = fairface_report["labelled_groups"]
        utk = test_split_metrics(utkface) if utkface else None
        utk_cell = f"{utk['mae']:.2f} ({utk['count']:,} faces)" if utk else "–"
        rows.append(
            f"| {label} | {utk_cell} | {portraits['mae']:.2f} | {100 * fairface['inside']:.1f}% | "
            f"{fairface['mean_distance']:.2f} |"
        )
        groups[label] = fairface["groups"]
        by = fairface_report.get("by", {}).get("attributes", {})
        if "head_pose" in by:
            poses[label] = by["head_pose"]["values"]
    print(
        "| model | UTKFace test MAE (its own split) | portraits MAE (`--detect`) | FairFace inside the group "
        "| FairFace mean distance |"
    )
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    # Every model's groups, in age order: a group one model's report lacks is a dash in its row.
    names = sorted(dict.fromkeys(n for per_group in groups.values() for n in per_group), key=group_order)
    print()
    print("| FairFace mean distance (inside) | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, per_group in groups.items():
        cells = [
            f"{per_group[n]['mean_distance']:.2f} ({100 * per_group[n]['inside']:.0f}%)"
            if n in per_group
            else "–"
            for n in names
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if poses:
        print()
        print("| FairFace mean distance (inside), by head pose | frontal | turned sideways |")
        print("|---|---:|---:|")
        for label, values in poses.items():
            cells = [
                f"{v['mean_distance']:.2f} ({100 * v['inside']:.0f}%, {v['count']} faces)" if v else "–"
                for v in (values.get("frontal"), values.get("turned"))
            ]
            print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
