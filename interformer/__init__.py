"""InterFormer (ICCV 2023) split into an offline `encode` and a per-click `interact` step.

    from interformer import load_model, Predictor
    predictor = Predictor(load_model("interformer_light.pth"))
    feats = predictor.encode(image)             # once per image (GPU when available)
    session = predictor.session(feats)
    mask = session.add_click(120, 200).mask     # per click, on CPU
"""
from .checkpoint import CheckpointError, load_model, save_checkpoint
from .clicks import Click
from .config import CONFIGS, ModelConfig, PreprocessConfig, get_config
from .encode_memory import ImageTooLargeError
from .features import ImageFeatures, ImageGeometry
from .predictor import ClickResult, InteractiveSession, InvalidClickError, InvalidMaskError, Predictor, SessionStart
from .preprocess import InvalidImageError

__all__ = [
    "CONFIGS", "CheckpointError", "Click", "ClickResult", "ImageFeatures", "ImageGeometry", "ImageTooLargeError",
    "InteractiveSession", "InvalidClickError", "InvalidImageError", "InvalidMaskError", "ModelConfig", "Predictor",
    "PreprocessConfig", "SessionStart", "get_config", "load_model", "save_checkpoint",
]
