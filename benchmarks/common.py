"""What every benchmark shares: the machine line, the model under test, the seed's reference data path,
real UTKFace inputs, timing, and the Markdown table the results are printed as.

Not a library module: the scripts import it as `common` (they run as `python benchmarks/NAME.py`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from age_detect_resnet.data.dataset import to_input_tensor
from age_detect_resnet.export.verify import evenly_spaced
from age_detect_resnet.images import load_rgb
from age_detect_resnet.modeling import checkpoint
from age_detect_resnet.modeling.model import IMAGENET_MEAN, IMAGENET_STD, AgeModel, create_model
from age_detect_resnet.runtime import cpu_has_bf16, hardware_summary, resolve_precision

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
UTKFACE = SHARED / "data" / "utkface"
TEST_IMAGES = SHARED / "test_images"
YUNET = SHARED / "models" / "face_detection_yunet.onnx"
RESNET50_WEIGHTS = SHARED / "weights" / "resnet50_imagenet_v1_fp16.safetensors"


def machine(device: torch.device, precision: str = "auto") -> str:
    """One line naming the hardware and software, for the results table (`precision`: what the
    benchmark's project paths were asked for)."""
    extra = f", {torch.get_num_threads()} torch threads"
    if device.type == "cpu":
        extra += ", CPU bf16: " + ("yes" if cpu_has_bf16() else "no")
    return f"{hardware_summary(device)}{extra}; project precision {resolve_precision(precision, device)}"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        help="a trained run folder or best.safetensors (default: ResNet-50 with ImageNet weights "
        "from ../shared and a random regression head)",
    )
    parser.add_argument(
        "--weights", type=Path, default=RESNET50_WEIGHTS, help="backbone weights when --model is not given"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="input size (default: the trained model's own, else 224); a trained model run at another "
        "size than it learnt keeps its speed and its paths' agreement, not its MAE",
    )


def benchmark_model(args: argparse.Namespace) -> AgeModel:
    """The model every path of a benchmark runs, in float32 eval mode on the CPU: a trained run, or a
    ResNet-50 whose random head is seeded (speed does not depend on what the head learnt); its
    metadata's image_size is the input size of the benchmark."""
    if args.model is not None:
        model = checkpoint.load_model(args.model, "cpu")
        if args.image_size:  # what the exports and the inputs of every path are made for
            model.metadata = {**model.metadata, "image_size": args.image_size}
        return model
    torch.manual_seed(0)
    weights = args.weights if args.weights and Path(args.weights).is_file() else None
    model = create_model("resnet50", "regression", pretrained=False, weights=weights, init_age=35.0)
    model.metadata = {"image_size": args.image_size or 224}
    return model.eval()


def seed_transform(size: int) -> transforms.Compose:
    """The seed's preprocessing: PIL resize, ToTensor, Normalize -> float32 (3, S, S)."""
    return transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def seed_forward(model: AgeModel, normalised: torch.Tensor) -> torch.Tensor:
    """The seed's model call: normalised float32 NCHW straight into backbone and head -> (B,) ages
    (the same weights and arithmetic as `AgeModel`, without its built-in uint8 normalisation)."""
    return model.head.decode(model.head(model.backbone(normalised)))


def utkface_files(count: int) -> list[Path]:
    """`count` UTKFace crops spread over the sorted file list (ages in their names)."""
    if not UTKFACE.is_dir():
        raise SystemExit(f"{UTKFACE} is absent: the benchmarks read real UTKFace images from ../shared")
    files = sorted(UTKFACE.glob("*.jpg"))
    return evenly_spaced(files, count)


def age_of(path: Path) -> float:
    return float(path.name.split("_")[0])


def seed_batch(files: Sequence[Path], size: int) -> torch.Tensor:
    """(N, 3, S, S) float32 normalised inputs made the seed's way."""
    transform = seed_transform(size)
    return torch.stack([transform(Image.open(path).convert("RGB")) for path in files])


def project_batch(files: Sequence[Path], size: int) -> torch.Tensor:
    """(N, 3, S, S) uint8 inputs made the project's way (the same pixels its cache holds)."""
    return torch.stack([to_input_tensor(load_rgb(path), size) for path in files])


def time_calls(call: Callable[[], object], *, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of `call`, after `warmup` untimed calls (allocation, oneDNN kernel selection)."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[object]], *, machine: str, settings: str
) -> None:
    """A Markdown table whose rows start with the machine and the settings, ready to paste into the README."""
    print(f"\n{title}\n")
    print("| " + " | ".join(["machine", "settings", *header]) + " |")
    print("|" + "|".join("---" for _ in range(len(header) + 2)) + "|")
    for row in rows:
        print("| " + " | ".join(_cell(value) for value in [machine, settings, *row]) + " |")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
