"""minidistill: distil the reasoning of large models into small ones, in plain PyTorch.

The public names of DESIGN.md: load a model and tokenizer, add LoRA, build batches, compute
the loss, generate, save adapters and merged models.
"""

import warnings

# `python -m minidistill.generate` (and .data / .eval / .distill) runs a module that this package
# has already imported for its public functions; runpy warns about that. The module's top level
# only defines functions, so running it again as __main__ is harmless: silence that one warning.
warnings.filterwarnings("ignore", message=r".*'minidistill\.\w+' found in sys\.modules", category=RuntimeWarning)

from .config import PRESETS, ModelConfig  # noqa: E402
from .model import KVCache, Transformer  # noqa: E402
from .loader import load_model  # noqa: E402
from .tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from .data import DataConfig, SFTData, prepare_data, split_eval  # noqa: E402
from .batches import Batch, make_batches  # noqa: E402
from .loss import LossOutput, chunked_cross_entropy, shift_labels  # noqa: E402
from .kd import KDOutput, chunked_kd_loss, kd_from_topk  # noqa: E402
from .lora import LoraConfig, LoRALinear, add_tokens, apply_lora, load_adapter, merge_lora, save_adapter  # noqa: E402
from .export import save_model  # noqa: E402
from .quant import NF4Linear, NF4State, dequantize_nf4, quantize_nf4  # noqa: E402
# The function `generate` shadows its module `minidistill.generate` as a package attribute; the
# module stays reachable as sys.modules["minidistill.generate"] (importlib.import_module).
from .generate import generate, generate_batch  # noqa: E402
from .eval import score_answer  # noqa: E402

__version__ = "0.1.0"
