"""`age-detect compare`'s val MAE is the kept model's, the one beside which its test MAE stands."""

from __future__ import annotations

import json
from pathlib import Path

from age_detect_resnet.evaluation.compare import comparison_table, load_run


def _finished_run(folder: Path, *, best_json: dict | None) -> Path:
    """The files compare reads, as training writes them: run.json's best_val_mae is the best epoch's
    before its batch-norm statistics were recomputed; best.json's val_mae the kept model's, after."""
    folder.mkdir()
    files = {
        "run.json": {"epochs_run": 1, "wall_time": 60, "best_val_mae": 30.67, "hardware": "cpu"},
        "evaluation.json": {
            "metrics": {"mae": 28.17, "rmse": 31.9, "cs": {"5": 0.0}, "groups": {}, "count": 8}
        },
        "config.json": {
            "model": {"backbone": "resnet18", "head": "distribution", "interval": 0.8},
            "optim": {"age_weighting": False},
            "data": {"image_size": 40},
        },
    }
    if best_json is not None:
        files["best.json"] = best_json
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def _val_mae_cell(table: str) -> str:
    header, _, row = table.splitlines()[:3]
    return row.split(" | ")[header.split(" | ").index("val MAE")]


def test_compare_shows_the_kept_models_validation_mae(tmp_path):
    recomputed = _finished_run(tmp_path / "recomputed", best_json={"val_mae": 30.06})
    assert _val_mae_cell(comparison_table([load_run(recomputed)])) == "30.06"
    # A best.json without one (or none at all): the best epoch's, from run.json.
    for name, best in (("older", {"image_size": 40}), ("no-best", None)):
        run = _finished_run(tmp_path / name, best_json=best)
        assert _val_mae_cell(comparison_table([load_run(run)])) == "30.67"
