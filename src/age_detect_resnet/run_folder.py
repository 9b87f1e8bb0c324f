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
import os
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePath
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

    @property
    def data_root(self) -> Path:
        """Where the run's data is: config.json's data_root (RunFolderError where it names none). One
        recorded relative, as typed to training, is the first of its `places` that exists; where none
        does, the recorded path as it is (the caller's message names it)."""
        try:
            recorded = Path(self.data_settings["data_root"])
        except (KeyError, TypeError) as err:
            raise RunFolderError(f"{self.config} names no dataset and data root") from err
        return next((place for place in self.places(recorded) if place.exists()), recorded)

    @property
    def made_in(self) -> Path | None:
        """The folder the run's training command ran in, where known: config.json records --out as typed,
        and a relative one that this folder's path still ends with gives it. None where --out was
        absolute, the folder was moved or renamed since, or the settings are another run's (an average's or
        ensemble's are its calibration run's)."""
        try:
            out = self.saved_config.get("train", {}).get("out")
        except RunFolderError:
            return None
        if not isinstance(out, str) or not out or Path(out).is_absolute():
            return None
        parts = Path(os.path.normpath(out)).parts
        here = self._absolute
        if ".." in parts or here.parts[-len(parts) :] != parts:
            return None
        return here.parents[len(parts) - 1]

    @property
    def _absolute(self) -> Path:
        """The folder's absolute path, symbolic links kept (runs/ may be a link to a bigger disk: the
        folder the run was made in is the one the link is in, not the disk's)."""
        return Path(os.path.normpath(Path.cwd() / self.path))

    def places(self, recorded: Path | str) -> list[Path]:
        """Where a path this run recorded may be: itself where absolute. A relative one (an older run's
        --init, a data root as typed) was relative to the folder its command ran in: from `made_in` where
        known, then, as it is read elsewhere, from the current folder, then from each folder above the
        run's, nearest first (runs are made beside it, or as runs/NAME); each place once."""
        path = Path(recorded)
        if path.is_absolute():
            return [path]
        places: list[Path] = []
        for folder in (self.made_in, Path.cwd(), *self._absolute.parents):
            place = Path(os.path.normpath(folder / path)) if folder is not None else None
            if place is not None and place not in places:
                places.append(place)
        return places

    def saved_split(self) -> SavedSplit:
        """The run's split.csv, of the dataset config.json names (RunFolderError where either is missing),
        its images where `data_root` finds them."""
        if not self.split.is_file():
            raise RunFolderError(f"{self.split} does not exist: the run saved no split")
        if "dataset" not in self.data_settings:
            raise RunFolderError(f"{self.config} names no dataset and data root")
        return SavedSplit(self.split, self.data_settings["dataset"], self.data_root, str(self.path))

    def made_from(self) -> list[Source]:
        """The models this run's model was made from, as recorded: its `--init` (config.json) and the
        models it averages or ensembles (best.json); [] for a run started from ImageNet. Each is found as
        `find_source` finds it."""
        sources = []
        init = self.saved_config.get("model", {}).get("init")
        if init:
            sources.append(self.find_source(str(init)))
        try:
            metadata = json.loads(self.best.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metadata = {}
        for key in ("averaged_from", "ensemble_of"):
            entries = metadata.get(key) if isinstance(metadata, dict) else None
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and entry.get("model"):
                    sources.append(self.find_source(str(entry["model"]), sha256=entry.get("sha256")))
        return sources

    def find_source(self, recorded: str, *, sha256: str | None = None) -> Source:
        """The model this run recorded as made from as `recorded`: `default` and an absolute path as they
        are. A relative one (runs recorded them as typed) is the first of its `places` that holds that
        very model, so that a folder of the same name elsewhere is not taken for it: the SHA-256 where
        one was recorded (averaged_from, ensemble_of); for an --init, which records none, the run's own
        backbone and head (training takes the start's), which a wrong folder may share, so that one found
        elsewhere than `made_in` comes with a doubt. Where none is that model, the Source has no path and
        says why."""
        from age_detect_resnet.modeling.bundled import is_default

        if is_default(recorded) or Path(recorded).is_absolute():
            return Source(recorded, recorded)
        where = f"recorded relative to the folder {self.path} was made in"
        places = self.places(recorded)
        fitting, reasons = [], []
        for place in places:
            if not place.exists():
                continue
            reason = self._not_the_source(place, sha256)
            if reason is None:
                fitting.append(place)
            else:
                reasons.append(f"{place} is {reason}")
        certain = sha256 or (self.made_in is not None and fitting[:1] == places[:1])
        if fitting and certain:
            return Source(recorded, str(fitting[0]))
        if fitting:
            others = f" ({', '.join(map(str, fitting[1:]))} would fit too)" if len(fitting) > 1 else ""
            return Source(
                recorded,
                str(fitting[0]),
                f"is {where}, which is not known: {fitting[0]} is taken for it, as it has the run's backbone "
                f"and head{others}",
            )
        if not reasons:
            return Source(
                recorded,
                None,
                (
                    f"is {where}, and is not found from there (where known), the current folder or a folder "
                    "above the run"
                ),
            )
        return Source(recorded, None, f"is {where}, and not found: {'; '.join(reasons)}")

    def _not_the_source(self, place: Path, sha256: str | None) -> str | None:
        """Why the model at `place` is not the one this run recorded as made from (`find_source`), or None."""
        from age_detect_resnet.modeling.checkpoint import read_metadata
        from age_detect_resnet.modeling.ensemble import main_member

        try:
            metadata = read_metadata(place)
        except (ValueError, OSError):  # ModelFileError: no model of this project
            return "no model of this project"
        if sha256:
            return None if metadata.get("sha256") == sha256 else "another model (not the SHA-256 recorded)"
        start = metadata.get("model", {})
        if "members" in start:  # an ensemble: training started from its main member
            start = start["members"][main_member(start)]
        trained = self.saved_config.get("model", {})
        kind = start.get("head", {}).get("kind") if isinstance(start.get("head"), dict) else None
        if trained.get("backbone") and (start.get("backbone"), kind) != (
            trained["backbone"],
            trained.get("head"),
        ):
            return (
                f"a {start.get('backbone')} with a {kind} head, and {self.path} fine-tuned a "
                f"{trained['backbone']} with a {trained.get('head')} head"
            )
        return None

    def load_split(self) -> PreparedData:
        """The run's images with their splits, rooted where config.json says its data lives."""
        return self.saved_split().load()


# Datasets whose file names identify a photo wherever the file lies (UTKFace's age_gender_race_date,
# IMDB-WIKI's person id and dates).
NAMED_DATASETS = frozenset({"utkface", "imdb-wiki"})


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

    def image_folder(self) -> Path | None:
        """The folder the split's paths start from, resolved, where it is known and there: None for the
        bundled model's split (its folder is the user's to name) or a data root that is gone."""
        from age_detect_resnet.data.sources import image_root

        if self.data_root is None:
            return None
        folder = image_root(self.dataset, self.data_root)
        return folder.resolve() if folder.is_dir() else None

    def shared(self, splits: Sequence[str], other: SavedSplit, other_splits: Sequence[str]) -> set[str]:
        """The images of this split's `splits` that are among `other`'s `other_splits`, as this split's
        paths: the same files (folder + path, resolved, where both folders are known: a CSV naming
        faces/x.jpg beside faces/ and the folder faces/ naming x.jpg share x.jpg), and, where either
        split is of a dataset whose file names identify a photo wherever it lies (`NAMED_DATASETS`), the
        same names: a copy of UTKFace in another folder holds the same faces, and the bundled model's
        shipped split has UTKFace names only. Two CSV tables that reuse names elsewhere share nothing;
        where a folder is gone, the paths as the tables write them are compared."""
        mine, theirs = self.paths(*splits), other.paths(*other_splits)
        shared: set[str] = set()
        if (
            NAMED_DATASETS & {self.dataset, other.dataset}
            or self.data_root is None
            or other.data_root is None
        ):
            names = {PurePath(path).name for path in theirs}
            shared |= {path for path in mine if PurePath(path).name in names}
        folders = self.image_folder(), other.image_folder()
        if folders[0] is not None and folders[1] is not None:
            files = {os.path.normpath(folders[1] / path) for path in theirs}
            shared |= {path for path in mine if os.path.normpath(folders[0] / path) in files}
        else:  # a folder that is gone: the paths as the tables write them
            written = {os.path.normpath(path) for path in theirs}
            shared |= {path for path in mine if os.path.normpath(path) in written}
        return shared


@dataclass(frozen=True)
class Source:
    """A model a run's model was made from (`RunFolder.made_from`): as recorded, and where it is."""

    recorded: str  # as config.json (--init) or best.json (averaged_from, ensemble_of) hold it
    path: str | None  # `default`, the recorded path, or a relative one found; None: not found
    doubt: str = ""  # why path is None, or may not be the model recorded: for a warning ("is recorded by")


@dataclass(frozen=True)
class Lineage:
    """A model and the models it was made from (`trace_lineage`)."""

    models: list[str]  # the model first, then every source found, each once, nearest first
    doubts: list[tuple[str, str]]  # (a source as recorded, `Source.doubt`): not found, or perhaps not it


def trace_lineage(model: Path | str) -> Lineage:
    """`model` and every model it was made from (`RunFolder.made_from`, run after run), each once, nearest
    first: the faces any of them trained on, the model has seen. The chain ends at a model that is no run
    folder (the bundled model, whose shipped split covers its own making; a loose file; a path that is
    gone), and at a source recorded relative that is not found (`RunFolder.find_source`): a folder of that
    name that holds another model is not followed in its place. `doubts` says which, and which sources
    found may not be the ones recorded, for a warning."""
    chain, doubts, seen, queue = [], [], set(), [str(model)]
    while queue:
        current = queue.pop(0)
        run = RunFolder.of(current)
        key = str(run.path.resolve()) if run is not None else current
        if key in seen:
            continue
        seen.add(key)
        chain.append(current)
        if run is None:
            continue
        with suppress(RunFolderError):  # an unreadable config.json: its starts are unknown
            for source in run.made_from():
                if source.path is not None:
                    queue.append(source.path)
                if source.doubt and (source.recorded, source.doubt) not in doubts:
                    doubts.append((source.recorded, source.doubt))
    return Lineage(chain, doubts)


def lineage(model: Path | str) -> list[str]:
    """The models of `trace_lineage(model)`: the model first."""
    return trace_lineage(model).models


def recorded_path(model: Path | str) -> str:
    """A model path as a run records what it was made from (best.json's averaged_from and ensemble_of):
    `default` (the bundled model) as it is, any other path resolved to an absolute one, so that its
    `lineage` is found from any working folder (`RunFolder.find_source` reads older, relative ones)."""
    from age_detect_resnet.modeling.bundled import is_default

    return str(model) if is_default(model) else str(Path(model).resolve())


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
