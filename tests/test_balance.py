"""--balance-by: training faces drawn so that every value of a label column has the split's age mix."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from age_detect_resnet.cli.train import main as train_main
from age_detect_resnet.data.balance import WeightedEpochSampler, balancing_weights
from age_detect_resnet.evaluation.metrics import age_group_label
from conftest import train_tiny


def _weighted_mix(ages, values, weights, value):
    frame = pd.DataFrame({"group": [age_group_label(a) for a in ages], "value": values, "w": weights})
    part = frame[frame["value"] == value]
    return (part.groupby("group")["w"].sum() / part["w"].sum()).sort_index()


def test_weights_give_every_value_the_whole_splits_age_mix():
    rng = np.random.default_rng(0)
    # "a" mostly children, "b" mostly adults: the make-up a model could learn as "a looks young"
    ages = np.concatenate(
        [rng.choice([3, 25, 45], 300, p=[0.6, 0.3, 0.1]), rng.choice([3, 25, 45], 200, p=[0.1, 0.4, 0.5])]
    )
    values = ["a"] * 300 + ["b"] * 200
    weights = balancing_weights(ages, values, cap=100)
    assert weights.mean() == pytest.approx(1)
    overall = pd.Series([age_group_label(a) for a in ages]).value_counts(normalize=True).sort_index()
    for value in ("a", "b"):
        pd.testing.assert_series_equal(
            _weighted_mix(ages, values, weights, value), overall, check_names=False, atol=1e-9
        )
    # unweighted, the two differ a lot
    assert abs(_weighted_mix(ages, values, np.ones(500), "a")["0-9"] - overall["0-9"]) > 0.15


def test_weights_are_capped_and_faces_without_a_value_are_a_group_of_their_own():
    # "a": 99 children and one 30-year-old, whose age group is half the split's but 1% of its value's
    ages = [5] * 99 + [30] + [30] * 100 + [30, 5]
    values = ["a"] * 100 + ["b"] * 100 + [None, None]
    uncapped = balancing_weights(ages, values, cap=1000)
    assert uncapped[99] / uncapped[0] == pytest.approx(100, rel=0.05)
    weights = balancing_weights(ages, values, cap=4)
    assert weights.mean() == pytest.approx(1)
    assert weights.max() == weights[99] == pytest.approx(4)  # drawn 4x the mean, not ~50x
    assert np.isfinite(weights).all() and (weights > 0).all()
    assert weights[200] == pytest.approx(weights[201], rel=0.05)  # no value: a mix near the split's


def test_the_sampler_draws_by_weight_the_same_on_every_process_and_differs_by_epoch():
    weights = np.array([1.0] * 90 + [10.0] * 10)
    whole = WeightedEpochSampler(weights, seed=3)
    whole.set_epoch(1)
    drawn = list(whole)
    assert len(drawn) == len(whole) == 100
    assert np.mean(np.array(drawn) >= 90) > 0.35  # 10 faces of weight 10: half the draws, not a tenth
    assert drawn == list(whole)  # one epoch, one draw
    whole.set_epoch(2)
    assert list(whole) != drawn
    shards = [WeightedEpochSampler(weights, seed=3, rank=r, world=3) for r in range(3)]
    again = WeightedEpochSampler(weights, seed=3, rank=1, world=3)  # rank 1 in another process
    for sampler in (*shards, again):
        sampler.set_epoch(1)
    parts = [list(s) for s in shards]
    assert [len(p) for p in parts] == [33, 33, 33]
    assert list(again) == parts[1]
    assert len({tuple(p) for p in parts}) == 3  # each process its own share of the one draw


def test_the_sampler_refuses_unusable_weights():
    for bad in (np.zeros(3), np.array([1.0, np.nan]), np.array([1.0, -1.0]), np.zeros(0)):
        with pytest.raises(ValueError, match="sampling weights"):
            WeightedEpochSampler(bad, seed=0)


def test_training_balanced_by_ethnicity_runs_and_resumes(utkface_sample, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run = train_tiny(utkface_sample, tmp_path / "run", "--balance-by", "ethnicity", "--epochs", "1")
    assert "--balance-by ethnicity: training faces drawn with weights" in caplog.text
    # the saved split has no ethnicity column: on resume it is read from the dataset again
    train_tiny(utkface_sample, run, "--resume", "--epochs", "2")
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2]


def test_an_unknown_column_is_refused_naming_the_ones_there(utkface_sample, tmp_path, caplog):
    code = train_main(
        [
            "--dataset",
            "utkface",
            "--data-root",
            str(utkface_sample),
            "--balance-by",
            "hair_colour",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--no-pretrained",
            "--epochs",
            "1",
        ]
    )
    assert code != 0
    assert "--balance-by hair_colour: no such column" in caplog.text and "ethnicity, gender" in caplog.text
    assert not (tmp_path / "run" / "last.pt").exists()
