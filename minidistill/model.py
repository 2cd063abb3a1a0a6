"""One decoder for every supported family (Llama, Mistral, Qwen2, Qwen3, Phi-3/Phi-4).

Module names mirror the Hugging Face checkpoint names (`model.layers.3.self_attn.qkv_proj`,
`lm_head`, ...), so a checkpoint loads with a plain `load_state_dict(assign=True)` and a
PEFT adapter's keys map one to one. Families differ by config flags only. RoPE (rope.py) uses
the HF rotate-half layout, which HF checkpoints are stored for: no weight permutation.
Attention itself is `attention.attend`, which picks the kernel from the batch (packed rows,
windows, KV cache); packed rows come with a `DocLayout` built on the host by the collator.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import attention, fused
from .attention import DocLayout
from .config import ModelConfig
from .prepacked import Linear
from .rope import Rotary, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32, cast back, then scale: the order HF uses (matters in bf16). Saves x
        # and 1/rms only (fused.py), not an fp32 copy of x.
        return fused.rms_norm(x, self.weight, self.eps)


class KVCache:
    """Keys and values of past positions, for generation. Passed into the model's forward."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype: torch.dtype,
                 zeroed: bool = True):
        """zeroed=False: slots left uninitialised, for a forward that writes every one (a prefill);
        slots a row may not attend must hold finite values (their zero weights multiply them)."""
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        new = torch.zeros if zeroed else torch.empty
        self.k = [new(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [new(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.pos = 0  # positions already stored
        self.key_mask = None
        # The first slot each row may attend (host ints, what key_mask says), or None: set by the
        # batched decoder, so that a decode step reads each block of rows from its earliest slot.
        self.row_starts: list[int] | None = None

    @property
    def key_mask(self) -> Tensor | None:
        """(B, max_len) bool: the slots each row may attend (ragged batches, left-padded rows);
        None: every stored slot. Set by the batched decoder."""
        return self._key_mask

    @key_mask.setter
    def key_mask(self, mask: Tensor | None) -> None:
        self._key_mask = mask
        self.key_drop = None if mask is None else ~mask  # its complement, made once (decode steps use it)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.pos = 0


def linear_group(x: Tensor, mods, norm: nn.Module | None = None) -> list[Tensor]:
    """Apply linears that share one input, x or norm(x); returns a list of outputs. A hook for
    layers that do better together (LoRA: one A matmul for all of them) through a
    `group_forward(x, mods)`; one whose class sets `group_takes_norm` gets the norm too
    (`group_forward(x, mods, norm=norm)`, LoRA: the norm's output is then never saved)."""
    f = getattr(mods[0], "group_forward", None)
    if norm is not None and not (f is not None and getattr(mods[0], "group_takes_norm", False)):
        x, norm = norm(x), None
    if norm is None and (f is None or len(mods) < 2):
        return [m(x) for m in mods]
    return f(x, mods) if norm is None else f(x, mods, norm=norm)


def swiglu_linear(gate: Tensor, up: Tensor, down: nn.Module, out_needed: bool = True) -> Tensor:
    """down(silu(gate) * up); a LoRA `down` (its `swiglu_forward`) keeps gate and up but not the
    product, plain layers keep gate and up (fused.swiglu) and the product (their input).
    out_needed=False: the caller drops the result (a block's recomputation), so a LoRA `down` skips
    its base matmul (zeros come out)."""
    f = getattr(down, "swiglu_forward", None)
    if f is not None:
        return f(gate, up, out_needed)
    if not torch.is_grad_enabled() and gate.dtype == up.dtype:  # gate is this MLP's own: silu in place
        return down(F.silu(gate, inplace=True).mul_(up))
    return down(fused.swiglu(gate, up))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.layer_window(layer_idx)
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if cfg.fused_qkv:
            self.qkv_proj = Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.attention_bias)
        else:
            self.q_proj = Linear(cfg.hidden_size, q_out, bias=cfg.attention_bias)
            self.k_proj = Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
            self.v_proj = Linear(cfg.hidden_size, kv_out, bias=cfg.attention_bias)
        self.o_proj = Linear(q_out, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's q and k (weights of size head_dim), before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layout: DocLayout | None, cache: KVCache | None,
                norm: nn.Module | None = None, keep: Tensor | None = None) -> Tensor:
        """Attention of x, or of norm(x) when `norm` is given (as MLP.forward: LoRA projections run
        the norm themselves and do not save its output). keep: flat token indices (n,) whose
        output is wanted: o_proj runs on those only, (n, H) comes out (keys are cached for all)."""
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            q, k, v = linear_group(x, (self.qkv_proj,), norm)[0].split((q_out, kv_out, kv_out), dim=-1)  # Q, K, V rows
            if v.requires_grad:  # attention saves v: as a view it would keep the whole qkv output alive
                v = v.contiguous()
        else:
            q, k, v = linear_group(x, (self.q_proj, self.k_proj, self.v_proj), norm)
        q, k = q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv, self.head_dim)  # (B, T, nh|n_kv, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = v.view(B, T, self.n_kv, self.head_dim)  # (B, T, n_kv, hd)
        y = attention.attend(q, k, v, window=self.window, layout=layout, cache=cache, layer=self.layer_idx)
        y = y.reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y if keep is None else y.flatten(0, 1)[keep])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.fused_gate_up:
            self.gate_up_proj = Linear(H, 2 * I, bias=bias)  # gate rows first, then up
        else:
            self.gate_proj = Linear(H, I, bias=bias)
            self.up_proj = Linear(H, I, bias=bias)
        self.down_proj = Linear(I, H, bias=bias)

    def forward(self, x: Tensor, norm: nn.Module | None = None, out_needed: bool = True) -> Tensor:
        """The MLP of x, or of norm(x) when `norm` is given (the block passes its norm so that LoRA
        projections can run it themselves and not save its output). out_needed: see swiglu_linear."""
        if hasattr(self, "gate_up_proj"):
            gate, up = linear_group(x, (self.gate_up_proj,), norm)[0].chunk(2, dim=-1)  # (..., I) each
        else:
            gate, up = linear_group(x, (self.gate_proj, self.up_proj), norm)
        return swiglu_linear(gate, up, self.down_proj, out_needed)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layout: DocLayout | None, cache: KVCache | None,
                recompute_mlp: bool = False, keep: Tensor | None = None) -> Tensor:
        """recompute_mlp: checkpoint the MLP only (attention keeps its activations, so it never runs twice).
        keep: the flat indices of the tokens to go on past attention (Attention.forward): (n, H) out."""
        a = self.self_attn(x, cos, sin, layout, cache, self.input_layernorm, keep=keep)  # each applies its norm
        x = _residual(x if keep is None else x.flatten(0, 1)[keep], a)
        if recompute_mlp:  # (a compiled block takes no context_fn: the skip below is eager-only anyway)
            kw = {} if torch.compiler.is_compiling() else {"context_fn": _checkpoint_contexts}
            return x + checkpoint(self._mlp, x, use_reentrant=False, **kw)
        return _residual(x, self._mlp(x))

    def _mlp(self, x: Tensor) -> Tensor:
        # Recomputed in backward (checkpointing), the MLP's output is dropped: its last matmul, the
        # base of down_proj (a quarter of the block's forward), saves nothing and is skipped. Not in a
        # compiled block: its recomputed graph must save what the forward's graph saved, in order.
        skip = _RECOMPUTING[0] and not torch.compiler.is_compiling()
        return self.mlp(x, self.post_attention_layernorm, out_needed=not skip)


def _residual(x: Tensor, y: Tensor) -> Tensor:
    """x + y; without autograd into y (a sublayer's fresh output), which saves a large allocation
    in a prefill or a teacher's forward."""
    return x + y if torch.is_grad_enabled() or y.dtype != x.dtype else y.add_(x)


_RECOMPUTING = [False]  # True while torch.utils.checkpoint recomputes a block (`_checkpoint_contexts`)


@contextlib.contextmanager
def _recomputing():
    prev, _RECOMPUTING[0] = _RECOMPUTING[0], True
    try:
        yield
    finally:
        _RECOMPUTING[0] = prev


def _checkpoint_contexts():
    """checkpoint's context_fn: nothing for the forward, the `_RECOMPUTING` flag for the recomputation."""
    return contextlib.nullcontext(), _recomputing()


def _mark_dynamic(x: Tensor, cos: Tensor, sin: Tensor, layout: DocLayout | None) -> None:
    """Tell compiled blocks which sizes vary between calls (maybe_: no error where the graph
    needs a size fixed, e.g. one row)."""
    for t in (x, cos, sin):
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 1)
    if layout is not None:
        for t in (layout.cu_seqlens, layout.token_index, layout.doc_index):
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)


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
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.gradient_checkpointing = False  # recompute blocks in backward instead of keeping their activations
        self.checkpoint_every = 1  # ... every block (1), or every k-th one: the others (and the last) keep theirs
        self.checkpoint_part = "block"  # what a checkpointed block recomputes: "block" (all) or "mlp"
        self.compiled_blocks = False  # set by compile_blocks
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the head with the embedding when the checkpoint says so (call after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        """Where the blocks and the head compute (the input embedding may be in host memory)."""
        return self.model.norm.weight.device

    @property
    def host_embedding(self) -> bool:
        """Whether the input embedding is in host memory while the blocks are not (embedding_on_host)."""
        return self.model.embed_tokens.weight.device.type == "cpu" and self.device.type != "cpu"

    def embedding_on_host(self) -> "Transformer":
        """Keep the input embedding in host memory: each batch's rows are looked up there and copied
        to the device (a pinned, non-blocking copy of tokens x hidden values), which frees vocab x
        hidden weights of device memory (1 GB for Llama-3.1-8B in bf16). For a frozen, untied
        embedding only: a tied head computes on the device, trainable rows would train on the host.
        Pass input_ids on the host (`Batch.model_inputs(device, host_ids=True)`); ids on the device
        are read back first, which waits for the device."""
        emb = self.model.embed_tokens
        if self.lm_head.weight is emb.weight:
            raise ValueError("the embedding is tied to the output head, which computes on the device: it cannot "
                             "stay in host memory (only untied models, e.g. Llama-3.1-8B, can)")
        if type(emb) is not nn.Embedding or emb.weight.requires_grad:
            raise ValueError("the embedding has trainable rows (add_tokens, or an unfrozen table): only a frozen "
                             "embedding can stay in host memory")
        self.model.embed_tokens = emb.to("cpu")
        return self

    def _embed(self, input_ids: Tensor) -> Tensor:
        """embed_tokens(input_ids) on the compute device; see embedding_on_host."""
        emb = self.model.embed_tokens
        if not self.host_embedding:
            return emb(input_ids)
        ids = input_ids.to(emb.weight.device).reshape(-1)  # already there when passed on the host
        out = torch.empty((ids.numel(), emb.embedding_dim), dtype=emb.weight.dtype, pin_memory=True)
        torch.index_select(emb.weight, 0, ids, out=out)
        return out.view(*input_ids.shape, -1).to(self.device, non_blocking=True)

    @property
    def head_weight(self) -> Tensor:
        """The (V, H) output projection, for losses that compute the head themselves (with the
        trainable rows of tokens added by `add_tokens` overlaid)."""
        head = self.lm_head
        return head.full_weight() if hasattr(head, "full_weight") else head.weight

    def forward(self, input_ids: Tensor, *, position_ids: Tensor | None = None,
                document_ids: Tensor | None = None, layout: DocLayout | None = None,
                cache: KVCache | None = None, return_hidden: bool = False, keep: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or final hidden states (B, T, H).

        position_ids: (B, T) rotary positions (default: past length + arange(T)).
        layout: where the documents of packed (or padded) rows lie, built on the CPU by the
            collator (`Batch.model_inputs` passes it, with position_ids restarting per document);
            attention stays within a document and padding takes part in none.
        document_ids: (B, T) document of each token (runs of equal ids), an alternative to
            layout; it is read on the host to build one (a host sync for a CUDA tensor).
        cache: a KVCache for generation; it is advanced by T. With a layout (an empty cache: a
            packed prefill) it keeps each token's keys at its column, (B, n_kv, T, hd).
        keep: (n,) indices into the B * T tokens (row-major) whose outputs are wanted, e.g. each
            prompt's last token in a prefill: the last block runs its o_proj and MLP on those only
            (every token's keys are still cached), and (n, vocab) or (n, H) comes out.
        """
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        if (document_ids is not None or layout is not None) and cache is not None and past:
            raise ValueError("document_ids / layout (packed rows) cannot be used with a KV cache that already "
                             "holds keys: pass them to an empty cache only (a packed prefill)")
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
        x = self._embed(input_ids)  # (B, T, H)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        cos, sin = self.rotary(position_ids, x.dtype, seq_len)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if self.compiled_blocks:
            _mark_dynamic(x, cos, sin, layout)
        last = len(self.model.layers) - 1
        for i, block in enumerate(self.model.layers):
            # The last block is never recomputed: backward would rebuild its activations first thing,
            # so keeping them only adds them to what the loss holds (its chunk temporaries) meanwhile.
            ckpt = recompute and i % self.checkpoint_every == 0 and i < last
            kw = {"keep": keep} if keep is not None and i == last else {}
            if ckpt and self.checkpoint_part == "mlp":
                x = block(x, cos, sin, layout, cache, recompute_mlp=True, **kw)
            elif ckpt:
                x = checkpoint(block, x, cos, sin, layout, cache, use_reentrant=False, context_fn=_checkpoint_contexts,
                               **kw)
            elif cache is not None and self.compiled_blocks:  # generation: eager (the cache moves every step)
                x = block._call_impl(x, cos, sin, layout, cache, **kw)  # the module call (hooks), not its compiled code
            else:
                x = block(x, cos, sin, layout, cache, **kw)
        if cache is not None:
            cache.pos += T
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def compile_blocks(self, backend: str = "inductor", dynamic: bool | None = None,
                       mode: str | None = None) -> "Transformer":
        """torch.compile every block in place (`nn.Module.compile`: state-dict keys, LoRA swaps and
        checkpointing are unchanged; the blocks share one compiled graph per distinct window).

        Row length, batch rows and the layout's token counts are marked dynamic on each call (rows
        are padded to a multiple of 64, so a few lengths occur), so a new length or a new packing
        does not recompile; packed attention on the CPU is one opaque op (attention.py).
        Generation (a KV cache) runs the blocks eagerly. `dynamic`, `backend`, `mode`: as
        torch.compile's ("aot_eager" compiles fast, for tests).
        """
        for block in self.model.layers:
            block.compile(backend=backend, dynamic=dynamic, mode=mode)
        self.compiled_blocks = True
        return self

    def new_cache(self, batch_size: int, max_len: int, zeroed: bool = True) -> KVCache:
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, self.device, p.dtype, zeroed)

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():  # parameters() already skips the tied duplicate
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                n += p.numel()
        return n
