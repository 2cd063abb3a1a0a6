"""Generation with the KV cache: one sampler, and one decoder for one prompt or many.

Ragged batches: prompts are prefilled in chunks of up to 2,048 tokens, packed into one row (each
prompt a document of a `DocLayout`: attention stays within it, and no pad is computed), and
their keys are copied into a shared left-padded decode cache, row r in slots [start_r, pos);
every row writes its next key at the shared slot `pos`, `KVCache.key_mask` (B, slots) keeps
each row to its own slots and each row has its own position ids, so a row sees what it would
see decoded alone.
Finished rows (a stop id, a stop string, `max_new_tokens`) leave and waiting prompts take
their place: `batch_size` sequences decode together whatever their lengths, with one host
sync per step (reading the sampled ids). Where packed attention would be FlexAttention (CUDA in
fp32: compiled, and built anew for each set of lengths) prompts of similar lengths are prefilled
together right padded instead (a pad comes after its row's tokens, so causal attention keeps it
out of them).

LongRoPE: rows decode in two groups, short factors and long factors (each forward then has one
rule, whether the model picks the factors per row or from the largest position). A row that
outgrows the original context leaves the short group, is prefilled again over its whole
sequence on the long factors (what generating it alone does) and joins the long group.

Sampling: argmax at temperature 0, else the token where one uniform falls in the cumulative
distribution of softmax(logits / temperature), cut to the top_p nucleus. Prompt i draws its
uniforms from `torch.Generator().manual_seed(seed + i)` (or `seed[i]` for a list of seeds), so
its tokens depend neither on the batch size nor on the other prompts:
`generate_ids(prompts[i], seed=seed + i)` samples the same ones.

4-bit (NF4) models decode each layer once per call, keeping up to `decode_budget_mb` of decoded
weights, the rest per step (quant.DecodedWeights has the rule and the default); on the CPU fp32
weights are packed for MKL's sgemm (same budget) for a batch that decodes long enough to repay it,
serving it as it shrinks (prepacked.py; a batch-32 decode step 1.15x faster); greedy steps of an
fp32 model on a CPU with AMX take their ids from a bf16 screen of the head, exactly the fp32
argmax (next_token.py; the head 18.5 -> about 7.5 ms a step at batch 32); all freed at the end.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .attention import choose_kernel, doc_layout
from .model import KVCache, Transformer
from .next_token import GreedyScreen, sample_next
from .prepacked import PackedWeights
from .progress import Progress
from .quant import DecodedWeights


@dataclass
class Completion:
    """One finished generation: the prompt's index in the call, its new token ids (a stop id is
    not included), why it ended ("stop": a stop id or string; "length": max_new_tokens reached),
    for chat replies the text (cut before a stop string), and the stop id that ended it (None
    when none did: a stop string, or the length)."""

    index: int
    ids: list[int]
    reason: str
    text: str | None = None
    stop_id: int | None = None


@dataclass
class _Settings:
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_ids: frozenset
    stop_strings: tuple
    decode: Callable[[list[int]], str] | None
    on_token: Callable[[int, int], None] | None
    original_context: int | None  # LongRoPE's original_max_position_embeddings, else None
    screen: GreedyScreen | None = None  # greedy ids from a bf16 screen of the head (next_token.py)


@dataclass
class _Row:
    index: int
    prompt: list[int]
    noise: Tensor | None  # (max_new_tokens,) this prompt's uniforms; None when greedy
    long: bool  # decoded with LongRoPE's long factors
    out: list[int]
    stop_id: int | None = None  # the stop id that ended it


def _push(row: _Row, tok: int, s: _Settings) -> str | None:
    """Add a sampled token to a row; returns why the row ends ("stop", "length") or None."""
    if tok in s.stop_ids:
        row.stop_id = tok
        return "stop"
    row.out.append(tok)
    if s.on_token is not None:
        s.on_token(row.index, tok)
    if s.stop_strings:
        # A stop string of L characters spans at most 4L byte-level tokens: decode only that tail.
        tail = s.decode(row.out[-(4 * max(map(len, s.stop_strings)) + 4):])
        if any(x in tail for x in s.stop_strings):
            return "stop"
    return "length" if len(row.out) >= s.max_new_tokens else None


def _crosses(row: _Row, s: _Settings) -> bool:
    """The row's sequence just outgrew LongRoPE's original context on the short factors."""
    return s.original_context is not None and not row.long and len(row.prompt) + len(row.out) > s.original_context


def _fed(row: _Row) -> int:
    """Tokens of the row already in (or about to go into) the cache: all but its last one."""
    return len(row.prompt) + len(row.out) - 1


def _packed_prefill(model: Transformer) -> bool:
    """Prefill packed (one row, a document per prompt) unless packed attention would be FlexAttention."""
    w, cfg = model.model.embed_tokens.weight, model.config
    return choose_kernel(w.device, w.dtype, cfg.head_dim, log_choice=False) != "flex"


def _chunks(rows: list[_Row], packed: bool, budget: int = 2048) -> list[list[_Row]]:
    """Rows to prefill together: one LongRoPE group each, longest first, at most `budget` tokens
    (or one row); padded (not `packed`), at most `budget` padded tokens and a quarter of padding."""
    out: list[list[_Row]] = []
    for row in sorted(rows, key=lambda r: (r.long, -len(r.prompt) - len(r.out))):
        n, chunk = len(row.prompt) + len(row.out), out[-1] if out else None
        if chunk and chunk[0].long == row.long:
            used = sum(len(r.prompt) + len(r.out) for r in chunk) + n
            if packed:
                fits = used <= budget
            else:  # every row as wide as the chunk's first (longest) one
                padded = (len(chunk) + 1) * (len(chunk[0].prompt) + len(chunk[0].out))
                fits = padded <= min(budget, 1.25 * used)
            if fits:
                chunk.append(row)
                continue
        out.append([row])
    return out


def _prefill(model: Transformer, rows: list[_Row], s: _Settings,
             packed: bool) -> tuple[KVCache, list[tuple[int, int]], list[str | None]]:
    """Prefill the rows' whole sequences together and sample each one's next token; returns the
    cache, where each row's keys start in it (cache row, slot) and why each row ends (or None).

    Packed: one cache row, row j's keys in the slots of its tokens. Padded: row j's keys in cache
    row j from slot 0, right padding (a pad comes after its row's tokens, so causal attention keeps
    it out of them). Either way a row's largest position is its own (LongRoPE's rule)."""
    device = model.device
    seqs = [r.prompt + r.out for r in rows]
    lengths = [len(q) for q in seqs]
    if packed:
        n = sum(lengths)
        ids = torch.tensor([[t for q in seqs for t in q]], device=device)  # (1, n)
        pos = torch.tensor([[i for q in seqs for i in range(len(q))]], device=device)
        cache = model.new_cache(1, n, zeroed=False)  # the prefill writes every slot
        starts = [sum(lengths[:j]) for j in range(len(rows))]
        where = [(0, a) for a in starts]
        last = torch.tensor([a + m - 1 for a, m in zip(starts, lengths)], device=device)
        hidden = model(ids, position_ids=pos, layout=doc_layout([lengths], n).to(device), cache=cache,
                       return_hidden=True, keep=last)  # (k, H)
    else:
        # From 16 up, a multiple of 16: SDPA's CPU flash kernel runs a ragged last block up to 2x slower
        # (16 rows of 94 tokens: 4.0 ms in bf16, of 96: 2.0 ms); pads after every row's tokens change nothing.
        width = max(lengths)
        width = width if width < 16 else -(-width // 16) * 16
        ids = torch.tensor([q + [0] * (width - len(q)) for q in seqs], device=device)  # (k, width)
        pos = torch.tensor([list(range(len(q))) + [0] * (width - len(q)) for q in seqs], device=device)
        cache = model.new_cache(len(rows), width, zeroed=False)  # pads' keys too
        where = [(j, 0) for j in range(len(rows))]
        last = torch.tensor([j * width + m - 1 for j, m in enumerate(lengths)], device=device)
        hidden = model(ids, position_ids=pos, cache=cache, return_hidden=True, keep=last)  # (k, H)
    u = None if rows[0].noise is None else torch.stack([r.noise[len(r.out)] for r in rows]).to(device)
    toks = _next_ids(model, hidden, s, u).tolist()  # the head on the last positions only
    return cache, where, [_push(r, t, s) for r, t in zip(rows, toks)]


class _Group:
    """Rows decoded by one forward. Cache row r holds its keys in slots [starts[r], cache.pos);
    rows[r] is None once that row has finished (it is refilled or dropped later)."""

    def __init__(self, model: Transformer, s: _Settings, long: bool):
        self.model, self.s, self.long = model, s, long
        self.device = model.device
        self.rows: list[_Row | None] = []
        self.starts: list[int] = []
        self.cache: KVCache | None = None
        self.tokens = self._zeros(0)  # (B,) next input id of each row
        self.positions = self._zeros(0)  # (B,) its position within the row
        self.steps = self._zeros(0)  # (B,) tokens generated: index of the next uniform
        self.alive = self._zeros(0)  # (B,) 1 for a live row: finished rows stay at position 0
        self.noise = None if s.temperature <= 0 else torch.zeros(0, s.max_new_tokens, device=self.device)

    def _zeros(self, n: int) -> Tensor:
        return torch.zeros(n, dtype=torch.long, device=self.device)

    @property
    def live(self) -> int:  # rows still generating
        return sum(r is not None for r in self.rows)

    def _remaining(self, row: _Row) -> int:
        return self.s.max_new_tokens - len(row.out)  # inputs still to feed = cache slots still needed

    def steps_left(self, refilled: bool) -> int:
        """Most steps it may decode at this size: max_new_tokens if refilled (prompts wait), else its longest row's."""
        return self.s.max_new_tokens if refilled else max(self._remaining(r) for r in self.rows if r is not None)

    def rebuild(self, extra: int = 0, left: int = 0, right: int = 0, slack: int = 0) -> None:
        """The live rows (their live slots only), `extra` empty rows, at least `left` slots before
        the write position and `right` + slack after it, in new buffers; finished rows are dropped.
        Only dropping rows (nothing asked for): the live rows move up within the same buffers. Rows
        are sorted by first slot: a decode step reads the cache in blocks of rows (attention._row_blocks)."""
        keep = sorted((i for i, r in enumerate(self.rows) if r is not None), key=lambda i: self.starts[i])
        old, pos = self.cache, self.cache.pos if self.cache is not None else 0
        lo = min((self.starts[i] for i in keep), default=pos)
        at = torch.tensor(keep, dtype=torch.long, device=self.device)
        if old is not None and not (extra or left or right or slack):
            for buf in (old.k, old.v):
                for layer in range(len(buf)):  # the gather is a copy: rows may move in any order
                    buf[layer][:len(keep), :, lo:pos] = buf[layer][at, :, lo:pos]
                    buf[layer] = buf[layer][:len(keep)]  # slots below a row's start stay masked, those past pos 0
            cache, shift = old, 0
        else:
            hist = pos - lo  # slots of the oldest live row
            n_left = max(hist, left)
            n_right = max([right] + [self._remaining(self.rows[i]) for i in keep]) + slack
            cache = self.model.new_cache(len(keep) + extra, n_left + n_right)
            cache.pos, shift = n_left, n_left - pos
            for layer in range(len(cache.k) if keep else 0):
                cache.k[layer][:len(keep), :, n_left - hist:n_left] = old.k[layer][at, :, lo:pos]
                cache.v[layer][:len(keep), :, n_left - hist:n_left] = old.v[layer][at, :, lo:pos]
        self.tokens, self.positions, self.steps, self.alive = (
            torch.cat([t[at], self._zeros(extra)]) for t in (self.tokens, self.positions, self.steps, self.alive))
        if self.noise is not None:
            self.noise = torch.cat([self.noise[at], self.noise.new_zeros(extra, self.noise.shape[1])])
        # Empty rows start at slot 0: a row with no key at all would turn its attention into NaN.
        self.starts = [self.starts[i] + shift for i in keep] + [0] * extra
        self.rows = [self.rows[i] for i in keep] + [None] * extra
        self.cache = cache
        self._set_mask()

    def add(self, new: list[tuple[_Row, KVCache, tuple[int, int]]], slack: int) -> None:
        """Rows join the group with their keys: those of a prefill cache from (cache row, slot) on."""
        free = [i for i, r in enumerate(self.rows) if r is None]
        left, right = max(_fed(r) for r, _, _ in new), max(self._remaining(r) for r, _, _ in new)
        c = self.cache
        if c is None or len(free) < len(new) or c.pos < left or c.pos + right > c.max_len:
            self.rebuild(len(new), left, right, slack)
            free = [i for i, r in enumerate(self.rows) if r is None]
        idx, pos = free[:len(new)], self.cache.pos
        moves: dict[int, tuple[KVCache, list[list[int]]]] = {}  # per prefill cache: rows, slots to; from
        for i, (row, pc, (j, a)) in zip(idx, new):
            n = _fed(row)
            for to, part in zip(moves.setdefault(id(pc), (pc, [[], [], [], []]))[1],
                                ([i] * n, range(pos - n, pos), [j] * n, range(a, a + n))):
                to.extend(part)
            self.rows[i], self.starts[i] = row, pos - n
        for pc, lists in moves.values():  # one gather and one scatter a layer (not one copy a row)
            rt, st, rf, sf = (torch.tensor(x, dtype=torch.long, device=self.device) for x in lists)
            for layer in range(len(pc.k)):
                self.cache.k[layer][rt, :, st] = pc.k[layer][rf, :, sf]  # (tokens, n_kv, hd)
                self.cache.v[layer][rt, :, st] = pc.v[layer][rf, :, sf]
        at = torch.tensor(idx, dtype=torch.long, device=self.device)
        self.tokens[at] = torch.tensor([r.out[-1] for r, _, _ in new], device=self.device)
        self.positions[at] = torch.tensor([_fed(r) for r, _, _ in new], device=self.device)
        self.steps[at] = torch.tensor([len(r.out) for r, _, _ in new], device=self.device)
        self.alive[at] = 1
        if self.noise is not None:
            self.noise[at] = torch.stack([r.noise for r, _, _ in new]).to(self.device)
        self._set_mask()

    def drop(self, i: int) -> None:
        self.rows[i] = None
        self.positions[i], self.alive[i] = 0, 0  # so a finished row never moves LongRoPE's switch

    def _set_mask(self) -> None:
        if not any(s for s, r in zip(self.starts, self.rows) if r is not None):
            self.cache.key_mask, self.cache.row_starts = None, None  # no padding: SDPA without a mask
            return
        starts = torch.tensor(self.starts, device=self.device)
        slots = torch.arange(self.cache.max_len, device=self.device)
        self.cache.key_mask = slots[None, :] >= starts[:, None]  # (B, slots)
        self.cache.row_starts = list(self.starts)

    def step(self) -> list[int]:
        """One token for every row; returns the sampled ids (the step's one host sync)."""
        hidden = self.model(self.tokens[:, None], position_ids=self.positions[:, None], cache=self.cache,
                            return_hidden=True)[:, -1]  # (B, H)
        u = None
        if self.noise is not None:
            u = self.noise.gather(1, self.steps.clamp(max=self.noise.shape[1] - 1)[:, None]).squeeze(1)  # (B,)
        nxt = _next_ids(self.model, hidden, self.s, u)  # (B,)
        self.tokens, self.positions, self.steps = nxt, self.positions + self.alive, self.steps + 1
        return nxt.tolist()


def _next_ids(model: Transformer, hidden: Tensor, s: _Settings, u: Tensor | None) -> Tensor:
    """(B, H) final hidden states -> (B,) next ids: the greedy screen's where it answers, else the head's logits sampled."""
    ids = s.screen.argmax(hidden) if s.screen is not None else None
    return ids if ids is not None else sample_next(model.lm_head(hidden), s.temperature, s.top_p, u)


def _noise(n: int, count: int, seed: int | Sequence[int] | None, temperature: float) -> list[Tensor | None]:
    """The uniforms of each prompt (see the module docstring for the seed rule)."""
    if temperature <= 0:
        return [None] * n
    if seed is None:
        return [torch.rand(count) for _ in range(n)]
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts; give one seed per prompt, or one int")
    return [torch.rand(count, generator=torch.Generator().manual_seed(int(s))) for s in seeds]


@torch.no_grad()
def iter_generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
                  stop_strings: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
                  seed: int | Sequence[int] | None = None, batch_size: int = 16,
                  on_token: Callable[[int, int], None] | None = None,
                  progress: Progress | None = None,
                  decode_budget_mb: float | None = None) -> Iterator[Completion]:
    """Generate for token-id prompts, `batch_size` rows decoding together; yields a `Completion`
    per prompt as each finishes (in any order). stop_strings end a row once the decoded text of
    its new tokens holds one (`decode` turns ids into text); on_token(index, id) sees every new
    token. See the module docstring for batching, LongRoPE, seeds and 4-bit models."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; generate needs at least one prompt token")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need `decode` (token ids -> text), e.g. tok.decode")
    if max_new_tokens < 1:
        yield from (Completion(i, [], "length") for i in range(len(prompts)))
        return
    cfg = model.config
    s = _Settings(max_new_tokens, temperature, top_p, frozenset(stop_ids), tuple(x for x in stop_strings if x),
                  decode, on_token,
                  cfg.original_max_position_embeddings if cfg.rope_type == "longrope" else None,
                  GreedyScreen.for_model(model, temperature, decode_budget_mb))
    noise = _noise(len(prompts), max_new_tokens, seed, temperature)
    # Longest prompts first: later ones then fit the left padding that is already there.
    waiting = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    groups: list[_Group] = []
    pending: list[_Row] = []  # rows to prefill: new prompts, and rows past LongRoPE's original context
    live = 0  # rows pending or in groups
    tick = progress.update if progress is not None else (lambda done=0, tokens=0: None)
    packed = _packed_prefill(model)
    weights, packs = DecodedWeights(decode_budget_mb), PackedWeights(decode_budget_mb)

    def finish(row: _Row, reason: str) -> Completion:
        nonlocal live
        live -= 1
        tick(done=1)
        return Completion(row.index, row.out, reason, stop_id=row.stop_id)

    def advance() -> list[Completion]:
        """Take waiting prompts in, prefill, one decode step; returns the rows that finished."""
        nonlocal pending, groups, live
        done: list[Completion] = []
        while waiting and live < batch_size:
            i = waiting.popleft()
            live += 1
            pending.append(_Row(i, list(prompts[i]), noise[i], s.original_context is not None
                                and len(prompts[i]) > s.original_context, []))
        joining: dict[bool, list[tuple[_Row, KVCache, tuple[int, int]]]] = {}  # by LongRoPE factors
        todo, pending = pending, []
        for chunk in _chunks(todo, packed):
            cache, where, reasons = _prefill(model, chunk, s, packed)
            tick(tokens=len(chunk))
            for row, at, reason in zip(chunk, where, reasons):
                if reason is not None:
                    done.append(finish(row, reason))
                elif _crosses(row, s):  # its first token took it past the original context
                    row.long = True
                    pending.append(row)
                else:
                    joining.setdefault(row.long, []).append((row, cache, at))
        for long, new in joining.items():
            group = next((g for g in groups if g.long == long), None)
            if group is None:
                group = _Group(model, s, long)
                groups.append(group)
            group.add(new, slack=max_new_tokens if waiting else 0)  # room for prompts still to come
        for g in groups:
            if 4 * (len(g.rows) - g.live) >= len(g.rows):  # finished rows nobody took: leave the batch
                g.rebuild()
        big = max(groups, key=lambda g: len(g.rows), default=None)  # one packing: for the largest group
        if big is not None:
            steps = big.steps_left(bool(waiting))
            if packs.worth(len(big.rows), steps):
                packs.rows = len(big.rows)
            if s.screen is not None:
                s.screen.prepare(len(big.rows), steps)
        for g in groups:
            ids = g.step()
            tick(tokens=g.live)
            for i, tok in enumerate(ids):
                row = g.rows[i]
                if row is None:
                    continue
                reason = _push(row, tok, s)
                if reason is None and not _crosses(row, s):
                    continue
                g.drop(i)
                if reason is not None:
                    done.append(finish(row, reason))
                else:  # past LongRoPE's original context: prefill it again, on the long factors
                    row.long = True
                    pending.append(row)
        groups = [g for g in groups if g.live]
        return done

    try:
        while waiting or pending or groups:
            with weights, packs:  # active during a step only: code run between two yields never sees them
                done = advance()
            yield from done
    finally:
        weights.close()
        packs.close()
        if s.screen is not None:
            s.screen.close()


def generate_ids(model: Transformer, prompt_ids: Sequence[int], *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
                 seed: int | None = None, on_token: Callable[[int], None] | None = None,
                 stop_strings: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None) -> list[int]:
    """Generate up to max_new_tokens after prompt_ids; the stop token is not returned."""
    (done,) = iter_generate(model, [prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, stop_ids=stop_ids, stop_strings=stop_strings, decode=decode,
                            seed=None if seed is None else [seed], batch_size=1,
                            on_token=None if on_token is None else (lambda _, t: on_token(t)))
    return done.ids


def generate_ids_batch(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                       temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
                       seed: int | Sequence[int] | None = None, batch_size: int = 16,
                       stop_strings: Sequence[str] = (),
                       decode: Callable[[list[int]], str] | None = None) -> list[list[int]]:
    """`generate_ids` for many prompts, `batch_size` decoding together whatever their lengths;
    results in prompt order. Greedy output equals `generate_ids` prompt by prompt."""
    done = iter_generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         stop_ids=stop_ids, stop_strings=stop_strings, decode=decode, seed=seed, batch_size=batch_size)
    return [c.ids for c in sorted(done, key=lambda c: c.index)]
