"""Training end to end on tiny real data: artefacts, resume, reload, config precedence, seed module path."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from age_detect_resnet.cli.train import main as train_main
from age_detect_resnet.data.splits import prepare_splits
from age_detect_resnet.inference import load_trained_model, predict_age_for_image
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.training.config import ConfigError, resolve_config
from age_detect_resnet.training.optim import inverse_frequency_weights
from age_detect_resnet.training.run import should_stop, split_seed
from age_detect_resnet.training.state import write_state
from conftest import train_tiny

ARTEFACTS = [
    "config.json",
    "split.csv",
    "metrics.csv",
    "best.safetensors",
    "best.json",
    "last.pt",
    "report.md",
    "predictions.csv",
    "evaluation.json",
    "evaluation.md",
    "plots/loss.png",
    "plots/mae.png",
    "plots/pred_vs_true.png",
    "plots/group_errors.png",
    "plots/grid.png",
]


def test_a_run_writes_every_artefact(tiny_run):
    for name in ARTEFACTS:
        assert (tiny_run / name).is_file(), name
    metrics = pd.read_csv(tiny_run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    assert {"train_loss", "train_mae", "val_loss", "val_mae", "lr", "seconds"} <= set(metrics.columns)
    meta = json.loads((tiny_run / "best.json").read_text())
    assert meta["image_size"] == 40 and meta["age_range"] == [0, 100]
    assert meta["model"]["backbone"] == "mobilenet_v2" and meta["model"]["head"]["kind"] == "regression"
    assert set(meta["crop"]["margins"]) == {"left", "top", "right", "bottom"}
    report = (tiny_run / "report.md").read_text()
    assert "Test split" in report and "| age group | images | MAE | mean signed error |" in report


def test_the_split_is_saved_and_shares_no_image(tiny_run):
    split = pd.read_csv(tiny_run / "split.csv")
    assert set(split["split"]) == {"train", "val", "test"}
    assert not split["path"].duplicated().any()
    predictions = pd.read_csv(tiny_run / "predictions.csv")
    assert set(predictions["path"]) == set(split.loc[split["split"] == "test", "path"])


def test_the_saved_model_reloads_and_predicts_the_same_values(tiny_run):
    model = load_trained_model(tiny_run, "cpu")
    predictions = pd.read_csv(tiny_run / "predictions.csv")
    root = json.loads((tiny_run / "config.json").read_text())["data"]["data_root"]
    row = predictions.iloc[0]
    age, image = predict_age_for_image(f"{root}/{row['path']}", model, "cpu")
    assert image.mode == "RGB"
    assert age == pytest.approx(row["predicted"], abs=0.05)  # bf16 backbone: same inputs, same path
    state = load_file(tiny_run / "best.safetensors")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_resume_continues_from_the_saved_epoch(utkface_sample, tmp_path):
    run = train_tiny(utkface_sample, tmp_path / "run")  # 2 epochs
    before = pd.read_csv(run / "metrics.csv")
    optimizer_steps = torch.load(run / "last.pt", weights_only=True)["optimizer"]["state"][0]["step"].item()
    train_tiny(utkface_sample, run, "--resume", "--epochs", "3")
    after = pd.read_csv(run / "metrics.csv")
    assert after["epoch"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(after.iloc[:2], before)  # the first epochs are kept, not redone
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 3
    assert (
        state["optimizer"]["state"][0]["step"].item() == optimizer_steps * 3 / 2
    )  # optimizer state continued
    # The wall time is this session's alone, and says so.
    assert "min (this session only, resumed after epoch 2; all 3 epochs)" in (run / "report.md").read_text()


def test_resume_refuses_changed_settings_and_leaves_the_run_as_it_was(utkface_sample, tmp_path, caplog):
    run = train_tiny(utkface_sample, tmp_path / "run", "--epochs", "1")
    files = ("config.json", "split.csv", "metrics.csv", "last.pt")
    kept = {name: (run / name).read_bytes() for name in files}
    moved = tmp_path / "elsewhere"  # a data root without the run's images (one holding them all is a move)
    moved.mkdir()
    for change, named in [
        (["--image-size", "64"], "--image-size 40 saved, 64 requested"),
        (["--head", "distribution"], "--head 'regression' saved, 'distribution' requested"),
        (["--data-root", str(moved)], f"--data-root '{utkface_sample}' saved, '{moved}' requested"),
    ]:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert train_main(["--out", str(run), "--resume", *change]) == 2, change
        assert named in caplog.text and "train into a new --out" in caplog.text
        assert {name: (run / name).read_bytes() for name in kept} == kept, change
    # The number of epochs and how the run is computed and reported may change.
    train_tiny(utkface_sample, run, "--resume", "--epochs", "2", "--precision", "fp32", "--grid-size", "0")
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2


def test_training_into_a_run_without_resume_is_refused(tiny_run, tmp_path, caplog):
    files = ("config.json", "best.safetensors", "metrics.csv")
    kept = {name: (tiny_run / name).read_bytes() for name in files}
    with caplog.at_level(logging.ERROR):
        assert train_main(["--config", str(tiny_run / "config.json"), "--out", str(tiny_run)]) == 2
    assert f"{tiny_run / 'best.safetensors'} already exists; pass --resume to continue it" in caplog.text
    assert {name: (tiny_run / name).read_bytes() for name in kept} == kept
    # An interrupted run (its training state, no model yet) is kept as well.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    write_state(interrupted / "last.pt", {"epoch": 1})
    assert train_main(["--config", str(tiny_run / "config.json"), "--out", str(interrupted)]) == 2
    assert f"{interrupted / 'last.pt'} already exists" in caplog.text
    assert sorted(p.name for p in interrupted.iterdir()) == ["last.pt"]


def test_the_best_model_gets_its_batch_norm_statistics_recomputed(tiny_run):
    record = json.loads((tiny_run / "best.json").read_text())["norm_statistics"]
    metrics = pd.read_csv(tiny_run / "metrics.csv")
    assert record["val_mae_before"] == pytest.approx(metrics["val_mae"].min(), abs=1e-4)
    assert record["recomputed_on_training_images"] > 0
    saved_mae = json.loads((tiny_run / "best.json").read_text())["val_mae"]
    assert saved_mae == (record["val_mae_after"] if record["kept"] else record["val_mae_before"])
    assert "batch-norm statistics recomputed on" in (tiny_run / "report.md").read_text()


def _norm_buffers(run):
    state = load_file(run / "best.safetensors")
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}, {
        k: v for k, v in state.items() if k.endswith(".weight")
    }


def test_recomputed_statistics_change_only_the_statistics_and_off_keeps_the_epochs(utkface_sample, tmp_path):
    same = ("--deterministic", "--epochs", "1")
    recomputed = train_tiny(utkface_sample, tmp_path / "on", *same)
    off = train_tiny(utkface_sample, tmp_path / "off", *same, "--norm-batches", "0")
    record = json.loads((recomputed / "best.json").read_text())["norm_statistics"]
    assert "norm_statistics" not in json.loads((off / "best.json").read_text())
    assert record["val_mae_before"] == pytest.approx(json.loads((off / "best.json").read_text())["val_mae"])
    (norms_on, weights_on), (norms_off, weights_off) = _norm_buffers(recomputed), _norm_buffers(off)
    assert all(torch.equal(weights_on[k], weights_off[k]) for k in weights_off)
    changed = not all(torch.equal(norms_on[k], norms_off[k]) for k in norms_off)
    assert changed == record["kept"]


def test_worse_recomputed_statistics_are_not_kept_and_resume_does_not_redo_them(
    utkface_sample, tmp_path, monkeypatch
):
    from age_detect_resnet.training import best_statistics

    def ruinous(model, batches, *, limit, device=None):  # statistics that wreck every prediction
        for layer in model.modules():
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.running_mean.fill_(50.0)
        return 8

    monkeypatch.setattr(best_statistics, "recompute_norm_statistics", ruinous)
    run = train_tiny(utkface_sample, tmp_path / "run", "--epochs", "1")
    meta = json.loads((run / "best.json").read_text())
    assert meta["norm_statistics"]["kept"] is False
    assert meta["norm_statistics"]["val_mae_after"] > meta["val_mae"]
    norms, _ = _norm_buffers(run)
    assert not any(bool((v == 50.0).all()) for k, v in norms.items() if k.endswith("running_mean"))
    assert "not kept" in (run / "report.md").read_text()

    monkeypatch.undo()
    sha = meta["sha256"]
    train_tiny(utkface_sample, run, "--resume", "--epochs", "1")
    assert json.loads((run / "best.json").read_text())["sha256"] == sha  # not recomputed again


def test_config_file_then_command_line(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text("[train]\nepochs = 3\nbatch_size = 16\n[data]\nimage_size = 96\n")
    resolved = resolve_config(config, {"epochs": 5})
    assert (resolved.train.epochs, resolved.train.batch_size, resolved.data.image_size) == (5, 16, 96)
    assert resolved.optim.lr == 5e-5  # untouched settings keep the seed's defaults
    with pytest.raises(ConfigError, match="unknown setting 'epoch'"):
        resolve_config(None, {"epoch": 3})
    with pytest.raises(ConfigError, match="head"):
        resolve_config(None, {"head": "svm"})
    assert resolve_config("cpu").data.image_size == 128  # a packaged recipe by name


def test_split_seed_keeps_one_split_across_training_seeds(utkface_sample):
    def split_of(**settings):
        config = resolve_config(None, {"dataset": "utkface", "data_root": str(utkface_sample), **settings})
        table = prepare_splits(config.data, seed=split_seed(config)).table
        return table.sort_values("path")[["path", "split"]].reset_index(drop=True)

    reference = split_of(seed=0)
    assert not split_of(seed=1).equals(reference)  # the seed alone moves faces between the splits
    pd.testing.assert_frame_equal(split_of(seed=1, split_seed=0), reference)


def test_train_share_draws_from_the_training_split_alone(tmp_path):
    """A learning curve's runs: a share of the training faces, drawn within each age, and the very same
    validation and test faces."""
    from age_detect_resnet.data.splits import keep_training_share

    ages = np.repeat(np.arange(20, 40), 20)  # 20 ages, 20 faces each
    table = pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(ages))], "age": ages})
    table["split"] = np.where(np.arange(len(ages)) % 5 == 0, "test", "train")
    kept = keep_training_share(table, 0.5, seed=0)
    pd.testing.assert_frame_equal(kept[kept["split"] == "test"], table[table["split"] == "test"])
    train = kept[kept["split"] == "train"]
    assert (train.groupby("age").size() == 8).all()  # half of each age's 16 training faces
    assert keep_training_share(table, 0.5, seed=0).equals(kept)  # seeded
    assert not keep_training_share(table, 0.5, seed=1).equals(kept)
    with pytest.raises(ConfigError, match="train_share"):
        resolve_config(None, {"train_share": 0})


def test_the_seed_defaults():
    config = resolve_config()
    assert (
        config.model.backbone,
        config.model.head,
        config.optim.lr,
        config.train.epochs,
        config.train.batch_size,
        config.data.num_workers,
    ) == ("resnet50", "regression", 5e-5, 20, 128, 4)
    # The whole age range by default; the seed's 10-75 filter is its recipe (and the settings).
    assert (config.data.min_age, config.data.max_age, config.data.max_per_age) == (0, 100, 5000)
    seed = resolve_config("seed-cpu")
    assert (seed.data.min_age, seed.data.max_age, seed.model.head, seed.data.align) == (
        10,
        75,
        "regression",
        False,
    )
    bundled = resolve_config("cpu")
    assert (bundled.data.min_age, bundled.data.max_age, bundled.data.align) == (0, 100, True)
    assert (config.train.norm_batches, bundled.train.norm_batches, seed.train.norm_batches) == (40, 40, 0)


def test_early_stopping_rules():
    config = resolve_config(None, {"patience": 2})
    flat = [{"val_loss": 3.0, "val_mae": 5.0}, {"val_loss": 3.0 + 1e-7, "val_mae": 4.9}]
    assert "changed by less than" in should_stop(flat, config)
    stalled = [{"val_loss": 3 + i, "val_mae": m} for i, m in enumerate([5.0, 4.0, 4.5, 4.2])]
    assert "no better validation MAE for 2 epochs" in should_stop(stalled, config)
    assert should_stop(stalled[:3], config) is None


def test_inverse_frequency_weights_favour_rare_ages():
    import numpy as np

    ages = np.array([25] * 90 + [70] * 10, dtype=float)
    weights = inverse_frequency_weights(ages)
    assert weights[70] > 5 * weights[25]
    assert abs(weights[ages.astype(int)].mean().item() - 1) < 0.05 or weights.max().item() == 10.0
    # The square root tilts less: the rare age 70 counts 3 times as much as 25, not 9 times.
    milder = inverse_frequency_weights(ages, power=0.5)
    assert (milder[70] / milder[25]).item() == pytest.approx(3.0, rel=0.01)


def test_seed_module_path_and_console_script_share_options():
    for command in (
        [sys.executable, "-m", "age_detect_resnet.train", "--help"],
        ["age-detect", "train", "--help"],
    ):
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": f"{sys.prefix}/bin", "HOME": "/tmp"},
        )
        for option in (
            "--dataset",
            "--data-root",
            "--meta",
            "--weights",
            "--no-pretrained",
            "--backbone",
            "--image-size",
            "--epochs",
            "--batch-size",
            "--lr",
            "--limit",
            "--seed",
            "--out",
            "--resume",
            "--device",
            "--config",
            "--skip-bad-images",
            "--head",
        ):
            assert option in done.stdout, (command, option)


def test_an_unusable_model_file_is_refused_with_its_name(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a model")
    with pytest.raises(checkpoint.ModelFileError, match=r"model\.safetensors"):
        load_trained_model(tmp_path / "model.safetensors")


def test_the_quick_start_pipeline_builds_the_metadata_and_trains_with_the_packaged_recipe(
    tmp_path, monkeypatch, caplog
):
    """Quick start 1 (`age-detect pipeline --data-root ...`) on an IMDB-WIKI tree, shrunk to seconds: the
    kind is recognised, the metadata built where the README says, the CPU recipe chosen, and the run
    finished with its report and prediction grid."""
    import json
    import logging

    from age_detect_resnet.cli.pipeline import main as pipeline_main
    from conftest import MOBILENET, REPLICA, YUNET, require

    replica = require(REPLICA)
    monkeypatch.chdir(tmp_path)  # data/processed/meta.csv and data/cache land in the working folder
    small = (
        f"--backbone mobilenet_v2 --image-size 40 --epochs 1 --batch-size 8 --num-workers 0 --limit 96 "
        f"--no-progress --grid-size 4 --no-tensorboard --weights {require(MOBILENET)} "
        f"--detector-model {require(YUNET)}"
    ).split()
    with caplog.at_level(logging.INFO):
        assert pipeline_main(["--data-root", str(replica), *small, "--out", "runs/quick"]) == 0
    assert "--config cpu" in caplog.text
    assert (tmp_path / "data" / "processed" / "meta.csv").is_file()
    run = tmp_path / "runs" / "quick"
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["dataset"] == "imdb-wiki" and config["data"]["align"] is True
    assert config["data"]["augment"] == "photo" and config["model"]["head"] == "distribution"
    report = (run / "report.md").read_text()
    assert (run / "best.safetensors").is_file() and "## Test split (best model)" in report
    assert "faces aligned by their detected landmarks: 96" in report  # every image of the --limit
    assert (run / "plots" / "grid.png").is_file() and (run / "plots" / "mae.png").is_file()


def test_the_pipeline_rebuilds_metadata_of_another_data_root_and_reuses_its_own(
    tmp_path, monkeypatch, caplog
):
    """data/processed/meta.csv records the data root it was built from: the pipeline reuses it for that
    root (saying so) and builds it again for another, rather than training on the other root's images."""
    import logging

    import pandas as pd

    from age_detect_resnet.cli import pipeline
    from conftest import REPLICA, require

    replica = require(REPLICA)
    wiki_only, both = tmp_path / "wiki_only", tmp_path / "both"
    for root, sources in ((wiki_only, ["wiki_crop"]), (both, ["wiki_crop", "imdb_crop"])):
        root.mkdir()
        for source in sources:
            (root / source).symlink_to(replica / source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline.train_module, "run", lambda args, argv, prog: 0)  # the metadata alone
    meta = tmp_path / "data" / "processed" / "meta.csv"

    def sources_after(root) -> set[str]:
        assert pipeline.main(["--data-root", str(root)]) == 0
        return set(pd.read_csv(meta)["source"])

    assert sources_after(wiki_only) == {"wiki"}
    with caplog.at_level(logging.INFO):
        assert sources_after(both) == {"imdb", "wiki"}
    assert f"built from {wiki_only.resolve()}, not {both.resolve()}: building it again" in caplog.text
    caplog.clear()
    built = meta.stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        assert sources_after(both) == {"imdb", "wiki"}
    assert meta.stat().st_mtime_ns == built and "reusing data/processed/meta.csv" in caplog.text
    (meta.parent / "meta.source.json").unlink()  # a table that does not say what it was built from
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert sources_after(both) == {"imdb", "wiki"}
    assert "a data root it does not record" in caplog.text
