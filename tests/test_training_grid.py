"""The prediction grid at the end of training shows the test photos with the ages the final test gave
them: those of the run's predictions.csv, not a second prediction by another path."""

from __future__ import annotations

import pandas as pd

from age_detect_resnet.inference import predictor
from conftest import train_tiny


def test_the_grid_shows_the_ages_of_predictions_csv(utkface_sample, tmp_path, monkeypatch):
    shown = []
    real = predictor.plot_prediction_grid

    def capture(images, captions, out, **kwargs):
        shown.extend(captions)
        return real(images, captions, out, **kwargs)

    monkeypatch.setattr(predictor, "plot_prediction_grid", capture)
    run = train_tiny(utkface_sample, tmp_path / "run", "--epochs", "1", "--grid-size", "4")
    tested = pd.read_csv(run / "predictions.csv")  # ages to 3 decimals; the grid shows 1
    assert len(shown) == 4
    for caption in shown:
        true, predicted = (float(part.split()[-1]) for part in caption.split(" / "))
        ages = tested.loc[tested["age"] == true, "predicted"]
        assert ((ages - predicted).abs() <= 0.051).any(), (caption, ages.tolist())
