"""Using a trained model: the seed's API, the photo predictor, and the runtime backends.

from age_detect_resnet.inference import load_trained_model, predict_age_for_image
model = load_trained_model("default", "cpu")                 # or a run folder, e.g. runs/NAME
age, image = predict_age_for_image("face.jpg", model, "cpu")
"""

from age_detect_resnet.inference.predictor import (
    AgePredictor,
    FacePrediction,
    load_trained_model,
    predict_age_for_image,
    prediction_grid,
)

__all__ = ["AgePredictor", "FacePrediction", "load_trained_model", "predict_age_for_image", "prediction_grid"]
