"""Runs started from a trained model (--init): the start is recorded where any folder finds it, a
continued run never needs it, and a head whose classes cover another age range is refused."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest

from age_detect_resnet.cli.train import add_arguments, config_for_run
from age_detect_resnet.cli.train import main as train_main
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.model import create_model
from age_detect_resnet.training.config import ConfigError
from conftest import train_tiny


def _config(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_for_run(parser.parse_args(list(argv)))


def test_init_is_recorded_as_the_place_it_names(tiny_run, tmp_path, monkeypatch):
    """--init typed relative is recorded absolute (config.json, best.json), so that the run's lineage is
    found from any folder; typed again relative beside --resume, it is the same start, no change."""
    root = json.loads((tiny_run / "config.json").read_text())["data"]["data_root"]
    shutil.copytree(tiny_run, tmp_path / "start")
    monkeypatch.chdir(tmp_path)
    run = train_tiny(
        Path(root), tmp_path / "tuned", "--init", "start", "--epochs", "1", "--norm-batches", "0"
    )
    start = str((tmp_path / "start").resolve())
    assert json.loads((run / "config.json").read_text())["model"]["init"] == start
    assert json.loads((run / "best.json").read_text())["init"] == start
    assert _config("--out", str(run), "--resume", "--init", "start").model.init == start
    from age_detect_resnet.run_folder import recorded_path

    assert recorded_path("default") == "default"  # the bundled model stays recorded by its name


def test_a_fine_tuned_run_continues_after_its_start_moved(tiny_run, tmp_path, caplog):
    """config.json holds the start's architecture and last.pt every weight: --resume reads neither the
    start's metadata nor its weights, so a start moved or deleted since does not stop the run."""
    root = json.loads((tiny_run / "config.json").read_text())["data"]["data_root"]
    start = shutil.copytree(tiny_run, tmp_path / "start")
    run = train_tiny(
        Path(root), tmp_path / "tuned", "--init", str(start), "--epochs", "1", "--norm-batches", "0"
    )
    start.rename(tmp_path / "start-moved")
    common = ["--out", str(run), "--resume", "--no-progress", "--num-workers", "0", "--norm-batches", "0"]
    with caplog.at_level(logging.ERROR):
        assert train_main([*common, "--epochs", "2"]) == 0, caplog.text
    assert json.loads((run / "run.json").read_text())["epochs_run"] == 2
    assert json.loads((run / "best.json").read_text())["init"] == str(start)


def _bins_model(path: Path, min_age: int, max_age: int) -> Path:
    """A saved bins-head model over `min_age`-`max_age` (untrained: only its architecture matters)."""
    model = create_model("mobilenet_v2", "bins", pretrained=False, min_age=min_age, max_age=max_age)
    checkpoint.save_model(model, path, {"image_size": 40, "age_range": [min_age, max_age]})
    return path


def test_init_refuses_a_bins_head_over_another_age_range(tmp_path, caplog):
    """A bins head's classes are its age range: fine-tuned over 0-100, ages under 20 were clamped into its
    first bin and counted as placed. The run is refused, saying what to pass; the head's range passes."""
    start = _bins_model(tmp_path / "bins.safetensors", 20, 60)
    args = ["--dataset", "utkface", "--data-root", str(tmp_path), "--init", str(start)]
    with pytest.raises(ConfigError, match=r"bins head for ages 20-60.*keeps ages 0-100: pass --min-age 20"):
        _config(*args, "--out", str(tmp_path / "run"))
    with caplog.at_level(logging.ERROR):
        assert train_main([*args, "--out", str(tmp_path / "run"), "--min-age", "10"]) == 2
    assert "this run keeps ages 10-100: pass --min-age 20 --max-age 60" in caplog.text
    assert not (tmp_path / "run").exists()
    config = _config(*args, "--out", str(tmp_path / "run"), "--min-age", "20", "--max-age", "60")
    assert config.model.head == "bins" and (config.data.min_age, config.data.max_age) == (20, 60)


def test_init_takes_any_age_range_with_a_head_that_has_none(tmp_path):
    """Distribution (ages 0-100) and regression heads carry no range: any --min-age/--max-age fits."""
    for head in ("distribution", "regression"):
        start = tmp_path / f"{head}.safetensors"
        checkpoint.save_model(create_model("mobilenet_v2", head, pretrained=False), start, {"image_size": 40})
        args = ["--dataset", "utkface", "--data-root", str(tmp_path), "--init", str(start)]
        config = _config(*args, "--out", str(tmp_path / "run"), "--min-age", "20", "--max-age", "60")
        assert config.model.head == head and config.model.init == str(start.resolve())


def test_a_run_from_init_under_a_recipe_resumes_with_the_same_command(tiny_run, tmp_path):
    """`train --config RECIPE --init M` takes M's head over the recipe's; "the same command plus
    --resume" (what Ctrl-C says) must keep it, not refuse the recipe's head as a change."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[model]\nhead = "distribution"\n')  # tiny_run has a regression head
    root = json.loads((tiny_run / "config.json").read_text())["data"]["data_root"]
    args = ["--config", str(recipe), "--init", str(tiny_run), "--norm-batches", "0"]
    run = train_tiny(Path(root), tmp_path / "tuned", *args, "--epochs", "1")
    assert json.loads((run / "config.json").read_text())["model"]["head"] == "regression"
    train_tiny(Path(root), run, *args, "--epochs", "2", "--resume")
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2
    # A head typed on the command line is still a change, refused.
    assert train_main(["--out", str(run), "--resume", "--head", "distribution"]) == 2
