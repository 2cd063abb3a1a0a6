"""Sampling with the KV cache, and the `python -m minidistill.generate` command."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
from torch import Tensor

from .model import Transformer


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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minidistill.generate",
                                description="Answer a prompt with a model (and optionally a LoRA adapter), streaming tokens.")
    p.add_argument("--model", required=True, help="preset name, hub repo id or local folder")
    p.add_argument("--adapter", help="LoRA adapter folder (ours or PEFT's) to apply")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=512, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=default_device(), help="default: %(default)s")
    args = p.parse_args(argv)

    from .checkpoint import load_model
    from .tokenizer import load_tokenizer

    dtype = args.dtype if args.dtype != "auto" else ("bf16" if args.device.startswith("cuda") else "fp32")
    model = load_model(args.model, dtype=dtype, device=args.device)
    if args.adapter:
        from .lora import load_adapter

        load_adapter(model, args.adapter)
    tok = load_tokenizer(args.model)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]

    def stream(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    generate(model, tok, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, seed=args.seed, stream=stream)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
