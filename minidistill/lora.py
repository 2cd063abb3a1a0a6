"""LoRA as a module swap, adapters in PEFT's file layout, and trainable rows for new tokens.

`apply_lora` replaces target `nn.Linear`s in the blocks by `LoRALinear`, which keeps the frozen
base under the same state-dict keys (`...q_proj.weight`) and adds `lora_A` / `lora_B` like PEFT
(`...q_proj.lora_A.weight`). Adapters are written and read in PEFT's layout
(`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<path>.lora_A.weight`).

QLoRA: an `NF4Linear` target becomes `NF4LoRALinear`, the same layer over the 4-bit base (its
packed keys unchanged); `merge_lora` decodes such layers and leaves 16-bit `nn.Linear`s.

Fused Phi-3 models (`qkv_proj`, `gate_up_proj`): the names q/k/v_proj map to `qkv_proj` and
gate/up_proj to `gate_up_proj`, so the default targets work on every family. A split q/k/v
adapter loaded into a fused model is fused exactly: A's concatenated along the rank, B
block-diagonal (rank r_q + r_k + r_v), recorded in `rank_pattern` when saved again.

New tokens (`add_tokens`): only the new rows of the embedding (and of an untied head) train, as
a small `new_rows` parameter that replaces those rows in forward (PEFT's trainable tokens,
saved under its keys and `trainable_token_indices`).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .cli import flag_field
from .quant import NF4Linear, NF4State, dense_linear, dequantize_nf4, nf4_linear, nf4_state_of, register_nf4_weight

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
TOKEN_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key for trainable token rows


@dataclass
class LoraConfig:
    """r, alpha (scale alpha/r, or alpha/sqrt(r) with rsLoRA), dropout on the LoRA input, targets.

    targets: last module-name components (`q_proj`, ...), or "all-linear" for every linear in the
    blocks. On fused Phi-3 models q/k/v_proj mean `qkv_proj` and gate/up_proj mean `gate_up_proj`.
    """

    r: int = flag_field(16, "LoRA rank", flag="--lora-r")
    alpha: float = flag_field(16.0, "LoRA alpha (scale = alpha / r)", flag="--lora-alpha")
    dropout: float = flag_field(0.0, "dropout on the LoRA input", flag="--lora-dropout")
    targets: tuple[str, ...] | str = flag_field(DEFAULT_TARGETS, "comma-separated module names, or all-linear",
                                                flag="--lora-targets")
    use_rslora: bool = flag_field(False, "rank-stabilised LoRA: scale = alpha / sqrt(r)", flag="--use-rslora")

    def scaling(self, r: int | None = None, alpha: float | None = None) -> float:
        r, alpha = r or self.r, self.alpha if alpha is None else alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


class LoRALinear(nn.Module):
    """y = base(x) + lora_B(lora_A(dropout(x))) * scaling; the base is frozen.

    The base computation lives in `base_forward` / `base_weight` only, so a quantized base
    (NF4) can subclass and override those two.
    """

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # same keys as the nn.Linear replaced
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # LoRA weights stay fp32 whatever the base dtype: bf16 would round away small updates
        # (and AdamW's state follows the parameter dtype).
        self._init_adapter(r, scaling, dropout, base.weight.device, torch.float32)

    def _init_adapter(self, r: int, scaling: float, dropout: float, device: torch.device, dtype: torch.dtype) -> None:
        kw = dict(device=device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)  # kaiming_uniform(a=√5), PEFT's init
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapter starts as the identity
        self.r, self.scaling = r, scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def delta_weight(self) -> Tensor:
        """B @ A * scaling in fp32, (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self) -> None:
        """Fold the update into the base weight (fp32 sum, cast back). Idempotent."""
        if self.merged:
            return
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_forward(x)
        if self.merged:
            return y
        a = self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))
        return y + (self.lora_B(a) * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


class NF4LoRALinear(LoRALinear):
    """QLoRA: LoRALinear over a frozen NF4 base (an `NF4Linear`'s buffers, same state-dict keys).

    The base is decoded per call (Triton on CUDA, torch elsewhere) and backward decodes it again
    for the input gradient: no 16-bit copy is kept and no weight gradient exists. The LoRA
    weights are fp32 whatever the compute dtype, so small updates are not lost to bf16 rounding.
    """

    def __init__(self, base: NF4Linear, r: int, scaling: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        register_nf4_weight(self, base.weight, base.state)  # shares the tensors, no copy
        self.register_parameter("bias", base.bias)  # frozen by NF4Linear
        self._init_adapter(r, scaling, dropout, base.weight.device, torch.float32)

    @property
    def state(self) -> NF4State:
        return nf4_state_of(self)

    def base_forward(self, x: Tensor) -> Tensor:
        return nf4_linear(x, self.weight, self.state, self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The base weight [out, in] decoded to `dtype` (default: the original weight's)."""
        return dequantize_nf4(self.weight, self.state, dtype)

    def merge(self) -> None:
        raise TypeError("a 4-bit base cannot hold a merged weight; call md.merge_lora(model), which "
                        "replaces this layer by a 16-bit nn.Linear (or use merged_linear(dtype))")

    def merged_linear(self, dtype: torch.dtype) -> nn.Linear:
        """A dense nn.Linear in `dtype` holding dequant(W) + B @ A * scaling, summed in fp32."""
        with torch.no_grad():
            return dense_linear(self.dequantize(torch.float32) + self.delta_weight(), self.bias, dtype)


# ---------------------------------------------------------------- trainable rows for new tokens

class TokenRowsEmbedding(nn.Module):
    """An embedding whose rows `token_ids` come from the trainable `new_rows`; the rest is frozen."""

    def __init__(self, emb: nn.Embedding, token_ids: list[int], new_rows: nn.Parameter):
        super().__init__()
        self.weight = emb.weight  # same key as nn.Embedding; stays shared with a tied head
        self.num_embeddings, self.embedding_dim = self.weight.shape
        self.new_rows = new_rows
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long, device=self.weight.device), persistent=False)
        slot = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=self.weight.device)
        slot[self.token_ids] = torch.arange(len(token_ids), device=self.weight.device)
        self.register_buffer("slot", slot, persistent=False)  # token id -> row of new_rows, or -1

    def full_weight(self) -> Tensor:
        return self.weight.index_copy(0, self.token_ids, self.new_rows.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        out = F.embedding(x, self.weight)  # (B, T, H)
        slot = self.slot[x]  # (B, T)
        new = self.new_rows[slot.clamp(min=0)].to(out.dtype)  # (B, T, H); cheaper than copying the table
        return torch.where((slot >= 0)[..., None], new, out)


class TokenRowsHead(nn.Module):
    """An output head whose rows `token_ids` come from the trainable `new_rows`."""

    def __init__(self, head: nn.Linear, token_ids: list[int], new_rows: nn.Parameter):
        super().__init__()
        self.weight = head.weight
        self.out_features, self.in_features = self.weight.shape
        self.new_rows = new_rows
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long, device=self.weight.device), persistent=False)

    def full_weight(self) -> Tensor:
        """The (V, H) head with the new rows in place, for losses that compute the head themselves."""
        return self.weight.index_copy(0, self.token_ids, self.new_rows.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        logits = F.linear(x, self.weight)  # (B, T, V)
        return logits.index_copy(-1, self.token_ids, F.linear(x, self.new_rows.to(x.dtype)))


def _set_token_rows(model: nn.Module, ids: list[int], embed_rows: Tensor, head_rows: Tensor | None) -> None:
    """Make rows `ids` trainable (values given), extending rows made trainable before."""
    emb, head = model.model.embed_tokens, model.lm_head
    tied = head.weight is emb.weight
    if isinstance(emb, TokenRowsEmbedding):  # a second add_tokens: extend
        ids = emb.token_ids.tolist() + ids
        embed_rows = torch.cat([emb.new_rows.detach(), embed_rows])
        if not tied:
            head_rows = torch.cat([head.new_rows.detach(), head_rows])
    new_e = nn.Parameter(embed_rows.to(emb.weight.dtype).clone())
    model.model.embed_tokens = TokenRowsEmbedding(emb, ids, new_e)
    new_h = new_e if tied else nn.Parameter(head_rows.to(head.weight.dtype).clone())
    model.lm_head = TokenRowsHead(head, ids, new_h)


def _resize_rows(model: nn.Module, n: int, mean_of: int) -> None:
    """Grow embed_tokens (and an untied head) to n rows, new rows = mean of the first `mean_of`."""
    emb, head = model.model.embed_tokens, model.lm_head
    tied = head.weight is emb.weight

    def grown(w: Tensor) -> nn.Parameter:
        extra = w[:mean_of].float().mean(0, keepdim=True).expand(n - w.shape[0], -1).to(w.dtype)
        return nn.Parameter(torch.cat([w.detach(), extra]), requires_grad=False)

    emb.weight = grown(emb.weight)
    emb.num_embeddings = n
    head.weight = emb.weight if tied else grown(head.weight)
    head.out_features = n
    model.config.vocab_size = n
    model.config.raw["vocab_size"] = n


def add_tokens(model: nn.Module, tok, tokens: list[str]) -> list[str]:
    """Add the tokens the tokenizer lacks; give them embedding (and untied head) rows that train.

    Rows start at the mean of the existing tokens' rows. A checkpoint already padded past the
    tokenizer (Phi-4-mini: 200064 rows) reuses its spare rows. Returns the tokens added.
    """
    old_len = len(tok)
    added = tok.add_tokens(list(tokens))
    if not added:
        return []
    ids = [tok.token_to_id(t) for t in added]
    rows = model.model.embed_tokens.weight.shape[0]
    if len(tok) > rows:
        _resize_rows(model, len(tok), mean_of=min(old_len, rows))
    emb_w, head_w = model.model.embed_tokens.weight, model.lm_head.weight
    n_old = min(old_len, rows)
    mean_e = emb_w[:n_old].float().mean(0)
    mean_h = head_w[:n_old].float().mean(0)
    with torch.no_grad():  # base rows too, so a merge of untouched rows equals the initial value
        emb_w[ids] = mean_e.to(emb_w.dtype)
        head_w[ids] = mean_h.to(head_w.dtype)
    tied = head_w is emb_w
    _set_token_rows(model, ids, mean_e.expand(len(ids), -1), None if tied else mean_h.expand(len(ids), -1))
    return added


# ---------------------------------------------------------------- applying LoRA

def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers inside the blocks (`model.layers.*`), the ones that can take LoRA."""
    return {n: m for n, m in model.named_modules()
            if n.startswith("model.layers.") and isinstance(m, (nn.Linear, LoRALinear, NF4Linear))}


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)  # PEFT's rule for a list of targets


def _map_fused(targets: list[str], names: set[str]) -> list[str]:
    """q/k/v_proj -> qkv_proj and gate/up_proj -> gate_up_proj on a fused model."""
    out = []
    for t in targets:
        fused = next((f for f, parts in FUSED.items() if t in parts and f in names and t not in names), None)
        out.append(fused or t)
    return list(dict.fromkeys(out))


def _resolve_targets(model: nn.Module, targets) -> list[str]:
    """Module paths selected by `targets` (names, "all-linear", or a PEFT regex string)."""
    linears = _linears(model)
    names = {p.rsplit(".", 1)[-1] for p in linears}
    if targets == "all-linear" or (not isinstance(targets, str) and "all-linear" in targets):
        return list(linears)
    if isinstance(targets, str):  # PEFT: a string is a regex over the whole module path
        paths = [p for p in linears if re.fullmatch(targets, p)]
        if not paths:
            raise ValueError(f"target regex {targets!r} matches no module; modules that can take LoRA: {sorted(names)}")
        return paths
    targets = _map_fused(list(targets), names)
    for t in targets:
        if not any(_matches(p, t) for p in linears):
            raise ValueError(f"target {t!r} not found in this {model.config.model_type} model; "
                             f"modules that can take LoRA: {sorted(names)} (or 'all-linear')")
    return [p for p in linears if any(_matches(p, t) for t in targets)]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def _freeze_all_but_adapters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 2)[-2] in ("lora_A", "lora_B") or name.endswith("new_rows"))


def _print_trainable(model: nn.Module) -> None:
    params = {id(p): p for p in model.parameters()}.values()
    # 4-bit weights are buffers: count their elements too, as PEFT counts bnb's Params4bit.
    total = sum(p.numel() for p in params) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, (NF4Linear, NF4LoRALinear)))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def _wrap(model: nn.Module, paths: list[str], cfg: LoraConfig, ranks: dict[str, tuple[int, float]] | None = None) -> None:
    for path in paths:
        base = model.get_submodule(path)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already has LoRA; load or apply adapters on a fresh model "
                             "(or call merge_lora first)")
        r, scaling = (ranks or {}).get(path, (cfg.r, cfg.scaling()))
        cls = NF4LoRALinear if isinstance(base, NF4Linear) else LoRALinear
        _set_module(model, path, cls(base, r, scaling, cfg.dropout))


def apply_lora(model: nn.Module, cfg: LoraConfig, *, verbose: bool = True) -> nn.Module:
    """Swap the target linears of the blocks for LoRALinear and freeze everything else.

    An NF4Linear target (a model loaded with quantize="nf4") becomes NF4LoRALinear (QLoRA, fp32
    LoRA weights); NF4 linears not targeted stay NF4Linear. Only the LoRA weights (and new-token
    rows from `add_tokens`) require grad afterwards. Prints the trainable parameter count (verbose); returns the model.
    """
    paths = _resolve_targets(model, cfg.targets)
    _wrap(model, paths, cfg)
    model.lora_config = cfg
    _freeze_all_but_adapters(model)
    if verbose:
        _print_trainable(model)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update (and new-token rows) into the base weights; plain modules again.

    A 4-bit base is decoded, merged in fp32 and becomes a 16-bit nn.Linear in the model's compute
    dtype (the embedding's); NF4 linears without LoRA are decoded too, so the model is dense.
    Idempotent. Afterwards the state dict has exactly the keys of an HF checkpoint.
    """
    dtype = model.model.embed_tokens.weight.dtype
    dequantized = False
    for path, m in lora_layers(model).items():
        if isinstance(m, NF4LoRALinear):
            _set_module(model, path, m.merged_linear(dtype))
            dequantized = True
            continue
        m.merge()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias
        _set_module(model, path, lin)
    for path, m in [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]:
        _set_module(model, path, m.to_linear(dtype))
        dequantized = True
    if dequantized and "quantization_config" in model.config.raw:
        # A pre-quantized source: the export is dense now, and readers must not expect 4-bit.
        model.config.raw.pop("quantization_config")
    emb, head = model.model.embed_tokens, model.lm_head
    if isinstance(emb, TokenRowsEmbedding):
        with torch.no_grad():
            emb.weight[emb.token_ids] = emb.new_rows.to(emb.weight.dtype)
            if head.weight is not emb.weight:
                head.weight[head.token_ids] = head.new_rows.to(head.weight.dtype)
        plain_e = nn.Embedding(*emb.weight.shape, device="meta")
        plain_e.weight = emb.weight
        plain_h = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
        plain_h.weight = head.weight
        model.model.embed_tokens, model.lm_head = plain_e, plain_h
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ---------------------------------------------------------------- adapters on disk (PEFT layout)

def _pattern_key(patterns: dict, path: str) -> str | None:
    """PEFT's rank_pattern / alpha_pattern matching: the key is a suffix regex of the path."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", path)), None)


def _split_sizes(model: nn.Module, fused: str) -> list[int]:
    c = model.config
    if fused == "qkv_proj":
        return [c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2
    return [c.intermediate_size] * 2


def save_adapter(model: nn.Module, path: str | Path, *, split_fused: bool = False) -> None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout.

    split_fused=True writes fused Phi-3 qkv_proj / gate_up_proj LoRAs as q/k/v_proj and
    gate/up_proj ones (same A for each, B sliced by rows: exact), for servers that want those.
    """
    cfg: LoraConfig | None = getattr(model, "lora_config", None)
    layers = lora_layers(model)
    if cfg is None or not layers:
        raise ValueError("model has no LoRA layers: call apply_lora or load_adapter first")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for p, m in layers.items():
        name = p.rsplit(".", 1)[-1]
        A, B = m.lora_A.weight.detach(), m.lora_B.weight.detach()
        if split_fused and name in FUSED:
            parts = [(p[: -len(name)] + part, b) for part, b in zip(FUSED[name], B.split(_split_sizes(model, name)))]
        else:
            parts = [(p, B)]
        for q, b in parts:
            tensors[f"{PREFIX}{q}.lora_A.weight"] = A.cpu().clone()  # split parts share A: own copies
            tensors[f"{PREFIX}{q}.lora_B.weight"] = b.cpu().clone()
            ranks[q] = (m.r, m.scaling)
    # Modules whose rank or scale differ from the config's (a split adapter fused back) are
    # described per path in rank_pattern / alpha_pattern, so PEFT builds them identically.
    rank_pattern, alpha_pattern = {}, {}
    for q, (r, s) in ranks.items():
        if r != cfg.r or not math.isclose(s, cfg.scaling(), rel_tol=1e-9):
            rank_pattern[q] = r
            alpha_pattern[q] = s * (math.sqrt(r) if cfg.use_rslora else r)
    emb, head = model.model.embed_tokens, model.lm_head
    token_indices = None
    if isinstance(emb, TokenRowsEmbedding):
        token_indices = {"embed_tokens": emb.token_ids.tolist()}
        tensors[f"{PREFIX}model.embed_tokens.{TOKEN_KEY}"] = emb.new_rows.detach().contiguous().cpu()
        if head.weight is not emb.weight:  # a tied head follows the embedding in PEFT
            token_indices["lm_head"] = head.token_ids.tolist()
            tensors[f"{PREFIX}lm_head.{TOKEN_KEY}"] = head.new_rows.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "target_modules": sorted({q.rsplit(".", 1)[-1] for q in ranks}),
        "use_rslora": cfg.use_rslora, "lora_dropout": cfg.dropout, "bias": "none",
        "base_model_name_or_path": getattr(model, "source", "") or "",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_dora": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
        "trainable_token_indices": token_indices, "revision": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None,
                "layers_to_transform": None, "layer_replication": None, "target_parameters": None,
                "exclude_modules": None}


def _read_adapter(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        found = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else "folder missing"
        raise FileNotFoundError(f"{folder} needs {CONFIG_FILE} and {WEIGHTS_FILE} (found: {found}); "
                                "minidistill reads safetensors adapters only, never .bin pickles")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type {config['peft_type']!r} is not supported; valid: LORA")
    for key, ok in _UNSUPPORTED.items():
        if config.get(key, ok) not in (ok, [], {}):
            raise ValueError(f"{folder}: {key}={config[key]!r} is not supported (only {ok!r})")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{folder}: bias={config['bias']!r} is not supported (only 'none')")
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        tensors = {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys()}
    return config, tensors


def load_adapter(model: nn.Module, path: str | Path, *, verbose: bool = True) -> nn.Module:
    """Apply a LoRA adapter saved by `save_adapter` or by PEFT (safetensors) to a fresh model.

    A split q/k/v (gate/up) adapter is fused exactly into a fused Phi-3 model: rank r_q+r_k+r_v.
    Fails on shape mismatches, targets missing from the model and unused weights; warns when
    `base_model_name_or_path` differs from the model's source. LoRA weights stay trainable.
    """
    folder = Path(path)
    config, tensors = _read_adapter(folder)
    targets = config["target_modules"]
    cfg = LoraConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                     targets=targets if isinstance(targets, str) else tuple(targets),
                     use_rslora=config.get("use_rslora", False))
    base_name, source = config.get("base_model_name_or_path") or "", getattr(model, "source", "") or ""
    if base_name and source and base_name != source:
        warnings.warn(f"adapter {folder} was trained on {base_name!r}; this model was loaded from {source!r}")
    if lora_layers(model):
        raise ValueError(f"model already has LoRA layers; load {folder} into a freshly loaded model")
    rank_p, alpha_p = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def rank_scale(p: str) -> tuple[int, float]:
        rk, ak = _pattern_key(rank_p, p), _pattern_key(alpha_p, p)
        r = rank_p[rk] if rk else cfg.r
        return r, cfg.scaling(r, alpha_p[ak] if ak else cfg.alpha)

    def take(key: str, shape: tuple[int, ...]) -> Tensor:
        if key not in tensors:
            raise ValueError(f"{folder}: no weight {PREFIX}{key} for a targeted module")
        t = tensors.pop(key)
        if tuple(t.shape) != shape:
            raise ValueError(f"{folder}: {PREFIX}{key} has shape {tuple(t.shape)}, this model needs {shape} "
                             f"(rank or model size differs)")
        return t

    paths = _resolve_targets(model, cfg.targets)
    plan: dict[str, tuple[int, float, Tensor, Tensor]] = {}
    for p in paths:
        lin = model.get_submodule(p)
        name = p.rsplit(".", 1)[-1]
        split = [p[: -len(name)] + part for part in FUSED.get(name, ())]
        if f"{p}.lora_A.weight" in tensors or not any(f"{q}.lora_A.weight" in tensors for q in split):
            r, s = rank_scale(p)
            A = take(f"{p}.lora_A.weight", (r, lin.in_features))
            plan[p] = (r, s, A, take(f"{p}.lora_B.weight", (lin.out_features, r)))
            continue
        # Split adapter, fused model: sum_i s_i B_i A_i = s_0 * blockdiag(B_i s_i/s_0) @ [A_0; A_1; ...],
        # exact with rank r_q + r_k + r_v. A part missing from the adapter gets zero rows of B.
        parts, s0 = [], None
        for q, rows in zip(split, _split_sizes(model, name)):
            if f"{q}.lora_A.weight" not in tensors:
                parts.append((rows, None, None))
                continue
            r, s = rank_scale(q)
            s0 = s if s0 is None else s0
            A = take(f"{q}.lora_A.weight", (r, lin.in_features)).float()
            parts.append((rows, A, take(f"{q}.lora_B.weight", (rows, r)).float() * (s / s0)))
        A = torch.cat([a for _, a, _ in parts if a is not None])  # (sum r_i, in)
        B = torch.zeros(lin.out_features, A.shape[0])  # (out, sum r_i), block-diagonal
        row = col = 0
        for rows, a, b in parts:
            if a is not None:
                B[row:row + rows, col:col + a.shape[0]] = b
                col += a.shape[0]
            row += rows
        plan[p] = (A.shape[0], s0, A, B)

    _wrap(model, list(plan), cfg, {p: (r, s) for p, (r, s, _, _) in plan.items()})
    with torch.no_grad():
        for p, (_, _, A, B) in plan.items():
            m = model.get_submodule(p)
            m.lora_A.weight.copy_(A)
            m.lora_B.weight.copy_(B)
    _load_token_rows(model, config.get("trainable_token_indices"), tensors, take, folder)
    if tensors:
        raise ValueError(f"{folder}: weights not used by this model: {sorted(PREFIX + k for k in tensors)[:10]} "
                         f"(target_modules {config['target_modules']!r})")
    model.lora_config = cfg
    _freeze_all_but_adapters(model)
    if verbose:
        _print_trainable(model)
    return model


def _load_token_rows(model: nn.Module, indices, tensors: dict, take, folder: Path) -> None:
    """PEFT's trainable_token_indices: a list (the embedding) or {"embed_tokens": [...], "lm_head": [...]}."""
    if not indices:
        return
    if isinstance(indices, list):
        indices = {"embed_tokens": indices}
    if set(indices) - {"embed_tokens", "lm_head"} or "embed_tokens" not in indices:
        raise ValueError(f"{folder}: trainable_token_indices {sorted(indices)} not supported; "
                         "valid modules: embed_tokens (and lm_head with the same ids)")
    ids = list(indices["embed_tokens"])
    if indices.get("lm_head", ids) != ids:
        raise ValueError(f"{folder}: lm_head token ids {indices['lm_head']} differ from embed_tokens ids {ids}")
    rows = model.model.embed_tokens.weight.shape[0]
    if max(ids) >= rows:  # the base checkpoint predates the new tokens: grow it
        _resize_rows(model, max(ids) + 1, mean_of=rows)
    H = model.config.hidden_size
    emb_rows = take(f"model.embed_tokens.{TOKEN_KEY}", (len(ids), H))
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    head_rows = None
    if not tied:
        key = f"lm_head.{TOKEN_KEY}"
        head_rows = take(key, (len(ids), H)) if key in tensors else model.lm_head.weight[ids].detach()
    _set_token_rows(model, ids, emb_rows, head_rows)
