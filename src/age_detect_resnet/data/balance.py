"""Training faces drawn so that every value of a label column has the same age distribution
(`--balance-by ethnicity`).

In UTKFace the groups of people are not aged alike: 27% of its Asian faces are under 10 against 11% of
its white faces, and 5% of them are 40–59 against 25%. A model can then learn "this looks like an Asian
face, so younger" from the data's make-up rather than from the face. `balancing_weights` gives each
training face the weight P(age group) / P(age group | its value), which makes every value's age
distribution the whole split's while keeping the split's overall one; `WeightedEpochSampler` draws each
epoch's faces in proportion to those weights (with replacement, as many draws as faces), sharded across
processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Sampler

from age_detect_resnet.evaluation.metrics import age_group_label

# The largest and smallest weight, as a multiple of the mean: a value with few faces of an age group
# (UTKFace "others" of 70+: 0.4% against the split's 6%) is drawn more, but not fifteen times over.
WEIGHT_CAP = 4.0
# The label a face without a value in the column counts as: its own group, balanced like the others.
MISSING = "(none)"


def balancing_weights(
    ages: Sequence[float], values: Sequence[object], *, cap: float = WEIGHT_CAP
) -> np.ndarray:
    """(N,) weights, mean 1: P(age group) / P(age group | value) per face, none beyond [1/cap, cap]."""
    frame = pd.DataFrame(
        {
            "group": [age_group_label(float(a)) for a in ages],
            "value": pd.Series(list(values), dtype=object).fillna(MISSING).astype(str).to_numpy(),
        }
    )
    if frame.empty:
        return np.zeros(0)
    overall = frame["group"].map(frame["group"].value_counts(normalize=True))
    within = frame.groupby("value")["group"].transform(lambda g: g.map(g.value_counts(normalize=True)))
    weights = np.array(overall / within, dtype=np.float64)
    for _ in range(50):  # clipping moves the mean: clip again until every weight is within the cap
        weights /= weights.mean()
        clipped = weights.clip(1 / cap, cap)
        if np.allclose(clipped, weights, rtol=0, atol=1e-9):
            break
        weights = clipped
    return weights


class WeightedEpochSampler(Sampler[int]):
    """Per epoch, len(weights) indices drawn in proportion to `weights` with replacement (the same
    draw on every process, seeded by `seed` and the epoch), of which process `rank` of `world` takes
    every world-th, the batches' last incomplete round dropped as DistributedSampler drops it."""

    def __init__(self, weights: np.ndarray, *, seed: int, rank: int = 0, world: int = 1) -> None:
        if len(weights) == 0 or not np.all(np.isfinite(weights)) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("sampling weights must be finite, non-negative and not all zero")
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch = 0
        self.per_process = len(weights) // world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        draws = self.per_process * self.world
        drawn = torch.multinomial(self.weights, draws, replacement=True, generator=generator)
        return iter(drawn[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return self.per_process
