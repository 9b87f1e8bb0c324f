"""How an age is read out of a predicted age distribution: its mean (what the models do), its median, or
the mean once the training set's age prior is partly divided out.

    .venv/bin/python experiments/decoding.py --out results/decoding            # about 6 min on 2 cores

A `distribution` head learns p(age | face) on UTKFace, whose ages are far from even (many faces in their
twenties and babies, few over 70): the predicted distribution carries that prior, which pulls a face the
model is unsure of toward the crowded ages. Two readouts that need no training:

* the median of the distribution: the age that minimises the expected absolute error under the model's
  own belief (the mean minimises the squared error);
* "prior α": p(age | face) × (uniform / p_train(age))^α renormalised, then its mean: α = 1 removes the
  training prior altogether (a flat prior over 0–100), α = 0 is today's mean. p_train is the histogram
  of the run's training ages smoothed by a Gaussian of σ = 2 years and mixed 9:1 with a flat one, so that
  ages the split hardly has (over 95) do not blow up.

The rule, fixed before any figure was seen: choose on UTKFace's VALIDATION split alone, by its MAE and its
age-balanced MAE (the mean of the eight age groups' MAEs, 0–9 ... 70+, as every age counts for a tool that
must age children and the old):
* the median replaces the mean if it lowers the validation MAE and raises the balanced MAE by at most 0.02;
* a prior α in {0.25, 0.5, 0.75, 1} is taken, the one of lowest balanced MAE among those raising the
  validation MAE by at most 0.05 over the readout kept above, if it lowers the balanced MAE by 0.10 or more.
The test split and the two real-photo sets are then reported for every readout, whatever was chosen.

The model's outputs (the ensemble's mixed distribution with the mirror views, per face) are kept in
OUT/outputs-SET.npz, so a second run only reads them out again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from age_detect_resnet.data.sources import image_root
from age_detect_resnet.data.splits import load_split
from age_detect_resnet.evaluation.evaluate import evaluation_table, predict_images
from age_detect_resnet.evaluation.metrics import age_metrics, interval_label_metrics
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.heads import DistributionHead
from age_detect_resnet.run_folder import RunFolder

PHOTOS = Path("../shared/data/real_photos")
YUNET = Path("../shared/models/face_detection_yunet.onnx")
AGES = np.arange(101, dtype=np.float64)
ALPHAS = (0.25, 0.5, 0.75, 1.0)
PRIOR_SIGMA = 2.0
FLAT_SHARE = 0.1
MEDIAN_HEAD = DistributionHead(1)  # its quantiles alone: the readout of the models' intervals


def training_prior(run: RunFolder) -> np.ndarray:
    """(101,) the run's training ages as a distribution: smoothed, then mixed with a flat one."""
    settings = run.data_settings
    prepared = load_split(run.split, image_root(settings["dataset"], Path(settings["data_root"])))
    ages = prepared.split("train")["age"].to_numpy().round().clip(0, 100).astype(int)
    counts = np.bincount(ages, minlength=101).astype(np.float64)
    kernel = np.exp(-0.5 * ((AGES[:, None] - AGES[None, :]) / PRIOR_SIGMA) ** 2)
    smoothed = kernel @ counts
    smoothed /= smoothed.sum()
    return (1 - FLAT_SHARE) * smoothed + FLAT_SHARE / 101


def median(probs: np.ndarray) -> np.ndarray:
    """The 0.5 quantile, class i spread evenly over [i - 0.5, i + 0.5], as the head's intervals are."""
    logits = torch.from_numpy(np.log(probs.clip(min=1e-300)))
    return MEDIAN_HEAD.quantiles(logits, torch.tensor([0.5]))[:, 0].double().numpy()


def readouts(probs: np.ndarray, prior: np.ndarray) -> dict[str, np.ndarray]:
    out = {"mean": probs @ AGES, "median": median(probs)}
    for alpha in ALPHAS:
        adjusted = probs * (prior.mean() / prior) ** alpha
        adjusted /= adjusted.sum(axis=1, keepdims=True)
        out[f"prior {alpha:g}"] = adjusted @ AGES
        out[f"prior {alpha:g}, median"] = median(adjusted)
    return out


def outputs_of(
    name: str, model, table: pd.DataFrame, root: Path, out: Path
) -> tuple[pd.DataFrame, np.ndarray]:
    """The table's faces (those read) and their (N, 101) predicted distributions, cached in OUT."""
    cached = out / f"outputs-{name}.npz"
    if cached.is_file():
        saved = np.load(cached, allow_pickle=False)
        return table.iloc[saved["indices"]].reset_index(drop=True), saved["probs"]
    table, predictions = predict_images(
        model, table, root, detect=True, detector="yunet", detector_model=YUNET, num_workers=2
    )
    probs = torch.from_numpy(predictions.outputs).float().softmax(dim=1).double().numpy()
    np.savez_compressed(cached, indices=predictions.indices, probs=probs)
    return table.iloc[predictions.indices].reset_index(drop=True), probs


def exact_scores(ages: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    metrics = age_metrics(ages, predicted)
    per_group = {g: m["mae"] for g, m in metrics["groups"].items()}
    return {
        "MAE": metrics["mae"],
        "balanced": float(np.mean(list(per_group.values()))),
        "signed": metrics["mean_signed_error"],
        **per_group,
    }


def grouped_scores(table: pd.DataFrame, predicted: np.ndarray) -> dict[str, float]:
    m = interval_label_metrics(table["age_low"], table["age_high"], predicted, table.get("age_group"))
    young = [g for name, g in m["groups"].items() if name in ("0-2", "3-9")]
    return {
        "inside": 100 * m["inside"],
        "distance": m["mean_distance"],
        "0-2, 3-9": float(np.mean([g["mean_distance"] for g in young])),
        **{name: g["mean_distance"] for name, g in m["groups"].items()},
    }


def table_markdown(title: str, rows: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(rows.values())))
    lines = [
        f"### {title}",
        "",
        "| readout | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def choose(val: dict[str, dict[str, float]]) -> tuple[str, list[str]]:
    """The readout the rule in this file's docstring picks on the validation split, and why."""
    why, kept = [], "mean"
    mean, med = val["mean"], val["median"]
    if med["MAE"] < mean["MAE"] and med["balanced"] <= mean["balanced"] + 0.02:
        kept = "median"
    why.append(
        f"median: MAE {med['MAE']:.3f} vs {mean['MAE']:.3f}, balanced {med['balanced']:.3f} vs "
        f"{mean['balanced']:.3f} -> keep {kept}"
    )
    suffix = ", median" if kept == "median" else ""
    base = val[kept]
    allowed = [
        f"prior {a:g}{suffix}" for a in ALPHAS if val[f"prior {a:g}{suffix}"]["MAE"] <= base["MAE"] + 0.05
    ]
    if allowed:
        best = min(allowed, key=lambda name: val[name]["balanced"])
        gain = base["balanced"] - val[best]["balanced"]
        why.append(
            f"{best}: balanced {val[best]['balanced']:.3f} (gain {gain:.3f}), MAE {val[best]['MAE']:.3f}"
        )
        if gain >= 0.10:
            kept = best
    else:
        why.append("no prior α keeps the validation MAE within 0.05")
    why.append(f"chosen: {kept}")
    return kept, why


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="a run folder or `default` (the bundled model)")
    parser.add_argument(
        "--run", default="runs/ensemble-tight-cut", help="the run whose split and training ages are used"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    run = RunFolder.of(Path(args.run))
    if not run.split.is_file():
        print(f"{args.run} has no split.csv: give --run the model's run folder", file=sys.stderr)
        return 2
    for needed in (PHOTOS, YUNET):
        if not needed.exists():
            print(f"{needed} is missing: this experiment reads ../shared", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    model = checkpoint.load_model(args.model, "cpu")
    prior = training_prior(run)
    report = [f"# Readouts of {args.model} (split and prior of {args.run})", ""]
    exact, val_rows = {}, {}
    for split in ("val", "test"):
        table, root, _ = evaluation_table(
            run.saved_split(),
            dataset=None,
            data_root=None,
            meta=None,
            split=split,
            by=(),
            min_age=0,
            max_age=100,
            limit=None,
        )
        table, probs = outputs_of(f"utkface-{split}", model, table, root, args.out)
        rows = {name: exact_scores(table["age"].to_numpy(), p) for name, p in readouts(probs, prior).items()}
        exact[split] = rows
        report.append(table_markdown(f"UTKFace {split} split ({len(table):,} faces)", rows))
        if split == "val":
            val_rows = rows
    _, why = choose(val_rows)
    report[1:1] = [
        "Choice on the validation split (the rule in experiments/decoding.py):",
        "",
        *[f"* {line}" for line in why],
        "",
    ]
    for name, labels in (
        ("portraits", PHOTOS / "portraits/labels.csv"),
        ("fairface", PHOTOS / "fairface/labels.csv"),
    ):
        table, root, _ = evaluation_table(
            None,
            dataset="csv",
            data_root=labels,
            meta=None,
            split="all",
            by=(),
            min_age=0,
            max_age=100,
            limit=None,
        )
        table, probs = outputs_of(name, model, table, root, args.out)
        outs = readouts(probs, prior)
        if "age_low" in table.columns:
            rows = {n: grouped_scores(table, p) for n, p in outs.items()}
        else:
            rows = {n: exact_scores(table["age"].to_numpy(), p) for n, p in outs.items()}
        report.append(table_markdown(f"{name} ({len(table)} photos)", rows))
    text = "\n".join(report)
    (args.out / "readouts.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
