"""One decoder for every supported family (Llama, Mistral, Qwen2, Phi-3/Phi-4).

Module names mirror the Hugging Face checkpoint names (`model.layers.3.self_attn.qkv_proj`,
`lm_head`, ...), so a checkpoint loads with a plain `load_state_dict(assign=True)` and a
PEFT adapter's keys map one to one. Families differ by config flags only. RoPE uses the
HF rotate-half layout, which HF checkpoints are stored for: no weight permutation.
Attention itself is `attention.attend`, which picks the kernel from the batch (packed rows,
windows, KV cache); packed rows come with a `DocLayout` built on the host by the collator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import attention
from .attention import DocLayout
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, cast back, then scale: the order HF uses (matters in bf16).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables for default, llama3-scaled and Phi-3 LongRoPE rotary embeddings.

    The inverse frequencies are derived from the config on first use per device (they are
    never stored in checkpoints, and the model is built on the meta device).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self._inv_freq: dict[tuple[str, bool], Tensor] = {}

    def inv_freq(self, device: torch.device, long: bool) -> Tensor:
        key = (str(device), long)
        if key not in self._inv_freq:
            self._inv_freq[key] = _inv_freq(self.cfg, long).to(device)
        return self._inv_freq[key]

    def forward(self, positions: Tensor, dtype: torch.dtype, seq_len: int | Tensor) -> tuple[Tensor, Tensor]:
        """positions (B, T) -> cos, sin (B, T, rotary_dim) in `dtype`.

        seq_len: the length of the sequence each token belongs to, an int for the whole batch or
        a tensor broadcastable to (B, T). LongRoPE takes the long factors for a token whose
        sequence is longer than the original context. In packed rows that is each document's own
        length, the choice it gets when run alone (at inference), made per token with
        torch.where and no host sync; transformers instead decides once from the largest
        position in the batch, so a short document packed beside a long one gets the long
        factors there (tests/test_model.py shows the difference).
        """
        cfg = self.cfg
        pos = positions.float()[..., None]  # (B, T, 1)
        if cfg.rope_type != "longrope":
            freqs = pos * self.inv_freq(positions.device, False)  # (B, T, rotary_dim/2)
        elif isinstance(seq_len, int):
            freqs = pos * self.inv_freq(positions.device, seq_len > cfg.original_max_position_embeddings)
        else:
            long = (seq_len > cfg.original_max_position_embeddings)[..., None]  # (B, T, 1) or (B, 1, 1)
            freqs = torch.where(long, pos * self.inv_freq(positions.device, True),
                                pos * self.inv_freq(positions.device, False))
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rotary_dim)
        return (emb.cos() * cfg.attention_factor).to(dtype), (emb.sin() * cfg.attention_factor).to(dtype)


def _inv_freq(cfg: ModelConfig, long: bool) -> Tensor:
    d = cfg.rotary_dim
    exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d  # denominator is rotary_dim
    if cfg.rope_type == "longrope":
        ext = torch.tensor(cfg.long_factor if long else cfg.short_factor, dtype=torch.float32)
        return 1.0 / (ext * cfg.rope_theta**exponent)
    inv = 1.0 / (cfg.rope_theta**exponent)
    if cfg.rope_type == "llama3":
        old_len = cfg.original_max_position_embeddings
        low_wl, high_wl = old_len / cfg.low_freq_factor, old_len / cfg.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / cfg.rope_factor, inv)
        smooth = (old_len / wl - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wl >= high_wl) & (wl <= low_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, nh, hd); cos/sin (B, T, rd). Rotates dims [0, rd), passes the rest through."""
    rd = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, rd)
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


class KVCache:
    """Keys and values of past positions, for generation. Passed into the model's forward."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype: torch.dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.pos = 0  # positions already stored
        # (B, max_len) bool: the slots each row may attend (ragged batches, left-padded rows);
        # None: every stored slot. Set by the batched decoder.
        self.key_mask: Tensor | None = None

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.pos = 0


def linear_group(x: Tensor, mods) -> list[Tensor]:
    """Apply linears that share one input x; returns a list of outputs. A hook for layers that do
    better together (LoRA: one A matmul for all of them) through a `group_forward(x, mods)`."""
    f = getattr(mods[0], "group_forward", None)
    return f(x, mods) if f is not None and len(mods) > 1 else [m(x) for m in mods]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.layer_window(layer_idx)
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.attention_bias)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=cfg.attention_bias)
            self.k_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
            self.v_proj = nn.Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=cfg.o_proj_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layout: DocLayout | None, cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            q, k, v = self.qkv_proj(x).split((q_out, kv_out, kv_out), dim=-1)  # Q rows, then K, then V
        else:
            q, k, v = linear_group(x, (self.q_proj, self.k_proj, self.v_proj))
        q = apply_rotary(q.view(B, T, self.n_heads, self.head_dim), cos, sin)  # (B, T, nh, hd)
        k = apply_rotary(k.view(B, T, self.n_kv, self.head_dim), cos, sin)  # (B, T, n_kv, hd)
        v = v.view(B, T, self.n_kv, self.head_dim)  # (B, T, n_kv, hd)
        y = attention.attend(q, k, v, window=self.window, layout=layout, cache=cache, layer=self.layer_idx)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.fused_gate_up:
            self.gate_up_proj = nn.Linear(H, 2 * I, bias=bias)  # gate rows first, then up
        else:
            self.gate_proj = nn.Linear(H, I, bias=bias)
            self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = linear_group(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layout: DocLayout | None, cache: KVCache | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` part of the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.gradient_checkpointing = False  # recompute blocks in backward instead of keeping their activations
        self.checkpoint_every = 1  # ... every block (1), or every k-th one: the others keep theirs
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the head with the embedding when the checkpoint says so (call after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def head_weight(self) -> Tensor:
        """The (V, H) output projection, for losses that compute the head themselves (with the
        trainable rows of tokens added by `add_tokens` overlaid)."""
        head = self.lm_head
        return head.full_weight() if hasattr(head, "full_weight") else head.weight

    def forward(self, input_ids: Tensor, *, position_ids: Tensor | None = None,
                document_ids: Tensor | None = None, layout: DocLayout | None = None,
                cache: KVCache | None = None, return_hidden: bool = False) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or final hidden states (B, T, H).

        position_ids: (B, T) rotary positions (default: past length + arange(T)).
        layout: where the documents of packed (or padded) rows lie, built on the CPU by the
            collator (`Batch.model_inputs` passes it, with position_ids restarting per document);
            attention stays within a document and padding takes part in none.
        document_ids: (B, T) document of each token (runs of equal ids), an alternative to
            layout; it is read on the host to build one (a host sync for a CUDA tensor).
        cache: a KVCache for generation; it is advanced by T.
        """
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        if (document_ids is not None or layout is not None) and cache is not None:
            raise ValueError("document_ids / layout (packed rows) are for training; they cannot be used with a KV cache")
        if layout is None and document_ids is not None:
            layout = attention.layout_from_document_ids(document_ids)
        seq_len: int | Tensor = past + T
        if layout is not None:
            if layout.shape != (B, T) or position_ids is None:
                raise ValueError(f"a layout of shape {layout.shape} needs input_ids of that shape (got {(B, T)}) "
                                 "and position_ids restarting per document (Batch.model_inputs gives both)")
            seq_len = layout.doc_len  # (B, T) per document
        elif position_ids is not None:
            seq_len = position_ids.amax(-1, keepdim=True) + 1  # (B, 1): each row one sequence
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary(position_ids, x.dtype, seq_len)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.model.layers):
            if recompute and i % self.checkpoint_every == 0:
                x = checkpoint(block, x, cos, sin, layout, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, layout, cache)
        if cache is not None:
            cache.pos += T
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():  # parameters() already skips the tied duplicate
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                n += p.numel()
        return n
