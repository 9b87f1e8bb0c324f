"""Drawing predictions on photos: a box around each face and its age above it."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from age_detect_resnet.inference.predictor import FacePrediction


def age_label(face: FacePrediction) -> str:
    if face.interval is None:
        return f"{face.age:.0f}"
    low, high = face.interval
    return f"{face.age:.0f} ({low:.0f}-{high:.0f})"


def draw_predictions(
    image: Image.Image, faces: Sequence[FacePrediction], *, labels: Sequence[str] | None = None
) -> Image.Image:
    """A copy of `image` with every face boxed and labelled with its age (or with `labels`, one per
    face: a video's track and steady age); line widths and text scale with the photo so labels stay
    legible on large and small images. The label goes above the box, else below it, else (a box as
    tall as the photo: `--no-detect`) inside it at its top: always within the photo."""
    annotated = image.convert("RGB").copy()
    draw = ImageDraw.Draw(annotated)
    scale = max(annotated.size) / 800
    width = max(2, round(3 * scale))
    font = ImageFont.load_default(size=max(12, round(22 * scale)))
    for index, face in enumerate(faces):
        x1, y1, x2, y2 = face.box
        draw.rectangle((x1, y1, x2, y2), outline=(40, 220, 90), width=width)
        text = labels[index] if labels is not None else age_label(face)
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        label_width, label_height = right - left + 2 * width, bottom - top + 2 * width
        if y1 - label_height >= 0:
            y = y1 - label_height
        elif y2 + width + label_height <= annotated.height:
            y = y2 + width
        else:
            y = max(y1, 0) + width
        x = max(0, min(x1, annotated.width - label_width))  # a box at the right edge: label kept in
        draw.rectangle((x, y, x + label_width, y + label_height), fill=(40, 220, 90))
        draw.text((x + width, y + width - (top - y1)), text, fill=(0, 0, 0), font=font)
    return annotated
