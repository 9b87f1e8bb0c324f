"""The whole job on a dataset: metadata (IMDB-WIKI), training, test evaluation, report and grid.

    age-detect pipeline --data-root data/raw                   # IMDB-WIKI: imdb_crop/ and/or wiki_crop/
    age-detect pipeline --data-root ../shared/data/utkface --weights resnet50.safetensors
    age-detect pipeline --data-root my_faces.csv --epochs 5     # any train option can be added

The dataset kind is recognised from the folder. Without --config, the recipe of the bundled model is
used: `--config cpu` without a GPU (128 px, aligned faces, photo augmentation, bf16, 4 epochs), since
the seed's full-size settings would take days on a CPU, and `--config gpu` (224 px, 20 epochs) with one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from age_detect_resnet.cli import build_meta
from age_detect_resnet.cli import train as train_module
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
    data_root = Path(args.data_root or "data/raw")
    try:
        args.dataset = args.dataset or guess_dataset(data_root)
    except DatasetNotFoundError as err:
        log.error("%s", err)
        return 2
    args.data_root = str(data_root)
    if args.dataset == "imdb-wiki" and args.meta is None:
        meta = Path("data/processed/meta.csv")
        if not meta.is_file():
            status = build_meta.main(["--data-root", str(data_root), "--out", str(meta)])
            if status:
                return status
        args.meta = str(meta)
    if args.config is None:
        recipe = "cpu" if select_device(args.device or "auto").type == "cpu" else "gpu"
        log.info("using the packaged recipe --config %s; pass --config to choose another", recipe)
        args.config = [Path(recipe)]
    return train_module.run(args, argv, prog="age-detect pipeline")


if __name__ == "__main__":
    sys.exit(main())
