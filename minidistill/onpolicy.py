"""On-policy distillation: the student samples completions (rollout.py), a frozen teacher
scores every sampled token, and the student is trained on its own tokens with the per-token
reverse KL, KL(p_student || q_teacher) at each completion position (Agarwal et al. 2024, GKD;
Gu et al. 2024, MiniLLM; Thinking Machines' "on-policy distillation", 2025).

Two estimators of the per-token loss, both through the chunked head (chunked.py), at the KD
temperature T (per-token loss times T**2, as in kd.py):
  full     the exact reverse KL over the whole vocabulary, sum_v p_v (log p_v - log q_v), with
           its exact gradient (the same maths as kd.chunked_kd_loss(kind="reverse")).
  sampled  the one-sample estimate at the sampled token y: k = log p(y) - log q(y). Its
           gradient is the REINFORCE form with advantage -k treated as a constant:
           d/dz [k.detach() * log p(y)] = k (onehot(y) - p), an unbiased estimate of the gradient
           of the reverse KL when y was sampled from p itself (rollout temperature 1, top_p 1).
Either way the step also reports the exact reverse KL and the mean log-probs of the sampled
tokens under student and teacher.

The trainer's side is `OnPolicy` (teacher, prompts, this step's micro-batches) plus the
metric helpers; `train_step` stays one host read per step: rollout counts are known on the
host, the sums ride in the step's one transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .chunked import (DEFAULT_CHUNK_BUDGET_MB, chunked_head, compute_dtype, labelled_positions, loss_denominator,
                      resolve_chunk_size, rows_at)
from .kd import _divergence_
from .loss import IGNORE_INDEX
from .rollout import RolloutBatch, rollout, rollout_batch
from .samples import DataSummary, Sample, SFTData

ESTIMATORS = ("full", "sampled")
_BUFFERS = 3  # chunk x V fp32 buffers at the peak: student and teacher log-probs, one product


@dataclass
class OnPolicyOutput:
    """loss: scalar to backward (sum of per-token loss * T**2 / num_items). num_tokens: labelled
    positions here. loss_sum: the unnormalised sum, detached. stats (3,) fp32, detached: sums over
    the positions of the exact reverse KL (at T, without T**2), log p_student(y), log q_teacher(y)."""

    loss: Tensor
    num_tokens: int
    loss_sum: Tensor
    stats: Tensor

    @property
    def reverse_kl_sum(self) -> Tensor:
        return self.stats[0]

    @property
    def student_logprob_sum(self) -> Tensor:
        return self.stats[1]

    @property
    def teacher_logprob_sum(self) -> Tensor:
        return self.stats[2]


def on_policy_kd_loss(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
                      labels: Tensor, *, estimator: str = "full", temperature: float = 1.0,
                      num_items: int | float | Tensor | None = None, positions: Tensor | None = None,
                      chunk_size: int | None = None,
                      chunk_budget_mb: float = DEFAULT_CHUNK_BUDGET_MB) -> OnPolicyOutput:
    """Per-token reverse KL of student from teacher on the labelled positions, where labels are
    the student's own sampled tokens (next-token targets; -100 elsewhere, as `rollout_batch`
    builds them). estimator: "full" or "sampled" (module docstring). Shapes, num_items,
    positions and the chunking as in `kd.chunked_kd_loss`; both heads' vocabularies are cut to
    the shared range. Gradients reach student_hidden (and a trainable student_head) only."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    T = float(temperature)
    pos = labelled_positions(student_hidden, labels, positions, IGNORE_INDEX, "student_hidden")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} must equal "
                         f"student_hidden's {tuple(student_hidden.shape[:-1])}: both models read the same tokens")
    for what, h, w in (("student", student_hidden, student_head), ("teacher", teacher_hidden, teacher_head)):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(f"{what} head must be (vocab, {h.shape[-1]}), got {tuple(w.shape)}")
    V = min(student_head.shape[0], teacher_head.shape[0])
    y = labels.reshape(-1).index_select(0, pos.to(labels.device)).to(student_hidden.device)  # (N,) sampled ids
    if positions is None and y.numel() and (int(y.max()) >= V or int(y.min()) < 0):  # a host sync, as in kd.py
        raise ValueError(f"sampled token {int(y.max())} lies outside the vocabulary range [0, {V}) shared by "
                         "student and teacher; the two models must share a tokenizer")
    chunk = resolve_chunk_size(chunk_size, chunk_budget_mb, V, student_hidden.shape[-1], student_head.dtype, _BUFFERS)
    h = rows_at(student_hidden, pos)  # (N, Hs)
    th = rows_at(teacher_hidden.detach(), pos)  # (N, Ht)
    tw = teacher_head.detach()[:V]
    tw = tw.to(compute_dtype(th.device, tw))  # (V, Ht)
    stats = torch.zeros(3, dtype=torch.float32, device=h.device)

    def chunk_fn(s: int, e: int, logits: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        t = (th[s:e].to(tw.dtype) @ tw.t()).float()  # (c, V), 2nd buffer
        if T != 1.0:
            logits.div_(T)
            t.div_(T)
        logp = logits.sub_(torch.logsumexp(logits, -1, keepdim=True))  # (c, V) in place
        logq = t.sub_(torch.logsumexp(t, -1, keepdim=True))
        yc = y[s:e, None]  # (c, 1)
        lp_y, lq_y = logp.gather(1, yc).squeeze(1), logq.gather(1, yc).squeeze(1)  # (c,)
        full = estimator == "full"
        # kd.py's reverse-KL maths: the exact KL (c,), its gradient w.r.t. z / T when asked; p is
        # left in logp's buffer.
        kl, grad = _divergence_(logp, logq, "reverse", 0.0, need_grad and full)
        stats.add_(torch.stack([kl.sum(), lp_y.sum(), lq_y.sum()]))
        if full:
            return kl * (T * T), (grad.mul_(T) if need_grad else None)
        k = lp_y - lq_y  # (c,) the sampled-token estimate
        if not need_grad:
            return k * (T * T), None
        # d [k.detach() * log p(y)] / d (z / T) = k (onehot(y) - p), in p's buffer.
        grad = logp.mul_(-k[:, None]).scatter_add_(1, yc, k[:, None])
        return k * (T * T), grad.mul_(T)

    loss_sum = chunked_head(h, student_head, chunk_fn, chunk_size=chunk, vocab=V)
    n = pos.numel()
    return OnPolicyOutput(loss_sum / loss_denominator(num_items, n, loss_sum.device), n, loss_sum.detach(), stats)


# ---------------------------------------------------------------------------- the trainer's side

def _read_prompts(cfg, tok, log) -> tuple[list[list[int]], list[str], SFTData]:
    """The prompts of --data (records may be prompt-only) as ids, their last user turn, and a
    prompt-only SFTData (no labels) standing for the data in the run's fingerprint and summary."""
    from .answers import read_prompts
    from .records import resolve_files

    dc = cfg.data_config
    recs, bad = [], []
    for f in resolve_files(cfg.data, config=dc.config, split=dc.split):
        r, b = read_prompts(f, dc.format, dc.system_prompt, dc.limit)
        recs, bad = recs + r, bad + b
    recs = recs[:dc.limit] if dc.limit else recs
    log(f"on-policy prompts: {len(recs)} from {cfg.data}" + (f"; {len(bad)} skipped, first: {bad[0]}" if bad else ""))
    if not recs:
        raise ValueError(f"no prompt in {cfg.data} for --on-policy (records need a user turn; see --format)")
    ids = [tok.encode_chat(r.messages, add_generation_prompt=True)[0] for r in recs]
    texts = [r.messages[-1]["content"] for r in recs]
    samples = [Sample(np.asarray(i, dtype=np.int64), np.full(len(i), IGNORE_INDEX, dtype=np.int64)) for i in ids]
    summary = DataSummary(source=cfg.data, detected_format=recs[0].format or "prompt", read=len(recs) + len(bad),
                          kept=len(recs), dropped={"bad_record": len(bad)} if bad else {},
                          total_tokens=sum(map(len, ids)), max_seq_len=dc.max_seq_len)
    return ids, texts, SFTData(samples, summary, prompt_texts=list(enumerate(texts)))


class OnPolicy:
    """The on-policy side of a training run (--on-policy): the frozen teacher, the prompts of
    --data, and each step's micro-batches. A share --on-policy-mix of the micro-batches (by their
    running count) are rollouts of the next --batch-size prompts, each sampled
    --samples-per-prompt times; the others are ordinary SFT micro-batches of the data stream.
    Each rollout's seed comes from (--seed, its position in the prompt stream, its sample), and
    the position is a LoopState counter: a resumed run samples what the uninterrupted one did,
    and so does a run on more processes with the same global batch."""

    def __init__(self, cfg, tok, device: torch.device, dtype: torch.dtype, rank: int = 0, world: int = 1, log=print):
        from .loader import load_model
        from .teacher import same_tokenizer
        from .tokenizer import load_tokenizer

        self.cfg, self.o, self.tok, self.device, self.rank, self.world = cfg, cfg.on_policy, tok, device, rank, world
        self.prompts, self.texts, self.data = _read_prompts(cfg, tok, log)
        self.pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
        d = cfg.distill
        t_tok = load_tokenizer(d.teacher)  # the teacher scores the student's ids: same tokenizer
        if not same_tokenizer(tok, t_tok, self.prompts):
            raise ValueError(f"teacher {d.teacher} and student {cfg.model} tokenize differently; on-policy "
                             "distillation needs a shared tokenizer")
        self.teacher = load_model(d.teacher, dtype=dtype, device=device, quantize=d.teacher_quantize)
        self.teacher.requires_grad_(False).eval()
        log(f"teacher {d.teacher}: {self.teacher.num_parameters():,} parameters, frozen; on-policy share "
            f"{self.o.on_policy_mix}, {self.o.on_policy_estimator} reverse KL")
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def sft_needed(self) -> bool:
        """Whether some micro-batches are SFT ones (then --data needs answers)."""
        return self.o.on_policy_mix < 1

    def train_data(self, log=print) -> SFTData:
        """The run's data: the SFT samples of --data when some micro-batches are SFT ones (its
        records then need answers), else the prompt-only stand-in."""
        from .samples import prepare_data

        if not self.sft_needed:
            return self.data
        try:
            return prepare_data(self.cfg.data, self.tok, self.cfg.data_config, log=log)
        except ValueError as e:
            if not str(e).startswith("no usable sample"):
                raise
            raise ValueError(f"--on-policy-mix {self.o.on_policy_mix} < 1 trains SFT micro-batches on the answers "
                             f"of --data, and {self.cfg.data} has no usable one; use --on-policy-mix 1 for "
                             f"prompt-only records.\n{e}") from None

    @property
    def micro_per_epoch(self) -> int:
        """On-policy micro-batches per pass over the prompts, on each process."""
        n = len(self.prompts) // (self.cfg.batch_size * self.world)
        if n == 0:
            raise ValueError(f"{len(self.prompts)} prompts are fewer than --batch-size {self.cfg.batch_size} x "
                             f"{self.world} process(es); lower --batch-size or add prompts")
        return n

    def _prompt_at(self, p: int) -> int:
        epoch, i = divmod(p, len(self.prompts))
        if self._perm is None or self._perm[0] != epoch:  # each pass in its own order (the 15: apart from the data's)
            self._perm = (epoch, np.random.default_rng([self.cfg.seed, epoch, 15]).permutation(len(self.prompts)))
        return int(self._perm[1][i])

    def take(self, model, state, stream, n: int, amp) -> list:
        """This step's n micro-batches: rollouts of the current model (RolloutBatch) where the mix
        says on-policy, the data stream's next batches elsewhere; advances the state's positions."""
        mix, k0 = self.o.on_policy_mix, state.step * n
        on = [math.floor((k0 + i + 1) * mix) > math.floor((k0 + i) * mix) for i in range(n)]
        sft = iter(stream.take(state, on.count(False)) if not all(on) else [])
        roll = iter(self._rollouts(model, state, on.count(True), amp) if any(on) else [])
        return [next(roll) if o else next(sft) for o in on]

    def _rollouts(self, model, state, m: int, amp) -> list[RolloutBatch]:
        cfg, o = self.cfg, self.o
        bs, k, first = cfg.batch_size, o.samples_per_prompt, state.on_policy_batches
        # Global positions in the endless prompt stream: rank r takes the r-th share of each round.
        where = [(g * self.world + self.rank) * bs + j for g in range(first, first + m) for j in range(bs)]
        # One seed per rollout from (--seed, its position, its sample): its draws do not depend on
        # how the step is split into processes and micro-batches.
        seeds = [int(np.random.SeedSequence([cfg.seed, p, i]).generate_state(1)[0]) for p in where for i in range(k)]
        prompts = [self.prompts[self._prompt_at(p)] for p in where]
        with amp:
            r = rollout(model, self.tok, prompts, max_new_tokens=o.rollout_tokens, temperature=o.rollout_temperature,
                        samples_per_prompt=k, seed=seeds)
        state.on_policy_batches += m
        per = bs * k
        return [rollout_batch(r[i * per:(i + 1) * per], seq_len=cfg.data_config.max_seq_len, pad_id=self.pad_id,
                              pad_to_multiple=cfg.pad_to_multiple) for i in range(m)]

    def loss(self, hidden: Tensor, head: Tensor, labels: Tensor, positions: Tensor, batch, num_items) -> OnPolicyOutput:
        """The on-policy loss of a RolloutBatch: the teacher scores it in one forward."""
        with torch.no_grad():
            t_hidden = self.teacher(**batch.model_inputs(self.device), return_hidden=True)
        return on_policy_kd_loss(hidden, head, t_hidden, self.teacher.head_weight, labels,
                                 estimator=self.o.on_policy_estimator, temperature=self.cfg.distill.kd_temperature,
                                 num_items=num_items, positions=positions, chunk_budget_mb=self.cfg.loss_chunk_mb)


def rollout_counts(micro: list) -> list[float]:
    """Host counts of a step's rollouts: [trained on-policy tokens, rollouts, finished rollouts];
    [] for a step without rollouts."""
    rb = [b for b in micro if isinstance(b, RolloutBatch)]
    if not rb:
        return []
    return [float(sum(b.num_tokens for b in rb)), float(sum(len(b.rollouts) for b in rb)),
            float(sum(sum(b.rollouts.finished) for b in rb))]


def on_policy_row(extra: list[float], micro: list, state) -> dict:
    """The metrics of a step with rollouts from `extra` = [reverse KL, student and teacher log-prob
    sums, then `rollout_counts`], all processes' totals (per on-policy token, and per rollout);
    counts the rollouts in the LoopState. rollout_len_p90 is over this process's rollouts."""
    kl, s_lp, t_lp, n_tok, n_roll, n_fin = extra
    state.rollouts += int(n_roll)
    state.rollouts_finished += int(n_fin)
    if not n_roll:
        return {}
    lengths = [n for b in micro if isinstance(b, RolloutBatch) for n in b.rollouts.lengths]
    t = max(n_tok, 1.0)
    # Every sampled token is labelled (the stop token too): the trained tokens are the lengths.
    return {"reverse_kl": kl / t, "student_logprob": s_lp / t, "teacher_logprob": t_lp / t,
            "rollout_len_mean": n_tok / n_roll, "rollout_len_p90": float(np.percentile(lengths, 90)),
            "rollout_finished": n_fin / n_roll}


def finished_summary(state) -> dict:
    """For the closing summary: rollouts sampled, and the share that ended with a stop token."""
    if not state.rollouts:
        return {}
    return {"rollouts": state.rollouts, "rollouts_finished": round(state.rollouts_finished / state.rollouts, 4)}
