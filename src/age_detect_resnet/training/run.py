"""Train an age model, keep the best by validation MAE, evaluate it on the test split, write a report.

    python -m age_detect_resnet.train                                 # the seed: IMDB-WIKI in data/raw
    age-detect train --dataset utkface --data-root ../shared/data/utkface \\
        --weights ../shared/weights/resnet50_imagenet_v1_fp16.safetensors --config cpu
    age-detect train --out runs/NAME --resume                           # continue an interrupted run
    torchrun --nproc_per_node=4 -m age_detect_resnet.train --config ... # DDP: NCCL on GPUs, Gloo on CPUs

Everything the run produces lands in its folder (runs/<dataset>-<backbone>-<head> by default):
config.json, split.csv, metrics.csv, best.safetensors + best.json, last.pt, plots/*.png,
predictions.csv, evaluation.json/.md (test split), report.md, and tensorboard/ when installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from age_detect_resnet.atomic import atomic_path, write_text_atomic
from age_detect_resnet.data.cache import CacheAlignment, prepare_cache
from age_detect_resnet.data.dataset import FileImages, ImageSource, ShardSampler, build_datasets, make_loader
from age_detect_resnet.data.sources import image_root
from age_detect_resnet.data.splits import PreparedData, load_split, prepare_splits, save_split
from age_detect_resnet.evaluation.plots import plot_curves
from age_detect_resnet.evaluation.report import (
    evaluation_metrics,
    metrics_markdown,
    prediction_frame,
    write_evaluation,
)
from age_detect_resnet.faces.align import Aligner
from age_detect_resnet.faces.detection import training_framing
from age_detect_resnet.images import ImageReadError
from age_detect_resnet.inference.predictor import prediction_grid
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.heads import DistributionHead
from age_detect_resnet.modeling.model import AgeModel, WeightsError, create_model
from age_detect_resnet.runtime import autocast_factory, hardware_summary, resolve_precision, seed_everything
from age_detect_resnet.training.config import (
    Config,
    ConfigError,
    add_config_arguments,
    overrides_from_args,
    resolve_config,
    save_config,
)
from age_detect_resnet.training.distributed import Distributed, cleanup_distributed, setup_distributed
from age_detect_resnet.training.engine import NonFiniteLossError, evaluate, train_one_epoch

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What `--resume` restores: the epoch to start from, the best score so far and the history."""

    epoch: int = 0
    best_mae: float = math.inf
    history: list[dict[str, float]] | None = None

    def rows(self) -> list[dict[str, float]]:
        if self.history is None:
            self.history = []
        return self.history


def lr_lambda(config: Config, steps_per_epoch: int):
    """Multiplier of the base lr per step: linear warm-up, then constant (seed) or cosine to zero."""
    warmup = int(config.optim.warmup_epochs * steps_per_epoch)
    total = max(1, config.train.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.optim.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def start_from_trained(config: Config, device: torch.device) -> AgeModel:
    """The trained age model named by --init, in training mode: the two-stage recipe (a large dataset
    first, then one's own). Its architecture is the run's (see `adopt_init_architecture`)."""
    model = checkpoint.load_model(config.model.init, device).train()
    log.info(
        "starting from the trained model %s (%s + %s head, validation MAE %s)",
        config.model.init,
        model.backbone_name,
        model.head.kind,
        model.metadata.get("val_mae", "?"),
    )
    model.metadata = {}
    return model


def adopt_init_architecture(config: Config) -> Config:
    """With --init, the backbone and head settings are the trained model's, so config.json says what
    was really trained; without it, `config` unchanged."""
    if not config.model.init:
        return config
    description = checkpoint.read_metadata(checkpoint.resolve_model_path(config.model.init))["model"]
    head = description["head"]
    adopted = {
        "backbone": description["backbone"],
        "head": head["kind"],
        "pretrained": False,
        "weights": None,
    }
    for name in ("hidden_dim", "label_sigma", "expectation_weight", "interval"):
        if name in head:
            adopted[name] = head[name]
    changed = {k: v for k, v in adopted.items() if getattr(config.model, k) != v}
    if changed:
        log.info("--init %s sets %s", config.model.init, ", ".join(f"{k}={v}" for k, v in changed.items()))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **adopted))


def inverse_frequency_weights(ages: np.ndarray, max_weight: float = 10.0) -> torch.Tensor:
    """(101,) loss weight per age: inverse of the age's frequency (smoothed over +-2 years),
    normalised to mean 1 over the training samples and capped, so rare ages count more."""
    counts = np.bincount(np.clip(np.round(ages).astype(int), 0, 100), minlength=101).astype(float)
    smoothed = np.convolve(counts, np.ones(5) / 5, mode="same")
    weights = 1.0 / np.maximum(smoothed, 1.0)
    weights /= (weights[np.clip(np.round(ages).astype(int), 0, 100)]).mean()
    return torch.tensor(np.minimum(weights, max_weight), dtype=torch.float32)


def image_sources(prepared: PreparedData, config: Config, dist: Distributed) -> dict[str, ImageSource]:
    """Per split: the files themselves, or views into the prepared cache (built once, by rank 0)."""
    data = config.data
    if not data.cache:
        return {
            s: FileImages(prepared.root, prepared.split(s)["path"].tolist(), data.image_size)
            for s in ("train", "val", "test")
        }
    paths = prepared.table["path"].tolist()
    alignment = cache_alignment(config)
    if dist.is_main:
        prepare_cache(
            prepared.root,
            paths,
            image_size=data.image_size,
            cache_dir=Path(data.cache_dir),
            workers=max(1, data.num_workers),
            framing=alignment,
        )
    dist.barrier()
    cache = prepare_cache(
        prepared.root, paths, image_size=data.image_size, cache_dir=Path(data.cache_dir), framing=alignment
    )
    rows = {s: np.flatnonzero(prepared.table["split"].to_numpy() == s) for s in ("train", "val", "test")}
    views = {s: cache.subset(rows[s]) for s in rows}
    # Only `photo` augmentation uses the context border; every other reader sees the aligned crop.
    return {
        s: view if (s == "train" and data.augment == "photo") else view.centre(data.image_size)
        for s, view in views.items()
    }


def cache_alignment(config: Config) -> CacheAlignment | None:
    """How the cache frames training faces: detector + aligner (--align), or a plain resize."""
    if not config.data.align:
        return None
    return CacheAlignment(Aligner(), detector_model=config.data.detector_model)


def build_loaders(
    prepared: PreparedData, config: Config, dist: Distributed
) -> tuple[dict[str, DataLoader], DistributedSampler | None]:
    data, train = config.data, config.train
    datasets = build_datasets(
        {s: prepared.split(s) for s in ("train", "val", "test")},
        image_sources(prepared, config, dist),
        image_size=data.image_size,
        augment=data.augment,
        skip_bad_images=data.skip_bad_images,
    )
    per_process = max(1, train.batch_size // dist.world)
    train_sampler = (
        DistributedSampler(
            datasets["train"], num_replicas=dist.world, rank=dist.rank, seed=train.seed, drop_last=True
        )
        if dist.enabled
        else None
    )
    common = {"num_workers": data.num_workers, "device": dist.device}
    loaders = {
        "train": make_loader(
            datasets["train"],
            batch_size=per_process,
            train=True,
            sampler=train_sampler,
            generator=torch.Generator(),
            persistent=not train.deterministic,
            **common,
        ),
        "val": make_loader(
            datasets["val"],
            batch_size=per_process,
            train=False,
            sampler=ShardSampler(len(datasets["val"]), dist.rank, dist.world),
            **common,
        ),
        "test": make_loader(datasets["test"], batch_size=per_process, train=False, **common),
    }
    if len(loaders["train"]) == 0:
        raise ConfigError(
            f"the training split has {len(datasets['train'])} images, fewer than one batch of "
            f"{per_process}; lower --batch-size or use more data"
        )
    return loaders, train_sampler


def model_metadata(config: Config, prepared: PreparedData, framing: dict[str, Any]) -> dict[str, Any]:
    metadata = {
        "image_size": config.data.image_size,
        "age_range": [config.data.min_age, config.data.max_age],
        "dataset": config.data.dataset,
        "crop": framing,
        "train_images": int((prepared.table["split"] == "train").sum()),
    }
    alignment = cache_alignment(config)
    if alignment is not None:
        metadata["alignment"] = alignment.aligner.to_metadata()
    if config.model.init:
        metadata["init"] = config.model.init
    return metadata


def write_history(history: list[dict[str, float]], run_dir: Path) -> None:
    frame = pd.DataFrame(history)
    with atomic_path(run_dir / "metrics.csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    plot_curves(frame, run_dir / "plots")


def open_tensorboard(config: Config, run_dir: Path):
    if not config.train.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def should_stop(history: list[dict[str, float]], config: Config) -> str | None:
    """The seed's rule (validation loss no longer moves) or the patience rule, as a reason."""
    if len(history) >= 2 and abs(history[-1]["val_loss"] - history[-2]["val_loss"]) < config.train.min_delta:
        return f"validation loss changed by less than {config.train.min_delta:g}"
    patience = config.train.patience
    if patience > 0:
        maes = [row["val_mae"] for row in history]
        if len(maes) - 1 - int(np.argmin(maes)) >= patience:
            return f"no better validation MAE for {patience} epochs"
    return None


def restore(run_dir: Path, model: AgeModel, optimizer, scheduler, scaler) -> RunState:
    state = checkpoint.load_training_state(run_dir / checkpoint.LAST)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    if isinstance(model.head, DistributionHead):
        model.head.interval_quantile_level = state["interval_quantile_level"]
    log.info(
        "resuming %s after epoch %d (best validation MAE %.3f)", run_dir, state["epoch"], state["best_mae"]
    )
    return RunState(epoch=state["epoch"], best_mae=state["best_mae"], history=state["history"])


def final_test(
    config: Config,
    prepared: PreparedData,
    loader: DataLoader,
    run_dir: Path,
    dist: Distributed,
    autocast,
    *,
    progress: bool,
) -> dict[str, Any]:
    """The best model on the test split: predictions, metrics, figures and the prediction grid."""
    best = checkpoint.load_model(run_dir / checkpoint.BEST, dist.device)
    if config.train.channels_last:
        best = best.to(memory_format=torch.channels_last)
    _, predictions = evaluate(
        best,
        loader,
        device=dist.device,
        autocast=autocast,
        channels_last=config.train.channels_last,
        desc="test",
        progress=progress,
    )
    test_table = prepared.split("test")
    frame = prediction_frame(test_table, predictions, best)
    metrics = evaluation_metrics(frame, best)
    write_evaluation(
        frame,
        metrics,
        run_dir,
        title=f"Test split of {run_dir.name}",
        extra={"model": str(run_dir / checkpoint.BEST), "split": "test"},
    )
    if config.train.grid_size > 0 and len(test_table):
        sample = test_table.sample(
            min(config.train.grid_size, len(test_table)), random_state=config.train.seed
        )
        prediction_grid(
            best,
            [prepared.root / p for p in sample["path"]],
            sample["age"].tolist(),
            run_dir / "plots" / "grid.png",
            device=dist.device,
        )
    return metrics


def write_run_report(
    run_dir: Path,
    config: Config,
    prepared: PreparedData,
    history: list[dict[str, float]],
    test_metrics: dict[str, Any],
    info: dict[str, Any],
) -> None:
    counts = prepared.table["split"].value_counts()
    best_row = min(history, key=lambda row: row["val_mae"])
    lines = [
        f"# Run {run_dir.name}",
        "",
        f"- command: `{info['command']}`",
        f"- hardware: {info['hardware']}; precision {info['precision']}",
        f"- wall time: {info['wall_time'] / 60:.1f} min ({info['stop_reason']})",
        f"- data: {config.data.dataset} at {config.data.data_root}; "
        f"ages {config.data.min_age}-{config.data.max_age}; train {counts.get('train', 0):,} / "
        f"val {counts.get('val', 0):,} / test {counts.get('test', 0):,} images "
        f"(split by person where known, stratified by age; see split.csv)",
        "- removed before splitting: " + ", ".join(f"{k} {v:,}" for k, v in prepared.removed.items()),
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
        f"AdamW lr {config.optim.lr:g} ({config.optim.schedule}), batch {config.train.batch_size}",
        f"- best epoch {int(best_row['epoch'])}: validation MAE {best_row['val_mae']:.2f}",
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
    write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")
    summary = {
        **info,
        "best_epoch": int(best_row["epoch"]),
        "best_val_mae": best_row["val_mae"],
        "epochs_run": len(history),
        "splits": {k: int(v) for k, v in counts.items()},
    }
    write_text_atomic(run_dir / "run.json", json.dumps(summary, indent=2) + "\n")


def train(
    config: Config, *, resume: bool = False, progress: bool = True, command: str = ""
) -> dict[str, Any]:
    """Run the whole job for `config`; returns the test metrics (on rank 0; {} elsewhere)."""
    started = time.perf_counter()
    dist = setup_distributed(config.train.device)
    run_dir = config.run_dir()
    seed_everything(config.train.seed + dist.rank, deterministic=config.train.deterministic)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.json")
    split_file = run_dir / "split.csv"
    if resume and split_file.is_file():
        prepared = load_split(split_file, image_root(config.data.dataset, Path(config.data.data_root)))
    else:
        prepared = prepare_splits(config.data, seed=config.train.seed)
        if dist.is_main:
            save_split(prepared, split_file)
    loaders, train_sampler = build_loaders(prepared, config, dist)
    train_ages = prepared.split("train")["age"].to_numpy(dtype=float)

    model = (
        start_from_trained(config, dist.device)
        if config.model.init
        else create_model(
            config.model.backbone,
            config.model.head,
            pretrained=config.model.pretrained,
            weights=Path(config.model.weights) if config.model.weights else None,
            hidden_dim=config.model.hidden_dim,
            init_age=float(train_ages.mean()),
            min_age=config.data.min_age,
            max_age=config.data.max_age,
            label_sigma=config.model.label_sigma,
            expectation_weight=config.model.expectation_weight,
            interval=config.model.interval,
        )
    ).to(dist.device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision = resolve_precision(config.train.precision, dist.device)
    autocast = autocast_factory(dist.device, precision)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, len(loaders["train"])))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    state = restore(run_dir, model, optimizer, scheduler, scaler) if resume else RunState()

    runnable: torch.nn.Module = model
    if dist.enabled:
        runnable = DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    if config.train.compile:
        runnable = torch.compile(runnable)
    age_weights = (
        inverse_frequency_weights(train_ages).to(dist.device) if config.optim.age_weighting else None
    )
    framing = (
        {"method": "aligned by five landmarks (see alignment)"}
        if config.data.align
        else training_framing(
            config.data.dataset,
            prepared.root,
            prepared.split("train")["path"].tolist(),
            detector_model=config.data.detector_model,
        )
        if dist.is_main
        else {}
    )
    metadata = model_metadata(config, prepared, framing)
    faces_found = getattr(loaders["train"].dataset.images, "alignment", None)
    if faces_found and "alignment" in metadata:
        metadata["alignment"]["training_images"] = {
            k: v for k, v in faces_found.items() if k in ("faces_found", "no_face_median_landmarks")
        }
    writer = open_tensorboard(config, run_dir) if dist.is_main else None
    main_progress = progress and dist.is_main
    stop_reason, skipped = f"all {config.train.epochs} epochs", 0
    for epoch in range(state.epoch + 1, config.train.epochs + 1):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        loaders["train"].generator.manual_seed(config.train.seed * 1000 + epoch)
        trained = train_one_epoch(
            runnable,
            loaders["train"],
            optimizer,
            device=dist.device,
            autocast=autocast,
            epoch=epoch,
            scheduler=scheduler,
            scaler=scaler,
            age_weights=age_weights,
            channels_last=config.train.channels_last,
            reduce=dist.all_reduce_sum,
            progress=main_progress,
            module=model,
        )
        validated, val_predictions = evaluate(
            runnable,
            loaders["val"],
            device=dist.device,
            autocast=autocast,
            channels_last=config.train.channels_last,
            reduce=dist.all_reduce_sum,
            progress=main_progress,
            desc=f"epoch {epoch} val",
            module=model,
        )
        skipped += int(trained["skipped"] + validated["skipped"])
        row = {
            "epoch": epoch,
            "train_loss": trained["loss"],
            "train_mae": trained["mae"],
            "val_loss": validated["loss"],
            "val_mae": validated["mae"],
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": trained["seconds"],
            "train_images_per_s": trained["images"] / max(trained["seconds"], 1e-9),
            "skipped": skipped,
        }
        state.rows().append(row)
        log.info(
            "epoch %d: train loss %.3f MAE %.2f | val loss %.3f MAE %.2f | %.0f s",
            epoch,
            row["train_loss"],
            row["train_mae"],
            row["val_loss"],
            row["val_mae"],
            row["seconds"],
        )
        improved = validated["mae"] < state.best_mae
        if improved:
            state.best_mae = validated["mae"]
            if isinstance(model.head, DistributionHead):  # on this process's share of the validation set
                model.head.calibrate_interval(
                    torch.from_numpy(val_predictions.outputs).to(dist.device),
                    torch.from_numpy(val_predictions.ages).to(dist.device),
                )
        if dist.is_main:
            if improved:
                checkpoint.save_model(
                    model,
                    run_dir / checkpoint.BEST,
                    {**metadata, "epoch": epoch, "val_mae": validated["mae"]},
                )
            checkpoint.save_training_state(
                run_dir / checkpoint.LAST,
                {
                    "epoch": epoch,
                    "best_mae": state.best_mae,
                    "history": state.history,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": checkpoint.rng_state(),
                    **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                    "interval_quantile_level": getattr(model.head, "interval_quantile_level", 0.0),
                },
            )
            write_history(state.history, run_dir)
            if writer is not None:
                for key, value in row.items():
                    if key != "epoch":
                        writer.add_scalar(key, value, epoch)
        reason = should_stop(state.history, config)
        if reason:
            stop_reason = f"stopped early after epoch {epoch}: {reason}"
            log.info("%s", stop_reason)
            break
    dist.barrier()
    if writer is not None:
        writer.close()
    if not dist.is_main:
        return {}
    test_metrics = final_test(config, prepared, loaders["test"], run_dir, dist, autocast, progress=progress)
    write_run_report(
        run_dir,
        config,
        prepared,
        state.rows(),
        test_metrics,
        {
            "command": command,
            "hardware": hardware_summary(dist.device),
            "precision": precision,
            "wall_time": time.perf_counter() - started,
            "stop_reason": stop_reason,
            "skipped": skipped,
            "alignment": faces_found,
        },
    )
    log.info("test MAE %.2f; report in %s", test_metrics["mae"], run_dir / "report.md")
    return test_metrics


def config_for_run(args: argparse.Namespace) -> Config:
    """Defaults, the config file, the command line; on --resume the run's saved config replaces the
    defaults and file, so a continued run keeps its settings (command-line values still apply)."""
    overrides = overrides_from_args(args)
    config = resolve_config(args.config, overrides)
    saved = config.run_dir() / "config.json"
    if args.resume and saved.is_file():
        config = resolve_config(saved, overrides)
    return adopt_init_architecture(config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def run(
    args: argparse.Namespace, argv: Sequence[str] | None = None, *, prog: str = "age-detect train"
) -> int:
    try:
        config = config_for_run(args)
        command = " ".join([prog, *(argv if argv is not None else sys.argv[1:])])
        train(config, resume=args.resume, progress=not args.no_progress, command=command)
    except KeyboardInterrupt:
        log.error(
            "interrupted; the last finished epoch is saved: continue with the same command plus --resume"
        )
        return 130
    except (
        ConfigError,
        WeightsError,
        ImageReadError,
        checkpoint.ModelFileError,
        NonFiniteLossError,
        FileNotFoundError,
        ValueError,
    ) as err:
        log.error("%s", err)
        return 2
    finally:
        cleanup_distributed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    parser = argparse.ArgumentParser(
        prog="age-detect train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
