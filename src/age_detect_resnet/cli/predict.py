"""Ages of the faces in photos and videos: files, folders and globs, to the terminal, CSV/JSON and
annotated images and videos.

    age-detect predict --model runs/NAME photo.jpg holiday/ "scans/*.png"
    age-detect predict --model runs/NAME photos/ --output ages.csv --annotate annotated/
    age-detect predict --model runs/NAME crops/ --no-detect          # each image is already a face
    age-detect predict clip.mp4 --output ages.csv --annotate out/    # 5 frames a second (--fps 5)
    age-detect predict clip.mp4 --every 1                            # every frame

Videos (.mp4, .mov, .avi, .mkv, .webm, ...: whatever OpenCV decodes) are read frame by frame at a stride:
`--fps F` frames per second of video (default 5: ages change slowly, and people rarely move far in 0.2 s,
so tracking holds), or `--every N`-th frame (`--every 1`: all). Each face is followed from frame to frame
(video/tracking.py) and each person gets a steady age: the median of their per-frame ages, with an
interval narrowed by the frames that disagree (see the tracking module). Detection runs on a copy of the
frame at most `--detect-side` pixels on its longer side (default 640; 0: the full frame).
The terminal shows one line per track. Outputs:
* `--output ages.csv`: one row per face per sampled frame, after the photo rows. Video rows add the
  columns frame, time (seconds: the frame's own timestamp), track_id, steady_age, steady_low,
  steady_high (the track's steady age and interval up to that frame) and track_frames; their
  age/age_low/age_high are that frame's own. Beside it, `ages_tracks.csv`: one row per person (path,
  track_id, first_time, last_time, frames, age, age_low, age_high). Without videos the file is exactly
  the photo table.
* `--output ages.json`: photos as before; each video is {"path", "video": {fps, frame_count, width, height,
  sampled_fps, sampled_frames}, "tracks": [...], "faces": [per-frame rows, with landmarks as photos' faces],
  "error"}.
* `--annotate DIR`: `DIR/<stem>_ages.mp4`, the sampled frames with boxes, track ids and steady ages.
  Inputs that would share an annotated name (a/p.jpg and b/p.jpg, clip.mp4 and clip.avi) get their
  extension, their folders below the ones they share, or both in it instead: a_p_ages.jpg, b_p_ages.jpg,
  clip_mp4_ages.mp4, clip_avi_ages.mp4 (the same names on every run over the same inputs). A name that
  is one of the inputs (x.jpg beside x_ages.jpg, annotated into their folder) is numbered: x_2_ages.jpg.
  A video in which no face was found gets no copy.

A long batch loses nothing when it stops: with `--output`, each photo's faces are also appended, as it
is predicted, to `<output>.partial` (JSON lines), which is removed once the output is written. After an
interruption (Ctrl-C, a crash, a full disk), the same command with `--resume` predicts only the photos not
in it; without `--resume` the command refuses to start over it. Photos that failed and videos are
predicted again (a run stopped before it kept a photo leaves no `.partial`).

Each face is detected, cropped with the model's training margins and predicted in batches. A file that
cannot be used (missing, not an image or video, truncated, empty, too large) or has no face is reported by
name and skipped; the exit status is 1 when any file failed, 0 otherwise. --max-file-mb applies to photos
only: videos are streamed.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image

from age_detect_resnet.atomic import atomic_path, unwritable_reason, write_text_atomic
from age_detect_resnet.cli.common import (
    add_detector_arguments,
    add_device_argument,
    command_main,
    non_negative_int,
    positive_int,
    user_errors,
    user_message,
)
from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.images import IMAGE_SUFFIXES, VIDEO_SUFFIXES, ImageReadError, load_rgb
from age_detect_resnet.inference.annotate import age_label, draw_predictions
from age_detect_resnet.inference.predictor import AgePredictor, FacePrediction, load_predictor
from age_detect_resnet.modeling import bundled
from age_detect_resnet.progress import progress as show_progress
from age_detect_resnet.runtime import resolve_precision, select_device
from age_detect_resnet.video.process import VideoResult, is_video, predict_video
from age_detect_resnet.video.reader import MAX_FPS, MIN_FPS
from age_detect_resnet.video.tracking import TrackSummary

log = logging.getLogger(__name__)

MAX_FILE_MB = 50
# Photos decoded and predicted together: enough faces to fill a batch, little memory.
FILES_PER_CHUNK = 16
# Videos: sampled frames per second of video, and the detector's input side (see the module docstring).
VIDEO_FPS = 5.0
VIDEO_DETECT_SIDE = 640


@dataclass
class PhotoResult:
    path: Path
    faces: list[FacePrediction] = field(default_factory=list)
    error: str | None = None
    # the picture the faces were found on, for --annotate to draw on (decoding the file again could
    # read another picture: one this run's --annotate has just written over); dropped once drawn
    image: Image.Image | None = field(default=None, repr=False)


@dataclass
class VideoEntry:
    """A video input: its result, or why it could not be used."""

    path: Path
    result: VideoResult | None = None
    error: str | None = None


class JournalError(ValueError):
    """An interrupted run's journal that this run cannot use as asked; the message says what to do."""


class PredictionJournal:
    """The photos of a batch predicted so far, kept beside `--output` while it runs (see the module
    docstring): a header line with the options that decide the ages, then one JSON line per photo."""

    def __init__(self, out: Path, settings: dict[str, Any], *, resume: bool) -> None:
        self.path = out.with_name(f"{out.name}.partial")
        self.done: dict[str, PhotoResult] = {}  # kept by the interrupted run
        self.recorded = 0  # kept by this one
        if self.path.exists():
            if not resume:
                raise JournalError(
                    f"{self.path} holds the photos an interrupted run of this command predicted: pass "
                    "--resume to go on from them, or delete it to start over"
                )
            self.done, intact = self._read(settings)
            # Appended after the last whole line: a line torn by the stop (kill -9, a full disk) is cut
            # off first, else the next line would be glued to it and damage the journal for good.
            with self.path.open("r+b") as file:
                file.truncate(intact)
            self._file = self.path.open("a", encoding="utf-8")
        else:
            if resume:
                log.info("no interrupted run to resume (no %s): predicting every photo", self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")
            self._write({"settings": settings})

    def _read(self, settings: dict[str, Any]) -> tuple[dict[str, PhotoResult], int]:
        """The photos kept, and the length in bytes of the journal's whole lines: a last line the stop
        cut short (no newline yet, or not the JSON it was going to be) is not kept, and `__init__` cuts
        it off."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")  # the last item: what follows the last newline (b"" when none)
        try:
            header = json.loads(lines[0])["settings"] if len(lines) > 1 else None
        except (ValueError, KeyError, TypeError):
            header = None
        if not isinstance(header, dict):
            raise JournalError(
                f"{self.path} is not a journal of `age-detect predict`; delete it to start over"
            )
        # key by key: an option a journal of an older version did not record counts as not given
        changed = ", ".join(
            f"{key} {header.get(key)!r} then, {value!r} now"
            for key, value in settings.items()
            if header.get(key) != value
        )
        if changed:
            raise JournalError(
                f"{self.path} was written with other options ({changed}): --resume with the same options, "
                "or delete it to start over"
            )
        done, intact = {}, len(lines[0]) + 1
        whole = lines[1:-1]
        for number, line in enumerate(whole, start=2):
            try:
                entry = json.loads(line)
                faces = [FacePrediction.from_record(face) for face in entry["faces"]]
            except (ValueError, KeyError, TypeError, IndexError):
                if number == len(whole) + 1:  # written in full, then damaged by the stop: dropped
                    break
                raise JournalError(f"{self.path} line {number} is damaged; delete it to start over") from None
            done[entry["path"]] = PhotoResult(Path(entry["path"]), faces)
            intact += len(line) + 1
        return done, intact

    def _write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def record(self, result: PhotoResult) -> None:
        """Keep a predicted photo (failed ones are left to be tried again)."""
        if result.error is None:
            self._write({"path": str(result.path), "faces": [face.as_record() for face in result.faces]})
            self.recorded += 1

    def close(self) -> None:
        self._file.close()

    def finish(self) -> None:
        """The output is written: the journal is no longer needed."""
        self.close()
        self.path.unlink(missing_ok=True)


def journal_settings(args: argparse.Namespace, detector: str) -> dict[str, Any]:
    """What decides a photo's ages, `detector` being the one in use (`auto` may have fallen back to the
    Haar cascade), and where its annotated copy goes: a resumed run must have the same (the photos kept
    are not predicted again, so an --annotate added or moved on --resume would miss them)."""
    model = Path(args.model)
    if bundled.is_default(args.model):  # the bundle a package upgrade may have changed
        named = f"default ({bundled.AGE_MODEL_SHA256[:12]})"
    else:
        named = str(model.resolve()) if model.exists() else str(args.model)
    return {
        "model": named,
        "backend": args.backend,
        "tta": bool(args.tta),
        "detector": detector,
        "detector_model": str(Path(args.detector_model).resolve()) if args.detector_model else None,
        "max_file_mb": args.max_file_mb,
        "annotate": str(Path(args.annotate).resolve()) if args.annotate else None,
    }


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Image and video files named by `inputs` (files, folders searched recursively, glob patterns), in
    order, without repeats; plus a message for every input that matched nothing. An input that exists
    is taken as it is written (`me [2023].jpg` is a file, not a pattern); the folders a pattern matches
    are searched as folders named are."""
    found: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = files_in(path)
        elif not path.exists() and any(ch in item for ch in "*?["):
            # glob.glob, unlike Path.glob, takes absolute patterns such as /data/*/*.jpg
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True))  # noqa: PTH207
            matches = [
                f for p in matched for f in (files_in(p) if p.is_dir() else [p] if p.is_file() else [])
            ]
        else:
            matches = [path]  # missing files are reported when read, by name
        if not matches:
            problems.append(f"{item}: no image or video files found")
        found.extend(matches)
    return list(dict.fromkeys(found)), problems


def files_in(folder: Path) -> list[Path]:
    """The image and video files under `folder`, sorted. Symlinked folders are followed (a photo
    library linked in from another disk), each real folder searched once, so a link back up the tree
    ends. Not macOS's AppleDouble files (._obama.jpg beside obama.jpg: its Finder metadata, left on USB
    sticks, network shares and in zip files): they are no photos and would each count as a failed
    input. A file named on the command line is read whatever its name."""
    matches, seen = [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders.clear()  # a loop, or a folder linked twice: already searched
            continue
        seen.add(real)
        matches.extend(
            Path(root, name)
            for name in names
            if name.lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES)
            and not name.startswith("._")
            and Path(root, name).is_file()
        )
    return sorted(matches)


def predict_photos(
    predictor: AgePredictor, paths: Sequence[Path], *, max_file_mb: float = MAX_FILE_MB, progress: bool = True
) -> Iterator[PhotoResult]:
    """One result per path, in order; faces of several photos share model batches. With `progress`, a
    bar on a terminal, else a log line every 30 s (`progress.py`)."""
    results = _predict_photos(predictor, paths, max_file_mb)
    if not progress:
        return results
    return iter(show_progress(results, total=len(paths), desc="predicting", unit="photo"))


def _predict_photos(
    predictor: AgePredictor, paths: Sequence[Path], max_file_mb: float
) -> Iterator[PhotoResult]:
    for start in range(0, len(paths), FILES_PER_CHUNK):
        chunk, images, results = paths[start : start + FILES_PER_CHUNK], [], []
        for path in chunk:
            result = PhotoResult(path)
            try:
                if path.is_file() and path.stat().st_size > max_file_mb * 1_000_000:
                    raise ImageReadError(
                        f"{path} is larger than {max_file_mb:g} MB; pass --max-file-mb to allow it"
                    )
                images.append(load_rgb(path))
            except ImageReadError as err:
                result.error = str(err)
            results.append(result)
        faces, pictures = iter(predictor.predict_images(images)), iter(images)
        for result in results:
            if result.error is None:
                result.faces, image = next(faces), next(pictures)
                if not result.faces:
                    result.error = f"no face found in {result.path}; pass --no-detect to use the whole image"
                else:
                    result.image = image  # for --annotate; the caller drops it once drawn
            yield result


def result_rows(results: Sequence[PhotoResult]) -> list[dict]:
    return [{"path": str(r.path), **face.as_dict()} for r in results for face in r.faces]


# Column order of a CSV of photos only, and of one holding video rows (photo rows leave the video columns
# empty); INTERVAL_COLUMNS are left out for a model without intervals.
PHOTO_COLUMNS = "path face_index x1 y1 x2 y2 detector_score age age_low age_high".split()
INTERVAL_COLUMNS = ("age_low", "age_high", "steady_low", "steady_high")
VIDEO_COLUMNS = (
    "path frame time track_id face_index x1 y1 x2 y2 detector_score age age_low age_high "
    "steady_age steady_low steady_high track_frames"
).split()
TRACK_COLUMNS = "path track_id first_time last_time frames age age_low age_high".split()
# Whole numbers that photo rows leave empty: kept whole (pandas would write 20.0 beside a missing value).
WHOLE_VIDEO_COLUMNS = ("frame", "track_id", "track_frames")


def write_output(
    results: Sequence[PhotoResult], out: Path, *, videos: Sequence[VideoEntry] = (), intervals: bool = False
) -> None:
    """`out` (.csv or .json) with the photos' and videos' faces; for videos in a CSV also
    `<stem>_tracks.csv` (see the module docstring). The CSV's columns are decided by the model (an
    interval where it has one: `intervals`), not by which photos had faces: a batch without a face has
    the header of any other."""
    if out.suffix.lower() == ".json":
        document = [
            {"path": str(r.path), "faces": [f.as_json() for f in r.faces], "error": r.error} for r in results
        ] + [video_document(v) for v in videos]
        write_text_atomic(out, json.dumps(document, indent=2) + "\n")
    elif out.suffix.lower() == ".csv":
        rows = result_rows(results)
        if videos:
            rows += [{"path": str(v.path), **f.as_dict()} for v in videos if v.result for f in v.result.faces]
        columns = [
            c for c in (VIDEO_COLUMNS if videos else PHOTO_COLUMNS) if intervals or c not in INTERVAL_COLUMNS
        ]
        table = pd.DataFrame(rows, columns=columns)
        for column in WHOLE_VIDEO_COLUMNS:
            if column in table.columns:
                table[column] = table[column].astype("Int64")
        with atomic_path(out) as tmp:
            table.to_csv(tmp, index=False)
        if videos:
            tracks = [
                {"path": str(v.path), **t.as_dict()} for v in videos if v.result for t in v.result.tracks
            ]
            track_columns = [c for c in TRACK_COLUMNS if intervals or c not in INTERVAL_COLUMNS]
            with atomic_path(tracks_path(out)) as tmp:
                pd.DataFrame(tracks, columns=track_columns).to_csv(tmp, index=False)
    else:
        raise ValueError(f"--output {out} must end in .csv or .json")


def tracks_path(out: Path) -> Path:
    """Where the per-track table of a CSV `out` goes: ages.csv -> ages_tracks.csv."""
    return out.with_name(f"{out.stem}_tracks.csv")


def video_document(entry: VideoEntry) -> dict:
    result = entry.result
    if result is None:
        return {"path": str(entry.path), "video": None, "tracks": [], "faces": [], "error": entry.error}
    info = result.info
    return {
        "path": str(entry.path),
        "video": {
            "fps": info.fps,
            "frame_count": info.frame_count,
            "width": info.width,
            "height": info.height,
            "sampled_fps": result.rate,
            "sampled_frames": result.frames,
        },
        "tracks": [t.as_dict() for t in result.tracks],
        "faces": [f.as_json() for f in result.faces],
        "error": entry.error,
    }


def track_line(path: Path, track: TrackSummary) -> str:
    age = f"{track.age:.0f}"
    if track.interval is not None:
        age += f" ({track.interval[0]:.0f}-{track.interval[1]:.0f})"
    return (
        f"{path}\ttrack {track.track_id}\t{track.first_time:.1f}-{track.last_time:.1f} s\t"
        f"{track.frames} frames\tage {age}"
    )


def predict_videos(
    predictor: AgePredictor,
    paths: Sequence[Path],
    args: argparse.Namespace,
    annotated: Mapping[Path, str],
) -> Iterator[VideoEntry]:
    """One entry per video, in order: tracked faces, or the reason it was skipped. With --annotate, a
    video's annotated copy is named by `annotated` (`annotated_names` of the run's inputs)."""
    for path in paths:
        entry = VideoEntry(path)
        annotate = Path(args.annotate) / annotated[path] if args.annotate else None
        try:
            entry.result = predict_video(
                predictor,
                path,
                every=args.every,
                fps=None if args.every else args.fps or VIDEO_FPS,
                annotate_to=annotate,
                detect_max_side=args.detect_side,
            )
        except (ImageReadError, OSError) as err:
            entry.error = str(err)
        else:
            if not entry.result.tracks:
                info = entry.result.info
                scaled = args.detect_side and max(info.width, info.height) > args.detect_side
                full = ", or --detect-side 0 to find small faces in the full frame" if scaled else ""
                entry.error = (
                    f"no face found in the {entry.result.frames} sampled frames of {path}; "
                    f"pass --every 1 to look at every frame{full}"
                )
                if annotate is not None:  # a failed input has no annotated copy, as a photo has none
                    annotate.unlink(missing_ok=True)
                    entry.result.annotated = None
        yield entry


def annotated_names(paths: Sequence[Path], folder: Path | None = None) -> dict[Path, str]:
    """The name of each input's annotated copy in the one --annotate `folder`: `<stem>_ages.jpg`
    (`.mp4` for a video) where no other input of the run has it; inputs that would share a name get
    their extension (p.jpg, p.png -> p_jpg_ages.jpg, p_png_ages.jpg), else their folders below the ones
    they share (a/p.jpg, b/p.jpg -> a_p_ages.jpg, b_p_ages.jpg), else both. Never the name of an input
    in `folder` (x.jpg beside an input x_ages.jpg: x_2_ages.jpg), which would be written over before
    it is read. Decided over the whole input list, in its order, so that a --resume over the same
    inputs writes the same names."""

    def name(path: Path, label: str) -> str:
        return f"{label}_ages{'.mp4' if is_video(path) else '.jpg'}"

    inputs_there = set()
    if folder is not None:
        where = folder.resolve()
        inputs_there = {path.name.casefold() for path in paths if path.resolve().parent == where}
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(name(path, path.stem).casefold(), []).append(path)
    names = {
        group[0]: name(group[0], group[0].stem)
        for key, group in groups.items()
        if len(group) == 1 and key not in inputs_there
    }
    taken = inputs_there | {n.casefold() for n in names.values()}
    for group in (g for key, g in groups.items() if len(g) > 1 or key in inputs_there):
        # abspath, unlike resolve, keeps the folder names given (not where symlinks lead)
        parents = [Path(os.path.abspath(path)).parent for path in group]  # noqa: PTH100
        root = Path(os.path.commonpath(parents))
        folders = ["_".join(parent.relative_to(root).parts) for parent in parents]
        extended = ["_".join(filter(None, (path.stem, path.suffix[1:]))) for path in group]
        stems = [path.stem for path in group]
        tiers = [
            ["_".join(filter(None, parts)) for parts in zip(*columns, strict=True)]
            for columns in ((extended,), (folders, stems), (folders, extended))
        ]
        labels = (
            next((t for t in tiers if len({x.casefold() for x in t}) == len(t)), tiers[-1])
            if len(group) > 1
            else stems  # alone, but named as an input is: numbered below
        )
        for path, label in zip(group, labels, strict=True):
            # a name another input already has (the same file given twice, an input named a_p.jpg):
            # numbered, in input order
            candidate, number = name(path, label), 1
            while candidate.casefold() in taken:
                number += 1
                candidate = name(path, f"{label}_{number}")
            names[path] = candidate
            taken.add(candidate.casefold())
    return {path: names[path] for path in paths}


def annotate_to(result: PhotoResult, folder: Path, name: str) -> Path:
    """Save the photo with its faces boxed as `folder/name` (`annotated_names`), drawn on the picture
    they were found on (`result.image`; the file decoded again where the result has none)."""
    out = folder / name
    image = result.image if result.image is not None else load_rgb(result.path)
    with atomic_path(out) as tmp:
        draw_predictions(image, result.faces).save(tmp, format="JPEG", quality=92)
    return out


class OutputPathError(ValueError):
    """An --output or --annotate path this run could not write to; the message names it and says what
    to do."""


def check_output_paths(args: argparse.Namespace) -> None:
    """Refuse, before any photo is predicted, an --output or --annotate the run could not write at the
    end (an --output that is a folder, a folder that cannot be created or written); creates the folders."""
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise OutputPathError(
                f"--output {out} is a folder; pass a file name, such as {out / ('ages' + out.suffix.lower())}"
            )
        writable_folder(out.parent, f"--output {out}", "pass a file in a folder you can write to")
    if args.annotate:
        writable_folder(
            Path(args.annotate),
            f"--annotate {args.annotate}",
            "pass a folder (new or existing) you can write to",
        )


def writable_folder(folder: Path, option: str, advice: str) -> None:
    """Create `folder` if need be, or an `OutputPathError` saying why `option` cannot use it."""
    reason = unwritable_reason(folder)
    if reason is not None:
        raise OutputPathError(f"{option}: {reason}; {advice}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(
            f"{option}: cannot create the folder {folder} ({err.strerror}); {advice}"
        ) from None


class PredictorOptionsError(ValueError):
    """Options that cannot work together; the message says which."""


def predictor_errors() -> tuple[type[BaseException], ...]:
    """What build_predictor reports as a user error (exit 2, no traceback) in every command that uses it:
    the project's user errors and option combinations it refuses."""
    return (*user_errors(), PredictorOptionsError)


def build_predictor(args: argparse.Namespace) -> AgePredictor:
    """The predictor of `add_predictor_arguments`' options (predict, serve). The model is loaded
    before the detector, so a wrong --model fails before any detector download."""
    if args.backend == "onnx" and args.tta:
        raise PredictorOptionsError("--tta needs --backend torch: an ONNX export has no flip averaging")
    device = select_device(args.device) if args.backend == "torch" else torch.device("cpu")
    if args.threads and args.backend == "torch":
        torch.set_num_threads(args.threads)  # ONNX Runtime gets them in its session (load_predictor)
    if args.backend == "torch" and device.type == "cpu" and resolve_precision("auto", device) == "fp32":
        log.info(
            "this CPU has no native bf16, so the model runs in float32: --backend onnx runs it faster on "
            "such CPUs (README, Speed)"
        )
    predictor = load_predictor(
        args.model,
        backend=args.backend,
        device=device,
        batch_size=args.batch_size,
        tta_flip=args.tta,
        threads=args.threads,
    )
    predictor.detector = None if args.no_detect else create_detector(args.detector, args.detector_model)
    return predictor


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the model, backend and face detector (shared by predict and serve)."""
    parser.add_argument(
        "--model",
        default="default",
        help="run folder, its best.safetensors, an .onnx export, or default: the bundled model (default)",
    )
    parser.add_argument("--no-detect", action="store_true", help="treat each whole image as the face")
    add_detector_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="faces per model batch")
    parser.add_argument("--tta", action="store_true", help="average each face with its mirror image")
    add_device_argument(parser)
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="onnx: --model is a file from `age-detect export` (its .json beside it), a run folder holding "
        "age_model.onnx, or default: the bundled model, exported once into the user cache (needs the "
        "export extra); run on ONNX Runtime (float32: faster than torch on CPUs without native bf16)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads the model runs on: ONNX Runtime's, or PyTorch's with --backend torch "
        "(default: all)",
    )


def run(args: argparse.Namespace) -> int:
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        log.error("--output %s must end in .csv or .json", args.output)
        return 2
    if args.resume and not args.output:
        log.error("--resume goes on from an interrupted run's --output; pass the same --output FILE")
        return 2
    if args.every is not None and args.every < 1:
        log.error("--every must be at least 1 (1: every frame), not %d", args.every)
        return 2
    if args.fps is not None and not MIN_FPS <= args.fps <= MAX_FPS:  # also NaN
        log.error(
            "--fps must be from %g (a frame every %g s) to %g frames a second, not %s",
            MIN_FPS,
            1 / MIN_FPS,
            MAX_FPS,
            args.fps,
        )
        return 2
    try:
        check_output_paths(args)
    except OutputPathError as err:
        log.error("%s", err)
        return 2
    try:
        predictor = build_predictor(args)
    except predictor_errors() as err:
        log.error("%s", user_message(err))
        return 2
    paths, problems = expand_inputs(args.paths)
    for problem in problems:
        log.error("%s", problem)
    videos = [p for p in paths if is_video(p)]
    photos = [p for p in paths if not is_video(p)]
    annotated = annotated_names(paths, Path(args.annotate)) if args.annotate else {}
    try:
        journal = (
            PredictionJournal(
                Path(args.output),
                journal_settings(args, predictor.detector.name if predictor.detector else "none"),
                resume=args.resume,
            )
            if args.output
            else None
        )
    except (JournalError, OSError) as err:
        log.error("%s", user_message(err))
        return 2
    done = journal.done if journal else {}
    todo = [p for p in photos if str(p) not in done]
    if len(todo) < len(photos):
        log.info(
            "resuming: %d of %d photos were predicted before (%s)",
            len(photos) - len(todo),
            len(photos),
            journal.path,
        )
    new: dict[str, PhotoResult] = {}
    try:
        for result in predict_photos(predictor, todo, max_file_mb=args.max_file_mb):
            new[str(result.path)] = result
            if result.error:
                log.error("%s", result.error)
                continue
            for face in result.faces:
                x1, y1, x2, y2 = face.box
                print(
                    f"{result.path}\tface {face.face_index}\tbox {x1},{y1},{x2},{y2}\tage {age_label(face)}"
                )
            if args.annotate:
                annotate_to(result, Path(args.annotate), annotated[result.path])
            result.image = None  # drawn: the run keeps only the faces
            if journal:  # last: a photo kept is one whose every output is written
                journal.record(result)
        entries = []
        for entry in predict_videos(predictor, videos, args, annotated):
            entries.append(entry)
            if entry.error:
                log.error("%s", entry.error)
                continue
            for track in entry.result.tracks:
                print(track_line(entry.path, track))
    except KeyboardInterrupt:  # one line, as for any user error: the traceback says nothing to them
        log.error("%s", close_interrupted(journal, len(photos), len(videos)))
        return 130
    results = [new.get(str(p)) or done[str(p)] for p in photos]
    if journal:
        write_output(results, Path(args.output), videos=entries, intervals="lower" in predictor.output_names)
        journal.finish()
    failed = (
        len(problems) + sum(r.error is not None for r in results) + sum(e.error is not None for e in entries)
    )
    if failed:
        log.error("%d of %d input(s) failed", failed, len(paths) + len(problems))
    return 1 if failed else 0


def close_interrupted(journal: PredictionJournal | None, photos: int, videos: int) -> str:
    """Close the journal of a run of `photos` and `videos` stopped by Ctrl-C, and say what it kept and
    how to go on. Videos are never kept (a rerun, --resume too, predicts them from the start). A journal
    that kept no photo is removed: it would only make a plain rerun refuse to start."""
    if journal is None:
        return "interrupted; with --output FILE a run keeps its photos' ages as it goes, for --resume"
    kept = len(journal.done) + journal.recorded
    if not kept:
        journal.finish()
        if not photos:
            return "interrupted; videos are not kept: run the same command to predict them again"
        return "interrupted before any photo was kept: run the same command to start over"
    journal.close()
    return (
        f"interrupted after {kept} of {photos} photos; they are kept in {journal.path}: run the same "
        "command with --resume to go on"
        + (" (it predicts the videos again: they are not kept)" if videos else "")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="image or video files, folders or glob patterns"
    )
    add_predictor_arguments(parser)
    parser.add_argument("--output", help="write the results to FILE.csv (one row per face) or FILE.json")
    parser.add_argument(
        "--annotate",
        help="save each photo (and video, as <stem>_ages.mp4) with boxes and ages into this folder; "
        "inputs sharing a stem get their extension or folders in the name",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on from an interrupted run with the same --output: photos in <output>.partial are not "
        "predicted again (videos are)",
    )
    parser.add_argument("--max-file-mb", type=float, default=MAX_FILE_MB, help="skip larger photos")
    stride = parser.add_mutually_exclusive_group()
    stride.add_argument(
        "--fps",
        type=float,
        help=f"videos: predict this many frames per second of video (default {VIDEO_FPS:g})",
    )
    stride.add_argument("--every", type=int, help="videos: predict every N-th frame instead (1: all)")
    parser.add_argument(
        "--detect-side",
        type=non_negative_int,
        default=VIDEO_DETECT_SIDE,
        help=f"videos: detect faces on the frame scaled to this longer side (default {VIDEO_DETECT_SIDE}; "
        "0: the full frame); smaller is faster but misses small faces",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse limits no photo could meet (usage and message, exit status 2)."""
    if not args.max_file_mb > 0:
        parser.error(f"--max-file-mb must be > 0, not {args.max_file_mb:g}")


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("age-detect predict", __doc__, add_arguments, run, argv, check=check_arguments)


if __name__ == "__main__":
    sys.exit(main())
