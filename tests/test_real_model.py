"""With a really trained model (slow; run after the quick-start pipeline): plausible ages on real photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from age_detect_resnet.faces.detection import create_detector
from age_detect_resnet.inference.predictor import AgePredictor, load_trained_model
from conftest import REPO, TEST_IMAGES, require

pytestmark = pytest.mark.slow

REAL_MODEL = Path(os.environ.get("AGE_DETECT_REAL_MODEL", REPO / "runs" / "utkface-resnet50-regression"))


@pytest.mark.parametrize("name", ["astronaut.png", "obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"])
def test_adults_in_real_photos_get_plausible_ages(name):
    if not (REAL_MODEL / "best.safetensors").is_file():
        pytest.skip(
            f"no trained model at {REAL_MODEL}: run the quick-start pipeline or set AGE_DETECT_REAL_MODEL"
        )
    predictor = AgePredictor(load_trained_model(REAL_MODEL), detector=create_detector("yunet"))
    faces = predictor.predict(require(TEST_IMAGES) / name)
    assert len(faces) == 1
    assert 18 <= faces[0].age <= 90
