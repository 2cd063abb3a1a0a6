"""Generation for text: prompts (chats, user messages, or token ids) encoded with the chat
format, replies decoded and cut before stop strings, streamed piece by piece. The token-level
decoder underneath is sampling.py's `iter_generate`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from .model import Transformer
from .progress import Progress
from .sampling import Completion, generate_ids, iter_generate


def encode_prompt(tok, prompt) -> list[int]:
    """Token ids of a prompt: a list of ids as it is, a chat (list of {"role", "content"}) or a
    user message (str) rendered with the chat format, ready for the assistant's reply."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt and isinstance(prompt[0], dict):
        return tok.encode_chat(prompt, add_generation_prompt=True)[0]
    return [int(t) for t in prompt]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first stop string it holds."""
    cut = min((i for i in (text.find(x) for x in stop_strings if x) if i >= 0), default=len(text))
    return text[:cut]


def generate(model: Transformer, tok, messages_or_text: list[dict] | str, *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stream: Callable[[str], None] | None = None, stop_strings: Sequence[str] = ()) -> str:
    """Answer a chat (a list of {"role", "content"} messages, or one user message as a str).

    Returns the assistant reply as text, cut before any stop string; `stream` receives it
    piece by piece."""
    prompt = encode_prompt(tok, messages_or_text)
    out: list[int] = []
    printed = 0
    hold = max(map(len, stop_strings), default=1) - 1  # text that may yet turn into a stop string

    def on_token(t: int) -> None:
        nonlocal printed
        out.append(t)
        text = tok.decode(out)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return
        safe = min(len(cut_at_stop(text, stop_strings)), len(text) - hold)
        if safe > printed:
            stream(text[printed:safe])
            printed = safe

    ids = generate_ids(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       stop_ids=tok.stop_ids, seed=seed, on_token=on_token if stream else None,
                       stop_strings=stop_strings, decode=tok.decode)
    text = cut_at_stop(tok.decode(ids), stop_strings)
    if stream and len(text) > printed:
        stream(text[printed:])
    return text


def iter_replies(model: Transformer, tok, chats: Sequence[list[dict] | str | Sequence[int]], *,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | Sequence[int] | None = None, batch_size: int = 16, stop_strings: Sequence[str] = (),
                 progress: Progress | None = None) -> Iterator[Completion]:
    """`iter_generate` for chats (or user messages, or prompts already as ids: `encode_prompt`):
    yields each reply's `Completion`, its text cut before any stop string, as it finishes."""
    ids = [encode_prompt(tok, m) for m in chats]
    for c in iter_generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           stop_ids=tok.stop_ids, stop_strings=stop_strings, decode=tok.decode, seed=seed,
                           batch_size=batch_size, progress=progress):
        c.text = cut_at_stop(tok.decode(c.ids), stop_strings)
        yield c


def generate_batch(model: Transformer, tok, prompts: Sequence[list[dict] | str], *, max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | Sequence[int] | None = None,
                   batch_size: int = 16, stop_strings: Sequence[str] = ()) -> list[str]:
    """Answer many chats at once (see `iter_generate`); returns the replies in order."""
    done = iter_replies(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        seed=seed, batch_size=batch_size, stop_strings=stop_strings)
    return [c.text for c in sorted(done, key=lambda c: c.index)]
