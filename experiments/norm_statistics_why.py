"""Why recomputing the batch-norm statistics gains: the validation MAE of each run's best model under
other statistics, on the run's own validation faces as its training validated them (cache, fp32).

    python experiments/norm_statistics_why.py runs/stage1-bundle runs/aligned-dldl-long \\
        --out results/norm-statistics-why.md

The statistics compared (the weights are the same in every row):
  saved           what training left: an exponential average (momentum 0.1) of the last batches'
                  statistics, each under that step's weights (with --ema-decay, the trained model's
                  statistics, not those of the EMA weights that are saved)
  cumulative N    reset, then the plain mean over N augmented training batches (what `train` and
                  `age-detect average` do, N = 40)
  clean 40        the plain mean over 40 batches of the same training faces, not augmented
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from age_detect_resnet.data.sources import image_root
from age_detect_resnet.data.splits import load_split
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.norm_statistics import recompute_norm_statistics
from age_detect_resnet.run_folder import RunFolder
from age_detect_resnet.runtime import autocast_factory
from age_detect_resnet.training.config import resolve_config
from age_detect_resnet.training.distributed import Distributed
from age_detect_resnet.training.engine import evaluate
from age_detect_resnet.training.loaders import build_loaders

CPU = torch.device("cpu")


def loaders_of(run: RunFolder, **overrides):
    config = resolve_config(run.config, {"num_workers": 2, **overrides})
    prepared = load_split(run.split, image_root(config.data.dataset, config.data.data_root))
    loaders, _ = build_loaders(prepared, config, Distributed(device=CPU))
    return loaders


def training_batches(loader, seed: int = 0):
    loader.generator.manual_seed(seed)
    return (batch.images for batch in loader)


def validation_mae(model, loader) -> float:
    metrics, _ = evaluate(model, loader, device=CPU, autocast=autocast_factory(CPU, "fp32"), progress=False)
    return metrics["mae"]


def variants(run: RunFolder):
    """The statistics to compare, as (name, what to do to the loaded model), and the validation loader."""
    augmented = loaders_of(run)
    clean = loaders_of(run, augment="none", occlusion=0.0)
    found = [
        ("saved", None),
        *(
            (
                f"cumulative {n}",
                lambda m, n=n: recompute_norm_statistics(m, training_batches(augmented["train"]), limit=n),
            )
            for n in (10, 40)
        ),
        ("clean 40", lambda m: recompute_norm_statistics(m, training_batches(clean["train"]), limit=40)),
    ]
    return found, augmented["val"]


def write_table(rows: dict[str, dict[str, float]], names: list[str], out: Path) -> None:
    """The table so far (rewritten after every measurement: a stopped job keeps what it measured)."""
    lines = [
        "| batch-norm statistics | " + " | ".join(f"{n} validation MAE" for n in names) + " |",
        "|---|" + "---:|" * len(names),
        *(
            f"| {variant} | " + " | ".join(f"{maes[n]:.3f}" if n in maes else "–" for n in names) + " |"
            for variant, maes in rows.items()
        ),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (config.json, split.csv, best model)")
    parser.add_argument("--out", type=Path, required=True, help="markdown table to write")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows: dict[str, dict[str, float]] = {}
    names = [RunFolder(p).name for p in args.runs]
    for path in args.runs:
        run = RunFolder(path)
        found, val_loader = variants(run)
        for name, apply in found:
            started = time.perf_counter()
            model = checkpoint.load_model(run.best, CPU)
            if apply is not None:
                apply(model)
            rows.setdefault(name, {})[run.name] = validation_mae(model, val_loader)
            write_table(rows, names, args.out)
            logging.info(
                "%s %s: %.3f (%.0f s)", run.name, name, rows[name][run.name], time.perf_counter() - started
            )
    print(args.out.read_text())


if __name__ == "__main__":
    main()
