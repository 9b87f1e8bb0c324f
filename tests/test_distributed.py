"""DDP under torchrun, 2 CPU processes (Gloo): metrics over the whole validation set, rank-0 files, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from age_detect_resnet.data.dataset import AgeDataset, FileImages, make_loader
from age_detect_resnet.data.splits import load_split
from age_detect_resnet.modeling.checkpoint import load_model
from age_detect_resnet.runtime import autocast_factory
from age_detect_resnet.training.engine import evaluate


def torchrun(data_root, out, *extra):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29561",
        "-m",
        "age_detect_resnet.train",
        "--dataset",
        "utkface",
        "--data-root",
        str(data_root),
        "--backbone",
        "mobilenet_v2",
        "--no-pretrained",
        "--image-size",
        "40",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--num-workers",
        "0",
        "--lr",
        "1e-3",
        "--no-progress",
        "--grid-size",
        "0",
        "--no-tensorboard",
        "--precision",
        "fp32",
        "--out",
        str(out),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_process_run_reports_metrics_over_the_whole_validation_set(utkface_sample, tmp_path):
    run = tmp_path / "ddp"
    done = torchrun(utkface_sample, run)
    assert done.stderr.count("INFO epoch 1: train loss") == 1  # the main process alone reports (was 2)
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]  # one row per epoch: written by rank 0 only
    best_epoch = metrics.loc[metrics["val_mae"].idxmin()]
    # the same model evaluated in one process over the whole validation split gives the same MAE
    model = load_model(run)
    prepared = load_split(run / "split.csv", utkface_sample)
    val = prepared.split("val")
    loader = make_loader(
        AgeDataset(FileImages(utkface_sample, val["path"].tolist(), 40), val["age"].to_numpy()),
        batch_size=8,
        train=False,
        num_workers=0,
        device=torch.device("cpu"),
    )
    single, _ = evaluate(
        model,
        loader,
        device=torch.device("cpu"),
        autocast=autocast_factory(torch.device("cpu"), "fp32"),
        progress=False,
    )
    assert single["images"] == len(val)
    # The best model's batch-norm statistics were recomputed on both processes' training faces,
    # averaged, and validated over the whole split: one process finds the MAE best.json records.
    saved = json.loads((run / "best.json").read_text())
    record = saved["norm_statistics"]
    train = prepared.split("train")
    assert record["recomputed_on_training_images"] == 2 * (len(train) // 2 // 8) * 8
    assert record["val_mae_before"] == pytest.approx(best_epoch["val_mae"], abs=1e-4)
    assert single["mae"] == pytest.approx(saved["val_mae"], abs=1e-3)

    torchrun(utkface_sample, run, "--resume", "--epochs", "3")
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
