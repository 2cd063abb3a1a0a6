"""Tiny random checkpoints in the hub layout, built with transformers as the reference.

Each config below keeps the structural traits of a real target model (fused projections,
partial rotary, LongRoPE lists, llama3 scaling, tied head, GQA, biases, sliding window) at
toy sizes. `write_checkpoint` writes config.json exactly in the hub's own layout (the one
real repos ship: `rope_scaling`, top-level `original_max_position_embeddings`, ...) beside
safetensors weights, and returns the transformers model holding the same weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            hidden_act="silu", torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _longrope(n: int, short_ones: bool) -> dict:
    g = torch.Generator().manual_seed(n)
    short = [1.0] * n if short_ones else (1 + torch.rand(n, generator=g) * 2).tolist()
    long = (1 + torch.rand(n, generator=g) * 40).sort().values.tolist()
    return {"type": "longrope", "short_factor": short, "long_factor": long}


CONFIGS = {
    # Llama 3.1 shape traits: llama3 rope scaling, GQA, untied head.
    "llama3": dict(BASE, model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0,
                   max_position_embeddings=2048, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Llama 3.2-1B / SmolLM2 traits: tied head, explicit head_dim.
    "llama3-tied": dict(BASE, model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0,
                        max_position_embeddings=2048, tie_word_embeddings=True, head_dim=16,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Phi-3.5-mini traits: fused qkv / gate_up, LongRoPE with non-unit short factors, MHA.
    "phi3.5": dict(BASE, model_type="phi3", architectures=["Phi3ForCausalLM"], num_key_value_heads=4,
                   rope_theta=10000.0, max_position_embeddings=1024, original_max_position_embeddings=32,
                   tie_word_embeddings=False, sliding_window=262144, rope_scaling=_longrope(8, short_ones=False)),
    # Phi-4-mini traits: partial rotary 0.75, LongRoPE (unit short factors), tied head, GQA.
    "phi4-mini": dict(BASE, model_type="phi3", architectures=["Phi3ForCausalLM"], rope_theta=10000.0,
                      max_position_embeddings=1024, original_max_position_embeddings=32,
                      partial_rotary_factor=0.75, tie_word_embeddings=True, sliding_window=262144,
                      rope_scaling=_longrope(6, short_ones=True)),
    # phi-4 (14B) traits: phi3 without rope scaling, GQA, untied, theta 250000.
    "phi4": dict(BASE, model_type="phi3", architectures=["Phi3ForCausalLM"], rope_theta=250000.0,
                 max_position_embeddings=256, original_max_position_embeddings=256,
                 tie_word_embeddings=False, sliding_window=None, rope_scaling=None),
    # Phi-3-mini-4k traits: a sliding window shorter than the input.
    "phi3-window": dict(BASE, model_type="phi3", architectures=["Phi3ForCausalLM"], num_key_value_heads=4,
                        rope_theta=10000.0, max_position_embeddings=256, original_max_position_embeddings=256,
                        tie_word_embeddings=False, sliding_window=7, rope_scaling=None),
    # DeepSeek-R1-Distill-Qwen traits: q/k/v biases, untied, sliding window configured but off.
    "qwen2": dict(BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=10000.0,
                  max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
                  sliding_window=16, use_sliding_window=False, max_window_layers=21),
    # Mistral traits: plain rope, sliding window on every layer.
    "mistral": dict(BASE, model_type="mistral", architectures=["MistralForCausalLM"], rope_theta=10000.0,
                    max_position_embeddings=512, tie_word_embeddings=False, sliding_window=9),
}


def reference_model(hub_config: dict, seed: int = 0):
    """A transformers model for this config (fp32, eager attention) with random weights."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**hub_config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise everything
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return model.eval()


def write_checkpoint(folder: Path, name: str, *, seed: int = 0, shard: bool = False,
                     hub_layout: bool = True, **overrides):
    """Write a random checkpoint of CONFIGS[name] to folder; return the transformers model.

    hub_layout=True rewrites config.json exactly as `CONFIGS` has it (the layout of hub repos);
    False keeps what this transformers version writes (the newer `rope_parameters` layout).
    """
    # Deep copies: transformers writes into nested dicts (rope_scaling) of the config it is given.
    hub_config = copy.deepcopy(dict(CONFIGS[name], **overrides))
    model = reference_model(copy.deepcopy(hub_config), seed)
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "5GB", safe_serialization=True)
    if hub_layout:
        (folder / "config.json").write_text(json.dumps(hub_config, indent=2))
    return model


# ---- helpers shared by the model, LoRA, adapter and export tests
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference b."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def ids(n: int = 12, batch: int = 2, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    """(batch, n) token ids, the same for every call with the same arguments."""
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def randomise_lora(module: torch.nn.Module, seed: int = 3) -> None:
    """Non-zero LoRA weights (B starts at zero), so adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def ours(folder):
    """Our model from a checkpoint folder, in fp32."""
    import minidistill as md

    return md.load_model(folder, dtype=torch.float32)


# ---- NF4 inputs shared by the quantizer (test_quant) and kernel (test_nf4) tests
def nf4_weight(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    """A weight of the scale of a real checkpoint's (std 0.02), the same for the same arguments."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def nf4_ties_and_zeros(blocksize: int) -> torch.Tensor:
    """Blocks whose absmax is 1 (so x / absmax is exact) holding every fp32 midpoint between NF4
    codes, the codes themselves, and ±1; then an all-zero block and a sign-only block."""
    from minidistill.quant import NF4_CODE

    code = torch.tensor(NF4_CODE)
    mids = (code[:-1] + code[1:]) / 2
    vals = torch.cat([mids, -mids, code, torch.tensor([1.0, -1.0])])
    vals = torch.nn.functional.pad(vals, (0, -vals.numel() % blocksize)).view(-1, blocksize)
    vals[:, 0] = 1.0  # absmax 1 in every block
    zero = torch.zeros(1, blocksize)
    small = torch.full((1, blocksize), -3e-3)
    return torch.cat([vals, zero, small, vals * 2.0]).reshape(-1)  # *2: power of two, exact


# ---- Qwen3 and the rope variants (issue 18), registered into CONFIGS
def _qwen3_and_rope_configs() -> dict:
    qwen3 = dict(BASE, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=24, rope_theta=1000000.0,
                 max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                 use_sliding_window=False, sliding_window=None, max_window_layers=2, rope_scaling=None)
    llama = dict(BASE, model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=10000.0,
                 max_position_embeddings=32, tie_word_embeddings=False)
    return {
        # Qwen3-0.6B..4B traits: q/k norms, head_dim (24) != hidden / heads (16), tied head, no biases.
        "qwen3": qwen3,
        # Qwen3-8B traits: untied head.
        "qwen3-untied": dict(qwen3, tie_word_embeddings=False),
        # DeepSeek-R1-0528-Qwen3-8B traits: YaRN x4 over the original context, plus its vLLM-only attn_factor.
        "qwen3-yarn": dict(qwen3, tie_word_embeddings=False, max_position_embeddings=128,
                           rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                         "attn_factor": 0.8782488562869419}),
        # A plain-rope llama with each `--rope-scaling` kind (original context 32).
        "llama-linear": dict(llama, max_position_embeddings=128, rope_scaling={"rope_type": "linear", "factor": 4.0}),
        "llama-dynamic": dict(llama, rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
        "llama-yarn": dict(llama, max_position_embeddings=96,
                           rope_scaling={"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 32,
                                         "beta_fast": 16, "beta_slow": 2}),
        "llama-plain": llama,
    }


CONFIGS.update(_qwen3_and_rope_configs())


# ---- a tiny model of a family with that family's tokenizer (recipes, templates): no transformers needed
def write_family_model(folder: Path, name: str, tok_family: str, *, seed: int = 0, **overrides) -> Path:
    """A runnable checkpoint folder: CONFIGS[name]'s shape traits (vocab sized to the tokenizer, its
    special ids) with random weights written by our own model class, plus tok_fixtures' tokenizer
    files of `tok_family` (chat template, generation_config.json). Returns the folder."""
    from safetensors.torch import save_file

    from minidistill.config import ModelConfig
    from minidistill.model import Transformer
    from minidistill.tokenizer import Tokenizer
    from tok_fixtures import write_tokenizer

    folder = Path(folder)
    write_tokenizer(tok_family, folder)  # writes a config.json stub too: replaced below
    tok = Tokenizer.from_dir(folder)
    hub = copy.deepcopy(dict(CONFIGS[name], **overrides))
    hub.update(vocab_size=(len(tok) + 63) // 64 * 64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
               pad_token_id=tok.pad_id)
    (folder / "config.json").write_text(json.dumps(hub, indent=2))
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(hub))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if pname.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_tiny_model(folder, hidden: int = 32, layers: int = 1, seed: int = 0) -> Path:
    """A random Llama-layout checkpoint (our own writer, no transformers) sized for the tokenizer
    already in `folder` (e.g. from tok_fixtures.write_tokenizer): config.json is rewritten with
    the model fields, keeping the stub's special ids. Returns the folder."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from minidistill.config import ModelConfig
    from minidistill.model import Transformer

    folder = Path(folder)
    stub = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    eos = stub.get("eos_token_id")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": (vocab + 7) // 8 * 8,
              "hidden_size": hidden, "intermediate_size": hidden * 2, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "max_position_embeddings": 1024, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "bos_token_id": stub.get("bos_token_id"), "eos_token_id": eos[0] if isinstance(eos, list) else eos,
              "pad_token_id": stub.get("pad_token_id"), "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.3 if p.dim() == 2 and "embed" in name else p.shape[-1] ** -0.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder
