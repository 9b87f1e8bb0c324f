"""A run folder: the one place that knows what a training run writes, and where.

    runs/NAME/
        config.json              the resolved settings (a continued run reads them back)
        split.csv                every image with its split (evaluation and export reuse it)
        best.safetensors + .json the model with the best validation MAE, and its metadata
        last.pt                  the training state after the last finished epoch (--resume)
        metrics.csv, plots/      the learning curves; run.json + report.md: the run's summary
        predictions.csv, evaluation.json/.md   the best model on the test split
        eval-<dataset>-<split>/  reports of `age-detect evaluate` (the name says what was evaluated:
                                 eval-csv-photos-all-onnx/: `evaluation_name`)
        age_model.onnx, age_model.torchscript.pt + .json   exports of `age-detect export`

Training writes it; evaluate, export, predict and serve find a run's parts through `RunFolder.of`.
`SavedSplit.of` finds which images a model trained on and which it never saw: its run's split.csv, or
for the bundled model the copy of its run's split shipped beside it.
"""

from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from age_detect_resnet.data.splits import PreparedData


class RunFolderError(ValueError):
    """A run folder that lacks what was asked of it, or holds a run that must not be replaced; the message
    names the file."""


class RunFolder:
    """The files of one run, by name; nothing is read until asked for."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, model: Path | str | None) -> RunFolder | None:
        """The run a model belongs to (a run folder, or a file in one), if it is one: it holds
        config.json. None for the bundled model, a loose file, or a folder of something else."""
        if model is None or str(model) == "default":
            return None
        path = Path(model)
        folder = cls(path if path.is_dir() else path.parent)
        return folder if folder.config.is_file() else None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # The files, by what they hold.
    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def split(self) -> Path:
        return self.path / "split.csv"

    @property
    def best(self) -> Path:
        return self.path / "best.safetensors"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def summary(self) -> Path:
        return self.path / "run.json"

    @property
    def evaluation(self) -> Path:
        """evaluation.json of the final test (evaluation.md and predictions.csv lie beside it)."""
        return self.path / "evaluation.json"

    def evaluation_dir(self, name: str) -> Path:
        """Where `age-detect evaluate` reports on this run's model by default (`evaluation_name`)."""
        return self.path / name

    def export(self, fmt: str) -> Path:
        """The default file of `age-detect export --format fmt` (onnx or torchscript)."""
        return self.path / ("age_model.onnx" if fmt == "onnx" else "age_model.torchscript.pt")

    def check_new(self, *, continue_with: str | None = None) -> None:
        """Refuse (RunFolderError) a folder that already holds a run, its model or its training state: a
        new run must not replace what a finished or interrupted one left. `continue_with` names the option
        that continues it instead, where there is one."""
        for part in (self.best, self.last):
            if part.exists():
                continuing = f"pass {continue_with} to continue it, or " if continue_with else ""
                raise RunFolderError(
                    f"{part} already exists; {continuing}choose another --out (nothing was changed)"
                )

    # What the files say.
    @cached_property
    def saved_config(self) -> dict[str, Any]:
        try:
            data = json.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RunFolderError(f"{self.config} cannot be read as a run's settings ({err})") from err
        if not isinstance(data, dict):
            raise RunFolderError(f"{self.config} is not a run's settings")
        return data

    @property
    def data_settings(self) -> dict[str, Any]:
        """The [data] section of config.json ({} where it has none)."""
        return self.saved_config.get("data", {})

    def saved_split(self) -> SavedSplit:
        """The run's split.csv, of the dataset config.json names (RunFolderError where either is missing)."""
        if not self.split.is_file():
            raise RunFolderError(f"{self.split} does not exist: the run saved no split")
        data = self.data_settings
        try:
            return SavedSplit(self.split, data["dataset"], Path(data["data_root"]), str(self.path))
        except KeyError as err:
            raise RunFolderError(f"{self.config} names no dataset and data root") from err

    def made_from(self) -> list[str]:
        """The models this run's model was made from, as recorded: its `--init` (config.json) and the
        models it averages or ensembles (best.json); [] for a run started from ImageNet."""
        sources = []
        init = self.saved_config.get("model", {}).get("init")
        if init:
            sources.append(str(init))
        try:
            metadata = json.loads(self.best.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metadata = {}
        for key in ("averaged_from", "ensemble_of"):
            entries = metadata.get(key) if isinstance(metadata, dict) else None
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and entry.get("model"):
                    sources.append(str(entry["model"]))
        return sources

    def load_split(self) -> PreparedData:
        """The run's images with their splits, rooted where config.json says its data lives."""
        return self.saved_split().load()


@dataclass(frozen=True)
class SavedSplit:
    """Which images of a dataset a model trained on and which it never saw: a split.csv (path, age,
    person_id, split; paths relative to the dataset's folder) and the dataset it is of. `data_root` is
    where the images were, where known (a run's config.json); the bundled model's split travels without
    one, so the user names the folder."""

    path: Path
    dataset: str
    data_root: Path | None
    owner: str  # the model it belongs to, for messages: a run folder, or "the bundled model"

    @classmethod
    def of(cls, model: Path | str | None) -> SavedSplit | None:
        """The split `model` was trained with: its run's, the bundled model's (`default`, or a file
        exported from it), or None for a loose file or a run that saved none."""
        from age_detect_resnet.modeling.bundled import (
            AGE_MODEL_SHA256,
            BundledModelError,
            bundled_split,
            is_default,
        )

        run = None if is_default(model) else RunFolder.of(model)
        if run is not None and run.split.is_file():
            return run.saved_split()
        if not (is_default(model) or exported_from(Path(model)) == AGE_MODEL_SHA256):
            return None
        try:
            return bundled_split()
        except BundledModelError as err:  # a damaged installation: a user error, said in one line
            raise RunFolderError(str(err)) from err

    def load(self, data_root: Path | str | None = None) -> PreparedData:
        """Every image of the split with its split name, rooted at `data_root` (else where they were)."""
        from age_detect_resnet.data.sources import image_root
        from age_detect_resnet.data.splits import load_split

        root = data_root if data_root is not None else self.data_root
        if root is None:
            raise RunFolderError(
                f"{self.owner} was trained on {self.dataset}: pass --data-root with that dataset's folder"
            )
        return load_split(self.path, image_root(self.dataset, Path(root)))

    def paths(self, *splits: str) -> set[str]:
        """The images of the named splits, as paths relative to the dataset's folder."""
        import pandas as pd

        table = pd.read_csv(self.path, usecols=["path", "split"], dtype={"path": str})
        return set(table.loc[table["split"].isin(splits), "path"])


def lineage(model: Path | str) -> list[str]:
    """`model` and every model it was made from (`RunFolder.made_from`, run after run), each once, nearest
    first: the faces any of them trained on, the model has seen. The chain ends at a model that is no run
    folder (the bundled model, whose shipped split covers its own making; a loose file; a path that is
    gone)."""
    chain, seen, queue = [], set(), [str(model)]
    while queue:
        current = queue.pop(0)
        run = RunFolder.of(current)
        key = str(run.path.resolve()) if run is not None else current
        if key in seen:
            continue
        seen.add(key)
        chain.append(current)
        if run is not None:
            with suppress(RunFolderError):  # an unreadable config.json: its starts are unknown
                queue.extend(run.made_from())
    return chain


def named_in_lineage(source: str, model: Path | str, *, given: str | None = None) -> str:
    """`source` of `lineage(model)` for a message: the model as `given` (default: its path), or the
    source with which model was made from it."""
    given = given or str(model)
    return given if source == str(model) else f"{source} (which {given} was made from)"


def evaluation_name(
    dataset: str, split: str, *, csv: str | Path | None = None, tta: bool = False, backend: str = "torch"
) -> str:
    """The folder name of an `age-detect evaluate` report: one per thing evaluated, so that a second
    evaluation does not overwrite the first: the dataset (a CSV's file name too), the split, and the flip
    views or another backend where used (eval-utkface-test, eval-csv-photos-all-tta-onnx)."""
    parts = [dataset, Path(csv).stem if csv is not None else None, split, "tta" if tta else None]
    parts.append(backend if backend != "torch" else None)
    return "-".join(["eval", *(part for part in parts if part)])


def exported_from(path: Path) -> str | None:
    """The SHA-256 of the model an exported file (`age-detect export`: its metadata .json beside it) was
    made from, or None for anything else."""
    from age_detect_resnet.inference.backends import metadata_path  # it imports this module

    if path.suffix == ".json" or not path.is_file():
        return None
    try:
        source = json.loads(metadata_path(path).read_text(encoding="utf-8"))["source"]
        return source["sha256"] if isinstance(source, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
