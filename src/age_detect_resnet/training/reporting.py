"""What a run writes besides its checkpoints: the learning curves, the final test of the best model,
and the run's report (report.md, run.json); where, is the run folder's (run_folder.py)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from age_detect_resnet.atomic import atomic_path, write_text_atomic
from age_detect_resnet.data.splits import PreparedData
from age_detect_resnet.evaluation.plots import plot_curves
from age_detect_resnet.evaluation.report import (
    evaluation_metrics,
    metrics_markdown,
    prediction_frame,
    write_evaluation,
)
from age_detect_resnet.extras import install_command
from age_detect_resnet.inference.predictor import prediction_grid
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.run_folder import RunFolder
from age_detect_resnet.training.config import Config
from age_detect_resnet.training.distributed import Distributed
from age_detect_resnet.training.engine import check_images_read, evaluate

log = logging.getLogger(__name__)


def write_history(history: list[dict[str, float]], run: RunFolder) -> None:
    frame = pd.DataFrame(history)
    with atomic_path(run.metrics) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    plot_curves(frame, run.plots)


def open_tensorboard(config: Config, run: RunFolder):
    """A TensorBoard writer where asked for and installed, else None (asked for, the default, but not
    installed: a log line saying how to install it; training goes on without it)."""
    if not config.train.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        log.info("no TensorBoard logs for this run (%s): %s", err, install_command("tensorboard"))
        return None
    return SummaryWriter(log_dir=str(run.tensorboard))


def final_test(
    config: Config,
    prepared: PreparedData,
    loader: DataLoader,
    run: RunFolder,
    dist: Distributed,
    autocast,
    *,
    progress: bool,
) -> dict[str, Any]:
    """The best model on the test split: predictions, metrics, figures and the prediction grid."""
    best = checkpoint.load_model(run.best, dist.device)
    if config.train.channels_last:
        best = best.to(memory_format=torch.channels_last)
    tested, predictions = evaluate(
        best,
        loader,
        device=dist.device,
        autocast=autocast,
        channels_last=config.train.channels_last,
        desc="test",
        progress=progress,
    )
    check_images_read(tested, "the final test", prepared.root)
    test_table = prepared.split("test")
    frame = prediction_frame(test_table, predictions, best)
    metrics = evaluation_metrics(frame, best.head)
    write_evaluation(
        frame,
        metrics,
        run.path,
        title=f"Test split of {run.name}",
        extra={"model": str(run.best), "split": "test"},
    )
    if config.train.grid_size > 0 and len(frame):
        # Test photos with the ages the test gave them (predictions.csv's), not predicted again
        sample = frame.sample(min(config.train.grid_size, len(frame)), random_state=config.train.seed)
        prediction_grid(
            best,
            [prepared.root / p for p in sample["path"]],
            sample["age"].tolist(),
            run.plots / "grid.png",
            device=dist.device,
            predicted=sample["predicted"].tolist(),
        )
    return metrics


def write_run_report(
    run: RunFolder,
    config: Config,
    prepared: PreparedData,
    history: list[dict[str, float]],
    test_metrics: dict[str, Any],
    info: dict[str, Any],
) -> None:
    counts = prepared.table["split"].value_counts()
    best_row = min(history, key=lambda row: row["val_mae"])
    removed = (
        ", ".join(f"{k} {v:,}" for k, v in prepared.removed.items())
        if prepared.removed
        else "not recounted by a continued run (see the first run's log)"
    )
    optim = config.optim
    loop = [
        f"gradients clipped to norm {optim.clip_grad_norm:g}" if optim.clip_grad_norm else "",
        f"{optim.accumulate} batches per step" if optim.accumulate > 1 else "",
        f"EMA weights (decay {optim.ema_decay:g}) validated and saved" if optim.ema_decay else "",
    ]
    lines = [
        f"# Run {run.name}",
        "",
        f"- command: `{info['command']}`",
        f"- hardware: {info['hardware']}; precision {info['precision']}",
        f"- wall time: {info['wall_time'] / 60:.1f} min ({info['stop_reason']})",
        f"- data: {config.data.dataset} at {config.data.data_root}; "
        f"ages {config.data.min_age}-{config.data.max_age}; train {counts.get('train', 0):,} / "
        f"val {counts.get('val', 0):,} / test {counts.get('test', 0):,} images "
        f"(split by person where known, stratified by age; see split.csv)",
        f"- removed before splitting: {removed}",
        f"- unreadable images skipped: {info['skipped']:,}",
        *(
            [
                f"- faces aligned by their detected landmarks: {info['alignment']['faces_found']:,}; "
                f"no face found, aligned by the median landmarks: "
                f"{info['alignment']['no_face_median_landmarks']:,}"
            ]
            if info.get("alignment")
            else []
        ),
        f"- model: {config.model.backbone} + {config.model.head} head, {config.data.image_size} px, "
        f"AdamW lr {optim.lr:g} ({optim.schedule}), batch {config.train.batch_size}"
        + "".join(f"; {item}" for item in loop if item),
        f"- best epoch {int(best_row['epoch'])}: validation MAE {best_row['val_mae']:.2f}",
        *(norm_statistics_lines(info["norm_statistics"]) if info.get("norm_statistics") else []),
        "",
        "## Test split (best model)",
        "",
        metrics_markdown(test_metrics),
        "![loss](plots/loss.png) ![mae](plots/mae.png)",
        "",
        "![predicted vs true](plots/pred_vs_true.png) ![errors per group](plots/group_errors.png)",
        "",
        "![prediction grid](plots/grid.png)" if config.train.grid_size > 0 else "",
    ]
    write_text_atomic(run.report, "\n".join(lines) + "\n")
    summary = {
        **info,
        "best_epoch": int(best_row["epoch"]),
        "best_val_mae": best_row["val_mae"],
        "epochs_run": len(history),
        "splits": {k: int(v) for k, v in counts.items()},
    }
    write_text_atomic(run.summary, json.dumps(summary, indent=2) + "\n")


def norm_statistics_lines(record: dict[str, Any]) -> list[str]:
    """The report's line on the best model's recomputed batch-norm statistics (best_statistics.py)."""
    outcome = "kept" if record["kept"] else "not kept, the epoch's statistics were better"
    return [
        f"- batch-norm statistics recomputed on {record['recomputed_on_training_images']:,} training "
        f"faces: validation MAE {record['val_mae_before']:.2f} -> {record['val_mae_after']:.2f} ({outcome})"
    ]
