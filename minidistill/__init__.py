"""minidistill: distil the reasoning of large models into small ones, in plain PyTorch."""

from .config import PRESETS, ModelConfig

__version__ = "0.1.0"
from .model import KVCache, Transformer
from .checkpoint import load_model
from .loss import LossOutput, chunked_cross_entropy, shift_labels
