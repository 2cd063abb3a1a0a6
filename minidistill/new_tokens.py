"""Trainable rows for tokens added to the vocabulary (`add_tokens`), PEFT's "trainable tokens".

Only the new rows of the embedding (and of an untied head) train, as a small `new_rows`
parameter that replaces those rows in forward; the full tables stay frozen. On disk they are
PEFT's keys (`...embed_tokens.token_adapter.trainable_tokens_delta`) and its
`trainable_token_indices`; `adapter.py` writes and reads them through the helpers at the end,
and `lora.merge_lora` folds them in with `merge_token_rows`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .prepacked import Linear

TOKEN_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key for trainable token rows


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


def has_token_rows(model: nn.Module) -> bool:
    """Whether `add_tokens` (or an adapter with token rows) left trainable rows in the model."""
    return isinstance(model.model.embed_tokens, TokenRowsEmbedding)


def merge_token_rows(model: nn.Module) -> None:
    """Write the trained rows into the full tables and put plain nn.Embedding / nn.Linear back."""
    emb, head = model.model.embed_tokens, model.lm_head
    if not isinstance(emb, TokenRowsEmbedding):
        return
    with torch.no_grad():
        emb.weight[emb.token_ids] = emb.new_rows.to(emb.weight.dtype)
        if head.weight is not emb.weight:
            head.weight[head.token_ids] = head.new_rows.to(head.weight.dtype)
    plain_e = nn.Embedding(*emb.weight.shape, device="meta")
    plain_e.weight = emb.weight
    plain_h = Linear(head.in_features, head.out_features, bias=False, device="meta")
    plain_h.weight = head.weight
    model.model.embed_tokens, model.lm_head = plain_e, plain_h


# ---------------------------------------------------------------- on disk (PEFT's keys; adapter.py)

def token_rows_state(model: nn.Module) -> tuple[dict | None, dict[str, Tensor]]:
    """(trainable_token_indices, {key: rows}) to save; keys without PEFT's `base_model.model.`."""
    emb, head = model.model.embed_tokens, model.lm_head
    if not isinstance(emb, TokenRowsEmbedding):
        return None, {}
    indices = {"embed_tokens": emb.token_ids.tolist()}
    tensors = {f"model.embed_tokens.{TOKEN_KEY}": emb.new_rows.detach().contiguous().cpu()}
    if head.weight is not emb.weight:  # a tied head follows the embedding in PEFT
        indices["lm_head"] = head.token_ids.tolist()
        tensors[f"lm_head.{TOKEN_KEY}"] = head.new_rows.detach().contiguous().cpu()
    return indices, tensors


def load_token_rows(model: nn.Module, indices, tensors: dict[str, Tensor],
                    take: Callable[[str, tuple[int, ...]], Tensor], folder: Path) -> None:
    """PEFT's trainable_token_indices: a list (the embedding) or {"embed_tokens": [...], "lm_head": [...]}.

    `take(key, shape)` pops a checked tensor from the adapter's `tensors`."""
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
