"""Purification: map an input back towards the training distribution before classifying it (PixelDefend)."""

from dent.defenses.purification.pixelcnn import DENSITY_MODELS, PixelCNN, bits_per_dim
from dent.defenses.purification.pixeldefend import PixelDefend
from dent.defenses.purification.stored import PURIFIER_DIR, density_model_path, load_density_model, save_density_model

__all__ = ["DENSITY_MODELS", "PURIFIER_DIR", "PixelCNN", "PixelDefend", "bits_per_dim", "density_model_path",
           "load_density_model", "save_density_model"]
