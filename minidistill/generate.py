"""Sampling with the KV cache, batched generation, reasoning traces, and the
`python -m minidistill.generate` command.

`python -m minidistill.generate --prompts FILE --output traces.jsonl --num-samples K` writes
teacher traces in the messages schema, ready for training (see `write_traces`); `--verify
FIELD` keeps only the samples whose final answer matches the record's reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .model import Transformer
from .records import FORMATS


def _next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Pick a token from (vocab,) logits: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_ids(model: Transformer, prompt_ids: list[int], *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, stop_ids: list[int] | tuple = (),
                 seed: int | None = None, on_token: Callable[[int], None] | None = None) -> list[int]:
    """Generate up to max_new_tokens after prompt_ids; the stop token is not returned."""
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    cfg = model.config
    device = model.model.embed_tokens.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    seq = list(prompt_ids)
    cache = model.new_cache(1, len(seq) + max_new_tokens)
    logits = model(torch.tensor([seq], device=device), cache=cache)[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = _next_token(logits, temperature, top_p, generator)
        if tok in stop_ids:
            break
        out.append(tok)
        seq.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out) == max_new_tokens:
            break
        if (cfg.rope_type == "longrope" and cache.pos <= cfg.original_max_position_embeddings < len(seq)):
            # The cached keys were rotated with the short factors; from here on the long ones
            # apply, so rebuild the cache over the whole sequence (what the reference does).
            cache.reset()
            logits = model(torch.tensor([seq], device=device), cache=cache)[0, -1]
        else:
            logits = model(torch.tensor([[tok]], device=device), cache=cache)[0, -1]
    return out


def generate(model: Transformer, tok, messages_or_text: list[dict] | str, *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stream: Callable[[str], None] | None = None) -> str:
    """Answer a chat (a list of {"role", "content"} messages, or one user message as a str).

    Returns the assistant reply as text; `stream` receives the text piece by piece.
    """
    messages = [{"role": "user", "content": messages_or_text}] if isinstance(messages_or_text, str) else messages_or_text
    prompt, _ = tok.encode_chat(messages, add_generation_prompt=True)
    out: list[int] = []
    printed = ""

    def on_token(t: int) -> None:
        nonlocal printed
        out.append(t)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            stream(text[len(printed):])
            printed = text

    ids = generate_ids(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       stop_ids=tok.stop_ids, seed=seed, on_token=on_token if stream else None)
    text = tok.decode(ids)
    if stream and text != printed:
        stream(text[len(printed):])
    return text


def _next_tokens(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Batched `_next_token`: (B, vocab) logits -> (B,) token ids."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _decode_rows(model: Transformer, rows: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 stop_ids, generator: torch.Generator | None) -> list[list[int]]:
    """Generate for prompts of one length together: no padding, so no attention mask is needed
    and every row sees exactly the positions it would see alone (the cache has one shared pos)."""
    device = model.model.embed_tokens.weight.device
    cache = model.new_cache(len(rows), len(rows[0]) + max_new_tokens)
    logits = model(torch.tensor(rows, device=device), cache=cache)[:, -1]  # (b, V)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))  # original row of each row still in the batch
    for step in range(max_new_tokens):
        nxt = _next_tokens(logits, temperature, top_p, generator)  # (b,)
        stopped = torch.isin(nxt, stop).tolist()
        for j, (r, tok) in enumerate(zip(live, nxt.tolist())):
            if not stopped[j]:
                out[r].append(tok)
        if step == max_new_tokens - 1:
            break
        keep = [i for i, s in enumerate(stopped) if not s]
        if not keep:
            break
        if len(keep) < len(live):
            # Drop finished rows from the batch and its cache, so long traces do not pay for short ones.
            idx = torch.tensor(keep, device=device)
            cache.k = [k.index_select(0, idx) for k in cache.k]
            cache.v = [v.index_select(0, idx) for v in cache.v]
            live, nxt = [live[i] for i in keep], nxt[idx]
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return out


@torch.no_grad()
def generate_ids_batch(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int = 256,
                       temperature: float = 0.0, top_p: float = 1.0, stop_ids: list[int] | tuple = (),
                       seed: int | None = None, batch_size: int = 16) -> list[list[int]]:
    """`generate_ids` for many prompts; results in prompt order, stop tokens not returned.

    The model has no padding mask, so prompts are grouped by token length and each group runs
    in batches of up to batch_size (no padding at all); greedy output equals `generate_ids`
    prompt by prompt. LongRoPE models whose prompt + max_new_tokens cross the original context
    go one by one through `generate_ids`, which rebuilds the cache at the switch.
    With seed, sampling is reproducible for the same prompts and batch_size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; generate needs at least one prompt token")
    cfg = model.config
    device = model.model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    results: list[list[int]] = [[] for _ in prompts]
    for length in sorted(groups):
        idxs = groups[length]
        if cfg.rope_type == "longrope" and length + max_new_tokens > cfg.original_max_position_embeddings:
            for i in idxs:
                results[i] = generate_ids(model, prompts[i], max_new_tokens=max_new_tokens, temperature=temperature,
                                          top_p=top_p, stop_ids=stop_ids, seed=None if seed is None else seed + i)
            continue
        for b in range(0, len(idxs), batch_size):
            chunk = idxs[b: b + batch_size]
            outs = _decode_rows(model, [list(prompts[i]) for i in chunk], max_new_tokens, temperature, top_p,
                                stop_ids, generator)
            for i, o in zip(chunk, outs):
                results[i] = o
    return results


def generate_batch(model: Transformer, tok, prompts: list[list[dict]], *, max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   batch_size: int = 16) -> list[str]:
    """Answer many chats at once (see `generate_ids_batch`); returns the replies in order."""
    ids = [tok.encode_chat(m, add_generation_prompt=True)[0] for m in prompts]
    outs = generate_ids_batch(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              stop_ids=tok.stop_ids, seed=seed, batch_size=batch_size)
    return [tok.decode(o) for o in outs]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(dtype: str, device: str) -> str:
    """A --dtype flag's value, with "auto" read as bf16 on GPU and fp32 on CPU."""
    return dtype if dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")


def load_for_inference(model_name: str, adapter: str | None, dtype: str, device: str):
    """(model in eval mode with the adapter applied, tokenizer) for the generation and eval CLIs;
    dtype "auto" is bf16 on GPU, fp32 on CPU."""
    from .loader import load_model
    from .lora import load_adapter
    from .tokenizer import load_tokenizer

    model = load_model(model_name, dtype=inference_dtype(dtype, device), device=device)
    if adapter:
        load_adapter(model, adapter)
    return model.eval(), load_tokenizer(model_name)  # eval after the swap: LoRA dropout stays off


def _done_ids(output: Path) -> set[str]:
    """Prompt ids already handled: those with a record in the output, and those in the sidecar
    progress file (a prompt whose samples all failed --verify leaves no record)."""
    done: set[str] = set()
    for path in (output, output.with_name(output.name + ".progress")):
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        done.add(json.dumps(json.loads(line)["prompt_id"]))
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut by a crash: its prompt runs again
    return done


def write_traces(model: Transformer, tok, prompts: list, output: str | Path, *, num_samples: int = 1,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 batch_size: int = 16, verify: str | None = None, progress: bool = True) -> dict:
    """Sample `num_samples` replies per prompt (`PromptRecord`s from `minidistill.eval.read_prompts`)
    and append them to `output` as training records in the messages schema:
    {"messages": prompt + [{"role": "assistant", "content": answer}], "reasoning", "answer",
    "prompt_id", "sample"}. Reasoning is the text inside the think block (the generation may
    start inside it, as R1 templates do); replies whose reasoning never closes are dropped.

    Resumable: prompts already in the output (or its `.progress` sidecar) are skipped.
    verify: a record field with the reference answer; only replies whose answer scores as
    correct (`minidistill.eval.score_answer`) are kept (rejection sampling).
    Returns counts: prompts, skipped (already done), generated, kept, unfinished, rejected."""
    from .eval import reference_answer, score_answer, think_stats

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = _done_ids(output)
    todo = [p for p in prompts if json.dumps(p.id) not in done]
    stats = {"prompts": len(prompts), "skipped": len(prompts) - len(todo), "generated": 0, "kept": 0,
             "unfinished": 0, "rejected": 0}
    refs = {}
    if verify:
        for p in todo:
            refs[id(p)] = reference_answer(p.record, p.format, verify)  # fail before generating anything
    per_call = max(1, batch_size // num_samples)  # prompts per call, each repeated num_samples times
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="prompts", unit="prompt")
    with open(output, "a", encoding="utf-8") as out, \
            open(output.with_name(output.name + ".progress"), "a", encoding="utf-8") as prog:
        for c in range(0, len(todo), per_call):
            chunk = todo[c: c + per_call]
            chats = [p.messages for p in chunk for _ in range(num_samples)]
            texts = generate_batch(model, tok, chats, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=None if seed is None else seed + c, batch_size=batch_size)
            for j, p in enumerate(chunk):
                r1 = tok.render_chat(p.messages, add_generation_prompt=True).rstrip().endswith("<think>")
                for k in range(num_samples):
                    st = think_stats(texts[j * num_samples + k], started_in_think=r1)
                    stats["generated"] += 1
                    if not st.answer:
                        stats["unfinished"] += 1
                        continue
                    rec = {"messages": p.messages + [{"role": "assistant", "content": st.answer}],
                           "reasoning": st.reasoning, "answer": st.answer, "prompt_id": p.id, "sample": k}
                    if verify:
                        if not score_answer(st.answer, refs[id(p)]):
                            stats["rejected"] += 1
                            continue
                        rec["reference"] = refs[id(p)]
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    stats["kept"] += 1
                out.flush()  # the records first, then the progress line: a crash never loses a prompt's samples
                prog.write(json.dumps({"prompt_id": p.id}) + "\n")
                prog.flush()
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minidistill.generate",
                                description="Answer a prompt with a model (and optionally a LoRA adapter), streaming "
                                            "tokens; or, with --prompts, write reasoning traces for a file of prompts.")
    p.add_argument("--model", required=True, help="preset name, hub repo id or local folder")
    p.add_argument("--adapter", help="LoRA adapter folder (ours or PEFT's) to apply")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message")
    src.add_argument("--prompts", help="file of prompts: JSONL/JSON/Parquet records in any schema the data readers "
                                       "know (or with a `prompt` string), or a text file with one prompt per line")
    p.add_argument("--system", help="optional system message (with --prompts: for records that have none)")
    p.add_argument("--output", help="with --prompts: traces JSONL to append to (required there; resumable)")
    p.add_argument("--num-samples", type=int, default=1, help="replies sampled per prompt (default: %(default)s)")
    p.add_argument("--verify", metavar="FIELD", help="keep only replies whose answer matches the record's reference "
                                                     "answer in FIELD (rejection sampling; minidistill.eval rule)")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                   help="schema of the --prompts records (default: detect)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward with --prompts "
                                                              "(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=default_device(), help="default: %(default)s")
    args = p.parse_args(argv)
    if args.prompts and not args.output:
        p.error("--prompts needs --output FILE (the traces JSONL)")
    if args.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_samples > 1 and args.temperature <= 0:
        print(f"note: {args.num_samples} greedy samples per prompt are identical; set --temperature", file=sys.stderr)

    model, tok = load_for_inference(args.model, args.adapter, args.dtype, args.device)

    if args.prompts:
        from .eval import read_prompts

        prompts, bad = read_prompts(args.prompts, args.format, args.system)
        for line in bad[:5]:
            print(f"skipping {line}", file=sys.stderr)
        stats = write_traces(model, tok, prompts, args.output, num_samples=args.num_samples,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed, batch_size=args.batch_size, verify=args.verify)
        what = "verified" if args.verify else "finished"
        print(f"{stats['prompts']} prompts ({stats['skipped']} already done, {len(bad)} unusable records); kept "
              f"{stats['kept']}/{stats['generated']} {what} samples ({stats['unfinished']} unfinished, "
              f"{stats['rejected']} rejected) -> {args.output}")
        return

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]

    def stream(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    generate(model, tok, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, seed=args.seed, stream=stream)
    sys.stdout.write("\n")

if __name__ == "__main__":
    from .cli import run

    run(main)
