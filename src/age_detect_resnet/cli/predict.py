"""Ages of the faces in photos: files, folders and globs, to the terminal, CSV/JSON and annotated images.

    age-detect predict --model runs/NAME photo.jpg holiday/ "scans/*.png"
    age-detect predict --model runs/NAME photos/ --output ages.csv --annotate annotated/
    age-detect predict --model runs/NAME crops/ --no-detect          # each image is already a face

Each face is detected, cropped with the model's training margins and predicted in batches. A file that
cannot be used (missing, not an image, truncated, empty, too large) or has no face is reported by name
and skipped; the exit status is 1 when any file failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from age_detect_resnet.atomic import atomic_path, write_text_atomic
from age_detect_resnet.data.utkface import IMAGE_SUFFIXES
from age_detect_resnet.faces.detection import DetectorUnavailableError, create_detector
from age_detect_resnet.images import ImageReadError, load_rgb
from age_detect_resnet.inference.annotate import age_label, draw_predictions
from age_detect_resnet.inference.predictor import AgePredictor, FacePrediction, load_trained_model
from age_detect_resnet.modeling.checkpoint import ModelFileError
from age_detect_resnet.runtime import DeviceError, select_device

log = logging.getLogger(__name__)

MAX_FILE_MB = 50
# Photos decoded and predicted together: enough faces to fill a batch, little memory.
FILES_PER_CHUNK = 16


@dataclass
class PhotoResult:
    path: Path
    faces: list[FacePrediction] = field(default_factory=list)
    error: str | None = None


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Image files named by `inputs` (files, folders searched recursively, glob patterns), in order,
    without repeats; plus a message for every input that matched nothing."""
    found: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(
                p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
            )
        elif any(ch in item for ch in "*?["):
            # glob.glob, unlike Path.glob, takes absolute patterns such as /data/*/*.jpg
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())  # noqa: PTH207
        else:
            matches = [path]  # missing files are reported when read, by name
        if not matches:
            problems.append(f"{item}: no image files found")
        found.extend(matches)
    return list(dict.fromkeys(found)), problems


def predict_photos(
    predictor: AgePredictor, paths: Sequence[Path], *, max_file_mb: float = MAX_FILE_MB, progress: bool = True
) -> Iterator[PhotoResult]:
    """One result per path, in order; faces of several photos share model batches."""
    bar = tqdm(total=len(paths), desc="predicting", unit="photo", disable=not progress or None)
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
        faces = iter(predictor.predict_images(images))
        for result in results:
            if result.error is None:
                result.faces = next(faces)
                if not result.faces:
                    result.error = f"no face found in {result.path}; pass --no-detect to use the whole image"
            bar.update(1)
            yield result
    bar.close()


def result_rows(results: Sequence[PhotoResult]) -> list[dict]:
    return [{"path": str(r.path), **face.as_dict()} for r in results for face in r.faces]


def write_output(results: Sequence[PhotoResult], out: Path) -> None:
    if out.suffix.lower() == ".json":
        document = [
            {"path": str(r.path), "faces": [f.as_dict() for f in r.faces], "error": r.error} for r in results
        ]
        write_text_atomic(out, json.dumps(document, indent=2) + "\n")
    elif out.suffix.lower() == ".csv":
        columns = ["path", "face_index", "x1", "y1", "x2", "y2", "detector_score", "age"]
        with atomic_path(out) as tmp:
            pd.DataFrame(
                result_rows(results), columns=None if results and any(r.faces for r in results) else columns
            ).to_csv(tmp, index=False)
    else:
        raise ValueError(f"--output {out} must end in .csv or .json")


def annotate_to(result: PhotoResult, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{result.path.stem}_ages.jpg"
    with atomic_path(out) as tmp:
        draw_predictions(load_rgb(result.path), result.faces).save(tmp, format="JPEG", quality=92)
    return out


class PredictorOptionsError(ValueError):
    """Options that cannot work together; the message says which."""


# What build_predictor reports as a user error (exit 2, no traceback) in every command that uses it.
PREDICTOR_ERRORS = (ModelFileError, DetectorUnavailableError, DeviceError, PredictorOptionsError)


def build_predictor(args: argparse.Namespace) -> AgePredictor:
    """The predictor of `add_predictor_arguments`' options (predict, serve). The model is loaded
    before the detector, so a wrong --model fails before any detector download."""
    if args.backend == "onnx":
        if args.tta:
            raise PredictorOptionsError("--tta needs --backend torch: an ONNX export has no flip averaging")
        from age_detect_resnet.export.exporting import load_onnx_predictor  # onnxruntime only when asked for

        predictor = load_onnx_predictor(args.model, batch_size=args.batch_size, threads=args.threads)
    else:
        device = select_device(args.device)
        model = load_trained_model(args.model, device)
        predictor = AgePredictor(model, device=device, batch_size=args.batch_size, tta_flip=args.tta)
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
    parser.add_argument("--detector", choices=("auto", "yunet", "haar"), default="auto")
    parser.add_argument("--detector-model", type=Path, help="YuNet ONNX file (default: downloaded once)")
    parser.add_argument("--batch-size", type=int, default=32, help="faces per model batch")
    parser.add_argument("--tta", action="store_true", help="average each face with its mirror image")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="onnx: --model is a file from `age-detect export` (its .json beside it) or a run folder holding "
        "age_model.onnx, run on ONNX Runtime",
    )
    parser.add_argument("--threads", type=int, help="--backend onnx: ONNX Runtime threads (default: all)")


def run(args: argparse.Namespace) -> int:
    if args.output and Path(args.output).suffix.lower() not in (".csv", ".json"):
        log.error("--output %s must end in .csv or .json", args.output)
        return 2
    try:
        predictor = build_predictor(args)
    except PREDICTOR_ERRORS as err:
        log.error("%s", err)
        return 2
    paths, problems = expand_inputs(args.paths)
    for problem in problems:
        log.error("%s", problem)
    results = []
    for result in predict_photos(predictor, paths, max_file_mb=args.max_file_mb):
        results.append(result)
        if result.error:
            log.error("%s", result.error)
            continue
        for face in result.faces:
            x1, y1, x2, y2 = face.box
            print(f"{result.path}\tface {face.face_index}\tbox {x1},{y1},{x2},{y2}\tage {age_label(face)}")
        if args.annotate:
            annotate_to(result, Path(args.annotate))
    if args.output:
        write_output(results, Path(args.output))
    failed = len(problems) + sum(r.error is not None for r in results)
    if failed:
        log.error("%d of %d input(s) failed", failed, len(paths) + len(problems))
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    add_predictor_arguments(parser)
    parser.add_argument("--output", help="write the results to FILE.csv (one row per face) or FILE.json")
    parser.add_argument("--annotate", help="save each photo with boxes and ages into this folder")
    parser.add_argument("--max-file-mb", type=float, default=MAX_FILE_MB, help="skip larger files")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="age-detect predict", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
