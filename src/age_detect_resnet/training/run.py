"""A training run, from its settings to its report: `train(config)`.

    python -m age_detect_resnet.train                                 # the seed: IMDB-WIKI in data/raw
    age-detect train --dataset utkface --data-root ../shared/data/utkface \\
        --weights ../shared/weights/resnet50_imagenet_v1_fp16.safetensors --config cpu
    age-detect train --out runs/NAME --resume                         # continue an interrupted run
    torchrun --nproc_per_node=4 -m age_detect_resnet.train --config ... # DDP: NCCL on GPUs, Gloo on CPUs

`train` is wiring, in the order a run happens (as torchvision's reference `main`): the run folder and
settings, the split, the loaders, the model, the optimiser and schedule, the training state (restored
on --resume), the epochs (`fit`), the best model's batch-norm statistics, the final test and the
report. What each step builds has its own module: loaders.py, models.py, optim.py, state.py,
engine.py (the loops), best_statistics.py, reporting.py. What the run folder holds is
run_folder.py's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from age_detect_resnet.data.sources import image_root
from age_detect_resnet.data.splits import PreparedData, load_split, prepare_splits, save_split
from age_detect_resnet.faces.detection import training_framing
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.model import AgeModel
from age_detect_resnet.run_folder import RunFolder, RunFolderError, SavedSplit, lineage, named_in_lineage
from age_detect_resnet.runtime import autocast_factory, hardware_summary, resolve_precision, seed_everything
from age_detect_resnet.training.best_statistics import recompute_best_statistics
from age_detect_resnet.training.config import Config, ConfigError, resolve_config, save_config
from age_detect_resnet.training.distributed import Distributed, setup_distributed
from age_detect_resnet.training.ema import ModelEma
from age_detect_resnet.training.engine import check_images_read, evaluate, train_one_epoch
from age_detect_resnet.training.loaders import EpochSampler, build_loaders
from age_detect_resnet.training.models import build_model, model_metadata
from age_detect_resnet.training.optim import (
    create_optimizer,
    create_scheduler,
    inverse_frequency_weights,
    optimizer_steps_per_epoch,
)
from age_detect_resnet.training.reporting import final_test, open_tensorboard, write_history, write_run_report
from age_detect_resnet.training.state import TrainingState, check_same_settings, read_state

log = logging.getLogger(__name__)


def train(
    config: Config, *, resume: bool = False, progress: bool = True, command: str = ""
) -> dict[str, Any]:
    """Run the whole job for `config`; returns the test metrics (on rank 0; {} elsewhere)."""
    started = time.perf_counter()
    dist = setup_distributed(config.train.device)
    run = RunFolder(config.run_dir())
    # Refused before anything is written: a run that cannot start leaves its folder as it was.
    check_out_folder(run)
    precision = resolve_precision(config.train.precision, dist.device)  # fp16 on a CPU is refused
    if resume:
        saved_state = state_to_resume(config, run)
        done = finished(saved_state.get("history", []), config)
        if done and run.report.is_file():  # the report is written last: nothing is left to do
            log.info(
                "%s is finished (%s) and reported in %s: nothing to continue, nothing was changed%s",
                run.path,
                done,
                run.report,
                "" if done.startswith("stopped early") else "; pass a larger --epochs to train it further",
            )
            return saved_test_metrics(run)
    else:
        run.check_new(continue_with="--resume")
    seed_everything(config.train.seed + dist.rank, deterministic=config.train.deterministic)
    if dist.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(config, run.config)
    prepared = split_for_run(config, run, dist, resume=resume)
    loaders, train_sampler = build_loaders(prepared, config, dist)
    train_ages = prepared.split("train")["age"].to_numpy(dtype=float)

    model = build_model(config, train_ages, dist.device, resume=resume)
    autocast = autocast_factory(dist.device, precision)
    optimizer = create_optimizer(config, model)
    scheduler = create_scheduler(config, optimizer, optimizer_steps_per_epoch(config, len(loaders["train"])))
    state = TrainingState(
        model,
        optimizer,
        scheduler,
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
        ema=ModelEma(model, config.optim.ema_decay) if config.optim.ema_decay else None,
    )
    if resume:
        state.restore(run.last, saved_state)
        state.best_mae = saved_best_mae(run, state.best_mae)
        log.info(
            "resuming %s after epoch %d (best validation MAE %.3f)", run.path, state.epoch, state.best_mae
        )
    resumed_after = state.epoch  # the wall time below is this session's: earlier sessions' is not saved

    aligned_counts = getattr(loaders["train"].dataset.images, "alignment", None)
    metadata = model_metadata(config, prepared, framing_metadata(config, prepared, dist), aligned_counts)
    stop_reason, skipped = fit(
        config, state, loaders, train_sampler, run, dist, autocast, metadata, train_ages, progress=progress
    )
    norm_statistics = recompute_best_statistics(
        config, run, loaders, train_sampler, dist, autocast, progress=progress
    )
    if not dist.is_main:
        return {}
    test_metrics = final_test(config, prepared, loaders["test"], run, dist, autocast, progress=progress)
    info = {
        "command": command,
        "hardware": hardware_summary(dist.device),
        "precision": precision,
        "wall_time": time.perf_counter() - started,
        "stop_reason": f"this session only, resumed after epoch {resumed_after}; {stop_reason}"
        if resume
        else stop_reason,
        "skipped": skipped,
        "alignment": aligned_counts,
        "norm_statistics": norm_statistics,
    }
    write_run_report(run, config, prepared, state.history, test_metrics, info)
    log.info("test MAE %.2f; report in %s", test_metrics["mae"], run.report)
    return test_metrics


def check_out_folder(run: RunFolder) -> None:
    """Refuse (RunFolderError) an --out that is a file, or lies under one: no run folder can be made
    there. The nearest part of the path that exists must be a folder."""
    for part in (run.path, *run.path.parents):
        if part.exists():
            if not part.is_dir():
                raise RunFolderError(
                    f"--out {run.path}: {part} is a file, not a folder; choose another --out "
                    "(nothing was changed)"
                )
            return


def state_to_resume(config: Config, run: RunFolder) -> dict[str, Any]:
    """The saved training state of the run `config` continues, read before anything is written; refused
    where there is none, where `config` changes a setting the run was trained with (state.py), or where
    its --epochs is fewer than the run has done: config.json and the report would then say the run
    had fewer epochs than its model trained, so a run is not shortened (a larger --epochs extends it)."""
    saved = read_state(run.last)
    if not run.config.is_file():
        raise RunFolderError(
            f"{run.config} does not exist, so {run.last} cannot be continued with the settings it was "
            "trained with; train into a new --out"
        )
    check_same_settings(
        resolve_config(run.config), config, run.config, split_file=run.split if run.split.is_file() else None
    )
    done = int(saved.get("epoch", 0))
    if config.train.epochs < done:
        raise ConfigError(
            f"--epochs {config.train.epochs} is fewer than the {done} epochs {run.path} has trained, and a "
            f"run cannot be shortened: continue it with --epochs {done} or more, or train into a new --out "
            "(nothing was changed)"
        )
    return saved


def finished(history: list[dict[str, float]], config: Config) -> str | None:
    """Why a run with this history has no epoch left to train under `config`: it stopped by its rule
    (`stopped_early`), or it has trained --epochs epochs; None while it has."""
    all_done = f"all {config.train.epochs} epochs" if len(history) >= config.train.epochs else None
    return stopped_early(history, config) or all_done


def saved_test_metrics(run: RunFolder) -> dict[str, Any]:
    """The test metrics of a finished run, as its final test wrote them ({} where unreadable)."""
    try:
        return json.loads(run.evaluation.read_text(encoding="utf-8"))["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def saved_best_mae(run: RunFolder, fallback: float) -> float:
    """The validation MAE of the run's saved best model, which a continued run's epochs must beat to
    replace it: the MAE in last.pt is the epoch's, from before the best model's batch-norm statistics
    were recomputed, and a kept recompute lowered it (`fallback` where no best model is saved)."""
    if not run.best.is_file():
        return fallback
    saved = checkpoint.read_metadata(run.best).get("val_mae")
    return float(saved) if saved is not None else fallback


def split_for_run(config: Config, run: RunFolder, dist: Distributed, *, resume: bool) -> PreparedData:
    """The cleaned, balanced table with its splits: the saved one on --resume, else made and saved."""
    if resume and run.split.is_file():
        return load_split(run.split, image_root(config.data.dataset, config.data.data_root))
    prepared = prepare_splits(config.data, seed=split_seed(config))
    if dist.is_main:
        save_split(prepared, run.split)
        own = SavedSplit(run.split, config.data.dataset, Path(config.data.data_root), str(run.path))
        warn_if_init_saw_held_out(config, own)
    return prepared


def warn_if_init_saw_held_out(config: Config, split: SavedSplit) -> None:
    """With --init from a model whose split is saved (a run, the bundled model), or made from one (its
    `lineage`: its own --init, the models it averages or ensembles), warn where that model trained on
    this run's validation or test images (`split`, this run's saved one; compared as `average` and
    `ensemble` compare them, `SavedSplit.shared`): their MAE would flatter the run."""
    if not config.model.init:
        return
    held_out = split.paths("val", "test")
    for source in lineage(config.model.init):
        saved = SavedSplit.of(source)
        if saved is None:
            continue
        seen = len(split.shared(("val", "test"), saved, ("train",)))
        if seen:
            log.warning(
                "%s trained on %s of this run's %s validation and test images, so their MAE "
                "flatters this run: split as its run did (its data settings and --split-seed) to keep them "
                "apart",
                named_in_lineage(source, config.model.init, given=f"--init {config.model.init}"),
                f"{seen:,}",
                f"{len(held_out):,}",
            )
            return


def split_seed(config: Config) -> int:
    """The seed of the run's split: --split-seed where set, else the run's --seed."""
    return config.train.seed if config.data.split_seed is None else config.data.split_seed


def framing_metadata(config: Config, prepared: PreparedData, dist: Distributed) -> dict[str, Any]:
    """How training faces were framed, for inference to repeat: aligned, or the measured margins."""
    if config.data.align:
        return {"method": "aligned by five landmarks (see alignment)"}
    if not dist.is_main:
        return {}
    return training_framing(
        config.data.dataset,
        prepared.root,
        prepared.split("train")["path"].tolist(),
        detector_model=config.data.detector_model,
    )


def runnable_model(config: Config, model: AgeModel, dist: Distributed) -> torch.nn.Module:
    """What the training loop calls: the model, wrapped in DDP across processes, compiled if asked."""
    runnable: torch.nn.Module = model
    if dist.enabled:
        runnable = DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    if config.train.compile:
        runnable = torch.compile(runnable)
    return runnable


def fit(
    config: Config,
    state: TrainingState,
    loaders: dict[str, DataLoader],
    train_sampler: EpochSampler | None,
    run: RunFolder,
    dist: Distributed,
    autocast,
    metadata: dict[str, Any],
    train_ages: np.ndarray,
    *,
    progress: bool,
) -> tuple[str, int]:
    """The epochs from `state.epoch + 1`: train, validate, keep the best, save the state, stop early.
    Returns why it stopped and how many unreadable images were skipped."""
    model = state.model
    runnable = runnable_model(config, model, dist)
    age_weights = (
        inverse_frequency_weights(train_ages, power=config.optim.age_weighting_power).to(dist.device)
        if config.optim.age_weighting
        else None
    )
    already = stopped_early(state.history, config)
    if already:  # a continued run that its rule stopped is finished: no epoch more
        return already, 0
    writer = open_tensorboard(config, run) if dist.is_main else None
    main_progress = progress and dist.is_main
    common = {"device": dist.device, "autocast": autocast, "channels_last": config.train.channels_last}
    stop_reason, skipped = f"all {config.train.epochs} epochs", 0
    root = image_root(config.data.dataset, config.data.data_root)  # named where no image can be read
    for epoch in range(state.epoch + 1, config.train.epochs + 1):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        loaders["train"].generator.manual_seed(config.train.seed * 1000 + epoch)
        trained = train_one_epoch(
            runnable,
            loaders["train"],
            state.optimizer,
            epoch=epoch,
            scheduler=state.scheduler,
            scaler=state.scaler,
            age_weights=age_weights,
            reduce=dist.all_reduce_sum,
            progress=main_progress,
            module=model,
            clip_grad_norm=config.optim.clip_grad_norm,
            accumulate=config.optim.accumulate,
            ema=state.ema,
            **common,
        )
        check_images_read(trained, f"epoch {epoch} training", root)
        # The EMA weights are a plain module: validated as they are (every process holds all of them).
        evaluated = state.evaluated_model
        validated, val_predictions = evaluate(
            runnable if state.ema is None else evaluated,
            loaders["val"],
            reduce=dist.all_reduce_sum,
            progress=main_progress,
            desc=f"epoch {epoch} val",
            module=evaluated,
            **common,
        )
        check_images_read(validated, f"epoch {epoch} validation", root)
        skipped += int(trained["skipped"] + validated["skipped"])
        row = {
            "epoch": epoch,
            "train_loss": trained["loss"],
            "train_mae": trained["mae"],
            "val_loss": validated["loss"],
            "val_mae": validated["mae"],
            "lr": state.optimizer.param_groups[0]["lr"],
            "seconds": trained["seconds"],
            "train_images_per_s": trained["images"] / max(trained["seconds"], 1e-9),
            "skipped": skipped,
        }
        log.info(
            "epoch %d: train loss %.3f MAE %.2f | val loss %.3f MAE %.2f | %.0f s",
            epoch,
            row["train_loss"],
            row["train_mae"],
            row["val_loss"],
            row["val_mae"],
            row["seconds"],
        )
        improved = state.record(row)
        if improved:  # calibrated on this process's share of the validation set
            evaluated.head.calibrate(
                torch.from_numpy(val_predictions.outputs).to(dist.device),
                torch.from_numpy(val_predictions.ages).to(dist.device),
            )
        if dist.is_main:
            if improved:
                checkpoint.save_model(
                    evaluated, run.best, {**metadata, "epoch": epoch, "val_mae": validated["mae"]}
                )
            state.save(run.last)
            write_history(state.history, run)
            if writer is not None:
                for key, value in row.items():
                    if key != "epoch":
                        writer.add_scalar(key, value, epoch)
        stopped = stopped_early(state.history, config)
        if stopped:
            stop_reason = stopped
            log.info("%s", stop_reason)
            break
    dist.barrier()
    if writer is not None:
        writer.close()
    return stop_reason, skipped


def stopped_early(history: list[dict[str, float]], config: Config) -> str | None:
    """Why a run with this history stopped after its last epoch (`should_stop`), or None. Checked on
    --resume too: a run that its rule stopped stays stopped, rather than train one epoch more each time."""
    reason = should_stop(history, config) if history else None
    return f"stopped early after epoch {int(history[-1]['epoch'])}: {reason}" if reason else None


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
