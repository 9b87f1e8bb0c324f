"""Compare finished runs side by side: the Markdown table of the README's results sections.

    age-detect compare runs/utkface-resnet50-regression runs/utkface-resnet50-distribution ...

Every number comes from the runs' own files (run.json, evaluation.json, config.json, best.json); the
command is cli/compare.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from age_detect_resnet.run_folder import RunFolder


class RunReadError(ValueError):
    """A folder that is not a finished run, or whose files cannot be read; the message names it."""


AGAIN = "train or evaluate the run again"


def load_run(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise RunReadError(f"{run_dir} does not exist or is not a folder")
    missing = [n for n in ("run.json", "evaluation.json", "config.json") if not (run_dir / n).is_file()]
    if missing:
        raise RunReadError(f"{run_dir} is not a finished run (missing {', '.join(missing)})")

    def read(name: str, *, optional: bool = False) -> dict[str, Any]:
        if optional and not (run_dir / name).is_file():
            return {}
        try:
            data = json.loads((run_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
            raise RunReadError(f"{run_dir / name} cannot be read ({err}); {AGAIN}") from err
        if not isinstance(data, dict):
            raise RunReadError(f"{run_dir / name} is not what training writes; {AGAIN}")
        return data

    try:
        return {
            "name": run_dir.name,
            "run": read("run.json"),
            "metrics": read("evaluation.json")["metrics"],
            "config": read("config.json"),
            "model": read(RunFolder(run_dir).best.with_suffix(".json").name, optional=True),
        }
    except KeyError as err:
        raise RunReadError(f"{run_dir}'s evaluation.json has no {err} entry; {AGAIN}") from err


def saved_val_mae(run: dict[str, Any]) -> float:
    """The validation MAE of the model the run kept, the one its test MAE is of: best.json's, measured
    after the best epoch's batch-norm statistics were recomputed (a kept recompute lowers it). run.json's
    `best_val_mae` is the best epoch's, from before that recompute: used only where best.json records
    none."""
    saved = run.get("model", {}).get("val_mae")
    return float(saved) if isinstance(saved, int | float) else float(run["run"]["best_val_mae"])


def interval_level(run: dict[str, Any]) -> float | None:
    """The nominal coverage of a run's age interval (0.8, 0.9, ...), None for a head without one: as its
    evaluation measured it, else as it was configured (`model.interval`)."""
    interval = run["metrics"].get("interval")
    if interval is None:
        return None
    return interval.get("nominal", run["config"].get("model", {}).get("interval"))


def interval_heading(runs: Sequence[dict[str, Any]]) -> str:
    """The coverage column's heading: with the level where every run with an interval has the same one;
    else plain, and each cell says its run's level (`coverage_cell`)."""
    levels = {interval_level(r) for r in runs} - {None}
    return f"{levels.pop():.0%} interval coverage" if len(levels) == 1 else "interval coverage"


def coverage_cell(run: dict[str, Any], *, per_cell: bool) -> str:
    interval = run["metrics"].get("interval")
    if interval is None or interval.get("coverage") is None:  # None: only age groups' midpoints to test
        return "-"
    level = interval_level(run)
    of = f" of {level:.0%}" if per_cell and level is not None else ""
    return f"{interval['coverage']:.1%}{of}"


def comparison_table(runs: Sequence[dict[str, Any]]) -> str:
    groups = sorted(
        {g for r in runs for g in r["metrics"]["groups"]}, key=lambda g: int(g.split("-")[0].rstrip("+"))
    )
    header = [
        "run",
        "backbone",
        "head",
        "px",
        "epochs",
        "wall time",
        "val MAE",
        "test MAE",
        "test images",
        "RMSE",
        "CS@5",
        *[f"MAE {g}" for g in groups],
        interval_heading(runs),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        m, c, info = r["metrics"], r["config"], r["run"]
        coverage = coverage_cell(r, per_cell=interval_heading(runs) == "interval coverage")
        cells = [
            r["name"],
            c["model"]["backbone"],
            c["model"]["head"]
            + (" + age weights" if c["optim"]["age_weighting"] else "")
            + (f" + balanced by {c['data']['balance_by']}" if c["data"].get("balance_by") else ""),
            str(c["data"]["image_size"]),
            str(info["epochs_run"]),
            f"{info['wall_time'] / 60:.0f} min",
            f"{saved_val_mae(r):.2f}",
            f"**{m['mae']:.2f}**",
            f"{m['count']:,}" if "count" in m else "-",
            f"{m['rmse']:.2f}",
            f"{m['cs']['5']:.1%}",
            *[f"{m['groups'][g]['mae']:.2f}" if g in m["groups"] else "-" for g in groups],
            coverage,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
