"""Training options: values no run can mean are refused in one line naming the option and its range, from
the command line and config files alike, before a run writes anything; fp16 is refused on a CPU."""

from __future__ import annotations

import json
import logging
import math

import pandas as pd
import pytest
import torch
from PIL import Image

from age_detect_resnet import runtime
from age_detect_resnet.cli.train import main as train_main
from age_detect_resnet.data.sources import DataError
from age_detect_resnet.data.splits import prepare_splits
from age_detect_resnet.training.config import ConfigError, resolve_config


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("seed", -1, "--seed (seed) must be a whole number between 0 and 4294967295, got -1"),
        ("seed", 5_000_000_000, "--seed (seed) must be a whole number between 0 and 4294967295"),
        ("split_seed", -3, "--split-seed (split_seed) must be a whole number between 0 and 4294967295"),
        ("limit", -5, "--limit (limit) must be a whole number of at least 1, got -5"),
        ("limit", 0, "--limit (limit) must be a whole number of at least 1, got 0"),
        ("max_per_age", 0, "--max-per-age (max_per_age) must be a whole number of at least 1"),
        ("max_per_age", -1, "--max-per-age (max_per_age) must be a whole number of at least 1"),
        ("warmup_epochs", math.nan, "--warmup-epochs (warmup_epochs) must be a finite number, got nan"),
        ("warmup_epochs", -1.0, "--warmup-epochs (warmup_epochs) must be a number of at least 0"),
        ("hidden_dim", 0, "--hidden-dim (hidden_dim) must be a whole number of at least 1, got 0"),
        ("label_sigma", -1.0, "--label-sigma (label_sigma) must be a number of at least 0"),
        ("expectation_weight", -1.0, "--expectation-weight (expectation_weight) must be a number of at"),
        ("num_workers", -1, "--num-workers (num_workers) must be a whole number of at least 0"),
        ("patience", -1, "--patience (patience) must be a whole number of at least 0"),
        ("min_delta", -1.0, "--min-delta (min_delta) must be a number of at least 0"),
        ("min_delta", math.nan, "--min-delta (min_delta) must be a finite number"),
        ("lr", math.inf, "--lr (lr) must be a finite number, got inf"),
        ("grid_size", -1, "--grid-size (grid_size) must be a whole number of at least 0, got -1"),
        ("age_weighting_power", -0.5, "--age-weighting-power (age_weighting_power) must be a number of at"),
    ],
)
def test_a_value_no_run_can_mean_is_refused_naming_the_option_and_its_range(setting, value, expected):
    with pytest.raises(ConfigError) as refused:
        resolve_config(None, {setting: value})
    assert str(refused.value).startswith(expected)


def test_the_ends_of_each_range_are_accepted(tmp_path):
    ends = {
        "seed": 2**32 - 1,
        "split_seed": 0,
        "limit": 1,
        "max_per_age": 1,
        "hidden_dim": 1,
        "label_sigma": 0.0,  # one-hot cross-entropy
        "expectation_weight": 0.0,
        "num_workers": 0,
        "warmup_epochs": 0.0,
        "patience": 0,  # off
        "min_delta": 0.0,  # off
    }
    config = resolve_config(None, ends)
    assert config.train.seed == 2**32 - 1 and config.data.limit == 1 and config.model.hidden_dim == 1
    no_cap = tmp_path / "no-cap.json"
    no_cap.write_text('{"data": {"max_per_age": null}}')
    assert resolve_config(no_cap).data.max_per_age is None  # none: no cap, no number to range-check


def test_a_config_file_is_checked_as_the_command_line_is(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"train": {"patience": -1}}))
    with pytest.raises(ConfigError, match=r"--patience \(patience\) must be a whole number of at least 0"):
        resolve_config(settings)
    settings.write_text('{"min_delta": NaN}')  # Python's json reads NaN
    with pytest.raises(ConfigError, match=r"--min-delta \(min_delta\) must be a finite number"):
        resolve_config(settings)


@pytest.mark.parametrize("document", ["[1, 2]", "null", "5", '"epochs"'])
def test_a_json_config_file_holding_no_object_is_refused_naming_the_file(tmp_path, document):
    settings = tmp_path / "settings.json"
    settings.write_text(document)
    with pytest.raises(ConfigError) as refused:  # was an AttributeError: 'list' object has no 'items'
        resolve_config(settings)
    assert str(refused.value).startswith(f"config file {settings} must hold an object of settings")


def test_a_section_holding_no_settings_is_refused_naming_it(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text('{"train": [1, 2]}')  # was "unknown setting 'train'"
    with pytest.raises(ConfigError, match=f"section 'train' in {settings} must hold settings by name"):
        resolve_config(settings)


@pytest.mark.parametrize(
    "option",
    [
        ["--seed", "-1"],
        ["--split-seed", "-3"],
        ["--limit", "-5"],
        ["--warmup-epochs", "nan"],
        ["--precision", "fp16", "--device", "cpu"],  # was refused after config.json was written
    ],
)
def test_train_refuses_a_bad_value_in_one_line_before_writing_anything(tmp_path, caplog, option):
    faces, out = tmp_path / "faces", tmp_path / "run"
    faces.mkdir()
    for name in ("25_0_2_20170116174525125.jpg.chip.jpg", "40_1_0_20170116174525126.jpg.chip.jpg"):
        Image.new("RGB", (32, 32)).save(faces / name)
    with caplog.at_level(logging.ERROR):
        source = ["--dataset", "utkface", "--data-root", str(faces)]
        status = train_main([*source, *option, "--out", str(out)])
    assert status == 2  # was a traceback (exit 1), for --split-seed after config.json was written
    assert option[0] in caplog.text and "Traceback" not in caplog.text
    assert not out.exists()


def test_fp16_is_refused_on_a_cpu_saying_what_to_pass(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    with pytest.raises(runtime.DeviceError, match=r"fp16 runs on a CUDA GPU only.*--precision bf16"):
        runtime.resolve_precision("fp16", cpu)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    with pytest.raises(runtime.DeviceError, match=r"pass --precision fp32 or auto \(this CPU has no native"):
        runtime.resolve_precision("fp16", cpu)
    assert runtime.resolve_precision("bf16", cpu) == "bf16"  # asked for, and not refused: kept
    assert runtime.resolve_precision("auto", cpu) == "fp32"


def test_the_highest_seed_seeds_a_process_of_any_rank():
    runtime.seed_everything(2**32 - 1 + 3)  # --seed 2**32 - 1 on rank 3: numpy's seed is 32-bit


def _csv_dataset(folder, ages):
    rows = []
    for i, age in enumerate(ages):
        name = f"{i}.png"
        Image.new("RGB", (8, 8), (i * 20 % 255, 40, 90)).save(folder / name)
        rows.append({"path": name, "age": age})
    table = folder / "faces.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def test_nothing_left_to_split_names_the_age_range_that_removed_every_image(tmp_path):
    table = _csv_dataset(tmp_path, [20, 30, 40])
    data = resolve_config(None, {"dataset": "csv", "data_root": str(table), "min_age": 90}).data
    with pytest.raises(DataError) as refused:
        prepare_splits(data, seed=0)
    message = str(refused.value)
    assert f"no images of ages 90-100 left in {table}: 3 read" in message
    assert "3 age outside 90-100" in message and "widen --min-age 90 / --max-age 100" in message
