"""Model-free inference machinery: the predictor contract, slice-wise 2D inference, the prompt session
for promptable 3D models, and the folder evaluator. Models plug in through :mod:`segreport.models`."""

from .predictor import LesionAttributes, Prediction, Predictor

__all__ = ["LesionAttributes", "Prediction", "Predictor"]
