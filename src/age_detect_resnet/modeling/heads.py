"""Output heads: each maps backbone features to raw outputs, owns its loss, and decodes an age in years.

All heads share the seed's trunk `Linear(F, 256) -> ReLU -> Linear(256, K)`; they differ in K and in
what the K outputs mean:

* `regression` (the seed): K = 1, the age itself, MSE loss.
* `bins` (the seed's classification experiment): K five-year groups from the youngest trained age,
  cross-entropy; the age is the expected group centre.
* `distribution`: K = 101 classes for ages 0-100, cross-entropy against a Gaussian around the true age
  (label-distribution learning; sigma 0 = one-hot; `label_spread` "proportional" or "capped" widens
  it with age),
  optionally plus an L1 loss on the expected age
  (`expectation_weight`, as in DLDL-v2), which trains the number that is reported; the age is the
  expectation, and the predictive distribution also gives an interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

MAX_AGE_CLASS = 100
BIN_WIDTH = 5
# With label_spread "proportional", label_sigma is the label's std at this age and grows as (1 + age);
# "capped" grows the same way up to this age and stays at label_sigma above it.
SIGMA_REFERENCE_AGE = 30.0
LABEL_SPREADS = ("fixed", "proportional", "capped")


def _trunk(in_features: int, hidden_dim: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, outputs)
    )


def _weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)


class AgeHead(nn.Module):
    """Base class: `forward` gives raw outputs; `loss` trains them; `predict` reads them out.

    `predict` is the one readout every consumer uses (training metrics, reports, the runtime backends,
    the exported graph): a dict named by `output_names`, each (B,) — "age" always first."""

    kind = "base"
    output_names: tuple[str, ...] = ("age",)

    def __init__(self, in_features: int, hidden_dim: int, outputs: int) -> None:
        super().__init__()
        self.layers = _trunk(in_features, hidden_dim, outputs)
        self.in_features, self.hidden_dim = in_features, hidden_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, K)
        return self.layers(features)

    def loss(
        self, outputs: torch.Tensor, ages: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B, K) raw outputs -> (B,) ages in years."""
        raise NotImplementedError

    def predict(self, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, K) raw outputs -> {name: (B,)} for every name of `output_names`."""
        return {"age": self.decode(outputs)}

    def combine(self, outputs: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """Raw outputs of several models with this head (an ensemble) as one (B, K): their weighted mean
        (`weights` sum to 1); for regression, the weighted mean age."""
        return sum(w * o.float() for w, o in zip(weights, outputs, strict=True))

    def calibrate(self, outputs: torch.Tensor, ages: torch.Tensor) -> None:
        """Fit the head's settings on validation outputs and ages (nothing to fit by default)."""

    def label_columns(self, outputs: torch.Tensor, ages: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-sample columns of an evaluation report that need the true ages (none by default)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What `create_head` needs to rebuild this head (stored in the model's metadata)."""
        return {"kind": self.kind, "hidden_dim": self.hidden_dim}


class RegressionHead(AgeHead):
    kind = "regression"

    def __init__(self, in_features: int, hidden_dim: int = 256, *, init_age: float | None = None) -> None:
        super().__init__(in_features, hidden_dim, 1)
        if init_age is not None:
            # Start at the mean training age: with the seed's lr of 5e-5 climbing from 0 costs epochs.
            nn.init.constant_(self.layers[-1].bias, float(init_age))

    def loss(self, outputs, ages, weights=None):
        return _weighted_mean(F.mse_loss(outputs[:, 0].float(), ages, reduction="none"), weights)

    def decode(self, outputs):
        return outputs[:, 0].float()


class ProbabilisticHead(AgeHead):
    """A softmax over classes with known centre ages; the age is the expected centre."""

    centres: torch.Tensor

    def __init__(self, in_features: int, hidden_dim: int, centres: torch.Tensor) -> None:
        super().__init__(in_features, hidden_dim, len(centres))
        self.register_buffer("centres", centres.float(), persistent=False)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().softmax(dim=-1)

    def decode(self, outputs):
        return self.probabilities(outputs) @ self.centres

    def combine(self, outputs, weights):
        # The log of the weighted mixture of the distributions: its softmax is the mixture itself, whose
        # expected age is the weighted mean of the models' ages (a mean of logits would not be).
        mixture = sum(w * self.probabilities(o) for w, o in zip(weights, outputs, strict=True))
        return mixture.clamp_min(1e-30).log()


class BinsHead(ProbabilisticHead):
    kind = "bins"

    def __init__(
        self, in_features: int, hidden_dim: int = 256, *, min_age: int = 10, max_age: int = 75
    ) -> None:
        self.min_age, self.max_age = min_age, max_age
        starts = torch.arange(min_age, max_age + 1, BIN_WIDTH)
        ends = torch.clamp(starts + BIN_WIDTH - 1, max=max_age)
        super().__init__(in_features, hidden_dim, (starts + ends).float() / 2)
        self.starts = starts.tolist()

    def labels(self) -> list[str]:
        return [f"{s}-{min(s + BIN_WIDTH - 1, self.max_age)}" for s in self.starts]

    def bin_of(self, ages: torch.Tensor) -> torch.Tensor:
        index = torch.div(ages.round() - self.min_age, BIN_WIDTH, rounding_mode="floor").long()
        return index.clamp(0, len(self.starts) - 1)

    def loss(self, outputs, ages, weights=None):
        return _weighted_mean(F.cross_entropy(outputs.float(), self.bin_of(ages), reduction="none"), weights)

    def label_columns(self, outputs, ages):
        """The true and the most probable group, for the report's confusion matrix."""
        return {"true_group": self.bin_of(ages), "predicted_group": outputs.argmax(dim=1)}

    def describe(self):
        return {**super().describe(), "min_age": self.min_age, "max_age": self.max_age}


class DistributionHead(ProbabilisticHead):
    kind = "distribution"
    output_names = ("age", "lower", "upper")
    quantile_level: torch.Tensor

    def __init__(
        self,
        in_features: int,
        hidden_dim: int = 256,
        *,
        label_sigma: float = 2.0,
        label_spread: str = "fixed",
        expectation_weight: float = 0.0,
        interval: float = 0.8,
        interval_quantile_level: float | None = None,
    ) -> None:
        super().__init__(in_features, hidden_dim, torch.arange(MAX_AGE_CLASS + 1).float())
        if label_spread not in LABEL_SPREADS:
            raise ValueError(f"unknown label_spread {label_spread!r}; use {' or '.join(LABEL_SPREADS)}")
        self.label_sigma = label_sigma
        self.label_spread = label_spread
        self.expectation_weight = expectation_weight
        self.interval = interval
        # The central probability mass whose quantiles give an interval with `interval` coverage; set on
        # validation data by `calibrate_interval` (the raw softmax is usually over-confident). A buffer,
        # so that the training state and the saved weights carry it with the rest of the head.
        self.register_buffer("quantile_level", torch.tensor(float(interval_quantile_level or interval)))

    @property
    def interval_quantile_level(self) -> float:
        return float(self.quantile_level)

    @interval_quantile_level.setter
    def interval_quantile_level(self, level: float) -> None:
        self.quantile_level.fill_(float(level))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Models saved before the level was a buffer carry it in their metadata only, from which this
        # head was built: keep that value.
        state_dict.setdefault(prefix + "quantile_level", self.quantile_level.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def predict(self, outputs):
        bounds = self.interval_bounds(outputs)
        return {"age": self.decode(outputs), "lower": bounds[:, 0], "upper": bounds[:, 1]}

    def label_sigmas(self, ages: torch.Tensor) -> torch.Tensor:
        """(B,) ages -> (B,) std in years of each one's Gaussian label. "fixed": `label_sigma` for every
        age; "proportional": `label_sigma` at 30, scaled by (1 + age) / 31 (0.13 y at 1, 4.6 at 70): a
        fixed 2 y cut off at age 0 moves a baby's label up (its mean is 1.8 for age 1), and how far an
        age can be told grows with the age; "capped": proportional up to 30, `label_sigma` above (sharp
        labels for the young without wider ones for the old)."""
        sigma = torch.full_like(ages, self.label_sigma)
        if self.label_spread == "fixed":
            return sigma
        scaled = sigma * (1 + ages) / (1 + SIGMA_REFERENCE_AGE)
        return torch.minimum(scaled, sigma) if self.label_spread == "capped" else scaled

    def target_distribution(self, ages: torch.Tensor) -> torch.Tensor:
        """(B,) ages -> (B, 101) soft labels: a Gaussian around each age, or one-hot when sigma is 0."""
        if self.label_sigma <= 0:
            return F.one_hot(ages.round().long().clamp(0, MAX_AGE_CLASS), MAX_AGE_CLASS + 1).float()
        ages = ages.float()
        logits = -0.5 * ((self.centres[None, :] - ages[:, None]) / self.label_sigmas(ages)[:, None]) ** 2
        return logits.softmax(dim=-1)

    def loss(self, outputs, ages, weights=None):
        log_probs = outputs.float().log_softmax(dim=-1)
        losses = -(self.target_distribution(ages) * log_probs).sum(dim=-1)
        if self.expectation_weight:
            losses = losses + self.expectation_weight * (self.decode(outputs) - ages).abs()
        return _weighted_mean(losses, weights)

    def quantiles(self, outputs: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """(B, K) outputs, (Q,) levels in (0, 1) -> (B, Q) ages; class i is uniform on [i-0.5, i+0.5],
        the ends held to the ages the classes stand for (0 and K - 1: no interval below age 0)."""
        probs = self.probabilities(outputs)
        cdf = probs.cumsum(dim=-1)  # (B, K)
        levels = levels.to(cdf).expand(cdf.shape[0], -1).contiguous()
        index = torch.searchsorted(cdf, levels).clamp(
            max=probs.shape[-1] - 1
        )  # first class reaching the level
        below = torch.where(index > 0, cdf.gather(1, (index - 1).clamp(min=0)), torch.zeros_like(levels))
        mass = probs.gather(1, index).clamp_min(1e-12)
        ages = index.float() - 0.5 + ((levels - below) / mass).clamp(0, 1)
        return ages.clamp(0, probs.shape[-1] - 1)

    def interval_bounds(self, outputs: torch.Tensor, level: float | None = None) -> torch.Tensor:
        """(B, 2) lower and upper age of the calibrated interval."""
        # The buffer itself, not its float value, so that an exported graph reads the calibrated level.
        level = self.quantile_level if level is None else torch.tensor(float(level))
        tails = torch.stack([(1 - level) / 2, (1 + level) / 2])
        return self.quantiles(outputs, tails)

    def calibrate_interval(self, outputs: torch.Tensor, ages: torch.Tensor) -> float:
        """Choose the quantile level whose intervals cover `interval` of these (validation) ages."""
        low, high = 1e-3, 1 - 1e-6
        for _ in range(30):  # bisection: coverage grows with the level
            mid = (low + high) / 2
            bounds = self.interval_bounds(outputs, mid)
            covered = ((ages >= bounds[:, 0]) & (ages <= bounds[:, 1])).float().mean().item()
            low, high = (mid, high) if covered < self.interval else (low, mid)
        self.interval_quantile_level = high
        return high

    def calibrate(self, outputs, ages):
        self.calibrate_interval(outputs, ages)

    def describe(self):
        return {
            **super().describe(),
            "label_sigma": self.label_sigma,
            "label_spread": self.label_spread,
            "expectation_weight": self.expectation_weight,
            "interval": self.interval,
            "interval_quantile_level": self.interval_quantile_level,
        }


def create_head(kind: str, in_features: int, **options: Any) -> AgeHead:
    """A head by name; `options` are the keys of `AgeHead.describe()` (unknown ones are ignored)."""
    hidden = options.get("hidden_dim", 256)
    if kind == "regression":
        return RegressionHead(in_features, hidden, init_age=options.get("init_age"))
    if kind == "bins":
        return BinsHead(
            in_features, hidden, min_age=options.get("min_age", 10), max_age=options.get("max_age", 75)
        )
    if kind == "distribution":
        return DistributionHead(
            in_features,
            hidden,
            label_sigma=options.get("label_sigma", 2.0),
            label_spread=options.get("label_spread", "fixed"),
            expectation_weight=options.get("expectation_weight", 0.0),
            interval=options.get("interval", 0.8),
            interval_quantile_level=options.get("interval_quantile_level"),
        )
    raise ValueError(f"unknown head {kind!r}; use regression, bins or distribution")
