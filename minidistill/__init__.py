"""minidistill: distil the reasoning of large models into small ones, in plain PyTorch.

The library's public names: load a model and tokenizer, add LoRA, build batches, compute the
loss, generate, save adapters and merged models, and run the training job. The command-line
modules (`python -m minidistill.train`, `.data`, `.generate`, `.eval`, `.distill`) are thin
layers over these and are not imported here. docs/architecture.md says which file owns what.
"""

from .config import PRESETS, ModelConfig
from .errors import MinidistillError, TrainingInterrupted
from .model import KVCache, Transformer
from .loader import load_model
from .tokenizer import Tokenizer, load_tokenizer
from .samples import DataConfig, SFTData, prepare_data, split_eval
from .batches import Batch, make_batches
from .loss import LossOutput, chunked_cross_entropy, shift_labels
from .kd import KDOutput, chunked_kd_loss, kd_from_topk
from .align import align_conversation
from .vocab_map import build_vocab_map
from .xkd import mapped_kd_loss, uld_loss
from .rope import parse_rope_scaling
from .quant import NF4Linear, NF4State, dequantize_nf4, quantize_nf4
from .new_tokens import add_tokens
from .lora import LoraConfig, LoRALinear, apply_lora, merge_lora
from .adapter import load_adapter, save_adapter
from .export import save_model
from .teacher_cache import TeacherCache, cache_logits
from .replies import generate, generate_batch
from .rollout import RolloutBatch, Rollouts, rollout, rollout_batch  # binds md.rollout to the function
from .onpolicy import OnPolicyOutput, on_policy_kd_loss
from .answers import score_answer
from .train_config import TrainConfig
from .trainer import train

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ModelConfig", "MinidistillError", "TrainingInterrupted", "KVCache", "Transformer", "load_model",
    "Tokenizer", "load_tokenizer", "DataConfig", "SFTData", "prepare_data", "split_eval", "Batch", "make_batches",
    "LossOutput", "chunked_cross_entropy", "shift_labels", "KDOutput", "chunked_kd_loss", "kd_from_topk",
    "NF4Linear", "NF4State", "dequantize_nf4", "quantize_nf4", "add_tokens", "LoraConfig", "LoRALinear",
    "apply_lora", "merge_lora", "load_adapter", "save_adapter", "save_model", "TeacherCache", "cache_logits",
    "generate", "generate_batch", "score_answer", "TrainConfig", "train", "align_conversation", "build_vocab_map",
    "mapped_kd_loss", "uld_loss", "parse_rope_scaling", "RolloutBatch", "Rollouts", "rollout", "rollout_batch",
    "OnPolicyOutput", "on_policy_kd_loss",
]
