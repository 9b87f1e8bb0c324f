"""The whole job on a dataset: metadata (IMDB-WIKI), training, test evaluation, report and grid.

    age-detect pipeline --data-root data/raw                   # IMDB-WIKI: imdb_crop/ and/or wiki_crop/
    age-detect pipeline --data-root ../shared/data/utkface --weights resnet50.safetensors
    age-detect pipeline --data-root my_faces.csv --epochs 5     # any train option can be added

The dataset kind is recognised from the folder. An IMDB-WIKI metadata table already in
data/processed/meta.csv is reused where it was built from this --data-root (and --min-face-score), else
built again. Without --config, the recipe of the bundled model is used: `--config cpu` without a GPU
(128 px, aligned faces, photo augmentation, bf16, 4 epochs), since the seed's full-size settings would
take days on a CPU, and `--config gpu` (224 px, 20 epochs) with one. `--resume` continues the run in
--out on the data and settings its config.json records.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from age_detect_resnet.cli import build_meta
from age_detect_resnet.cli import train as train_module
from age_detect_resnet.data.imdb_wiki import table_provenance
from age_detect_resnet.data.sources import DatasetNotFoundError, guess_dataset
from age_detect_resnet.runtime import select_device

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    parser = argparse.ArgumentParser(
        prog="age-detect pipeline",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_module.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.resume and args.out is not None:
        return resume(args, argv)
    data_root = Path(args.data_root or "data/raw")
    try:
        args.dataset = args.dataset or guess_dataset(data_root)
    except DatasetNotFoundError as err:
        log.error("%s", err)
        return 2
    args.data_root = str(data_root)
    if args.dataset == "imdb-wiki" and args.meta is None:
        meta = Path("data/processed/meta.csv")
        status = build_meta_unless_current(meta, data_root, args.min_face_score)
        if status:
            return status
        args.meta = str(meta)
    if args.config is None:
        recipe = "cpu" if select_device(args.device or "auto").type == "cpu" else "gpu"
        log.info("using the packaged recipe --config %s; pass --config to choose another", recipe)
        args.config = [Path(recipe)]
    return train_module.run(args, argv, prog="age-detect pipeline")


def resume(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """`--resume --out RUN`: continue the run in RUN as `train --resume` does (without --out, the run's
    folder is the default one of the dataset and recipe, found as a new run finds them). Its config.json
    knows its data and recipe, so the data root is not looked for (a --data-root given is checked
    against the run's, as any setting is), no metadata is built and no packaged recipe is layered over
    the run's settings: a recipe's epochs or other settings would change the run, or be refused."""
    return train_module.run(args, argv, prog="age-detect pipeline")


def build_meta_unless_current(meta: Path, data_root: Path, min_face_score: float | None) -> int:
    """Build the metadata table `meta` of `data_root` (build-meta's exit status), unless the one there was
    built from the same data root with the same --min-face-score: the table's paths are relative to its
    root, so one of another root (or one that does not say which) would train on other images."""
    wanted = {"data_root": str(data_root.resolve()), "min_face_score": min_face_score}
    if meta.is_file():
        recorded = table_provenance(meta)
        if recorded is not None and all(recorded.get(key) == value for key, value in wanted.items()):
            log.info("reusing %s, built from %s (delete it to build it again)", meta, _settings(wanted))
            return 0
        log.info(
            "%s was built from %s, not %s: building it again",
            meta,
            _settings(recorded) if recorded is not None else "a data root it does not record",
            _settings(wanted),
        )
    score = ["--min-face-score", str(min_face_score)] if min_face_score is not None else []
    return build_meta.main(["--data-root", str(data_root), "--out", str(meta), *score])


def _settings(record: dict) -> str:
    score = record.get("min_face_score")
    return record["data_root"] + (f" with --min-face-score {score}" if score is not None else "")


if __name__ == "__main__":
    sys.exit(main())
