"""The checkpoint's tokenizer: `tokenizers.Tokenizer` from tokenizer.json, special ids, chat formats.

Specials are never added behind our back: `encode` calls tokenizers with add_special_tokens=False, because
the Llama 3 / R1 post-processors prepend BOS and their chat templates write BOS too (a double BOS).
BOS is added only on request (`add_bos=True`) and only when the text does not already start with it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from .chat import ChatFormat, Segment, detect_chat_format, get_format, render_segments


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(value) -> str | None:
    """A special token as tokenizer_config writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    """config / generation_config ids: absent, an int, or a list of ints."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _chat_template(folder: Path, config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():  # newer checkpoints (e.g. Phi-4-mini-reasoning) keep the template here
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


class Tokenizer:
    """A checkpoint's tokenizer with its special ids and chat format."""

    def __init__(self, tok: _HFTokenizer, config: dict, generation_config: dict, model_config: dict,
                 chat_template: str | None, chat_format: str | None = None) -> None:
        self._tok = tok
        self.config = config  # tokenizer_config.json, kept so save() writes it back unchanged
        self.generation_config = generation_config
        self.chat_template = chat_template
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.pad_token = _token_str(config.get("pad_token"))
        self.bos_id = self._special_id(self.bos_token, model_config.get("bos_token_id"))
        self.eos_id = self._special_id(self.eos_token, model_config.get("eos_token_id"))
        self.pad_id = self._special_id(self.pad_token, model_config.get("pad_token_id"))
        if self.bos_token is None and self.bos_id is not None:
            self.bos_token = tok.id_to_token(self.bos_id)
        if self.eos_token is None and self.eos_id is not None:
            self.eos_token = tok.id_to_token(self.eos_id)
        stops = ([self.eos_id] if self.eos_id is not None else []) + _ids(generation_config.get("eos_token_id"))
        self.stop_ids: list[int] = list(dict.fromkeys(stops))
        self.format: ChatFormat | None = None
        self.chat_format = "none"
        if chat_format is not None:
            self.set_chat_format(chat_format)
        self._no_format = ("this tokenizer has no chat template; pass chat_format=NAME to from_dir / load_tokenizer "
                           "to choose one of minidistill.chat.FORMATS")
        if chat_format is None and chat_template:
            try:
                self.set_chat_format(detect_chat_format(chat_template))
            except ValueError as e:  # said at the first chat use: prompt templates and plain text still work
                self._no_format = f"{e} (or use a prompt template: --template FILE, or --format text)"

    def _special_id(self, token: str | None, fallback) -> int | None:
        if token is not None:
            tid = self._tok.token_to_id(token)
            if tid is not None:
                return tid
        ids = _ids(fallback)
        return ids[0] if ids else None

    @classmethod
    def from_dir(cls, path: str | Path, chat_format: str | None = None) -> "Tokenizer":
        """Load tokenizer.json and its companions from a checkpoint folder.

        chat_format forces a format by name (see minidistill.chat.FORMATS) instead of detecting it.
        """
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json: minidistill reads the fast-tokenizer file "
                                    "only; convert a sentencepiece/tiktoken tokenizer with transformers once")
        tok = _HFTokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        for key, value in _read_json(folder / "special_tokens_map.json").items():
            config.setdefault(key, value)
        # Tokens declared only in tokenizer_config (rare) must still split atomically.
        for tid, t in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if tok.token_to_id(t["content"]) is None:
                added = AddedToken(t["content"], special=t.get("special", False), lstrip=t.get("lstrip", False),
                                   rstrip=t.get("rstrip", False), normalized=t.get("normalized", False),
                                   single_word=t.get("single_word", False))
                (tok.add_special_tokens if added.special else tok.add_tokens)([added])
        return cls(tok, config, _read_json(folder / "generation_config.json"), _read_json(folder / "config.json"),
                   _chat_template(folder, config), chat_format)

    def set_chat_format(self, name: str) -> None:
        """Use the chat format `name`; fails if the vocabulary lacks one of its special tokens."""
        fmt = get_format(name)
        missing = [t for t in fmt.tokens if self._tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"chat format {name!r} needs the tokens {missing}, which this vocabulary lacks; "
                             "pick the format that matches the checkpoint")
        self.format, self.chat_format = fmt, name

    @property
    def backend(self) -> _HFTokenizer:
        """The `tokenizers.Tokenizer` underneath (batch encoding with character offsets)."""
        return self._tok

    @property
    def prepends_bos(self) -> bool:
        """Whether tokenizer.json's post-processor puts BOS first (Llama 3, R1-Distill), as transformers'
        `tokenizer(text)` then does: plain-text (prompt template) samples start with BOS when it does."""
        if self.bos_id is None:
            return False
        with_specials = self._tok.encode("a", add_special_tokens=True).ids
        return with_specials[:1] == [self.bos_id] and self.encode("a")[:1] != [self.bos_id]

    # ---- plain text ------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of text; BOS first when add_bos and the text does not already begin with it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ids (a list or 1-D tensor of ints)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(tid)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, tokens: list[str]) -> list[str]:
        """Add the tokens not yet in the vocabulary (non-special, matched atomically); returns those added."""
        new = [t for t in dict.fromkeys(tokens) if self._tok.token_to_id(t) is None]
        if new:
            self._tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in new])
        return new

    # ---- chat ------------------------------------------------------------------------------------------------

    def chat_segments(self, messages: list[dict], add_generation_prompt: bool = False,
                      enable_thinking: bool = True) -> list[Segment]:
        """The conversation as the chat format's (text, trainable) segments; joined, they are `render_chat`.
        enable_thinking=False: the template's thinking switch off (Qwen3), ignored by templates without one."""
        if self.format is None:
            raise ValueError(self._no_format)
        return render_segments(self.format, messages, add_generation_prompt, self.bos_token or "",
                               self.eos_token or "", enable_thinking)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    enable_thinking: bool = True) -> str:
        """The conversation as the chat template would print it."""
        return "".join(t for t, _ in self.chat_segments(messages, add_generation_prompt, enable_thinking))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    enable_thinking: bool = True) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and a same-length mask, True on assistant content and terminators."""
        segments = self.chat_segments(messages, add_generation_prompt, enable_thinking)
        spans, pos = [], 0
        for text, train in segments:
            if train:
                spans.append((pos, pos + len(text)))
            pos += len(text)
        enc = self._tok.encode("".join(t for t, _ in segments), add_special_tokens=False)
        # A token belongs to the segment where it starts: a whitespace-stripping special token that swallows
        # the next segment's leading spaces stays with its own segment.
        mask = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
        return enc.ids, mask

    # ---- files -----------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (added tokens, chat template) so the folder reloads
        identically; also generation_config.json (the stop ids) when the folder has none yet."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        config = dict(self.config)
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())}
        for key, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                           ("pad_token", self.pad_token)):
            if token is not None:
                config[key] = token
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        gen = folder / "generation_config.json"
        if not gen.exists() and self.stop_ids:
            with open(gen, "w", encoding="utf-8") as f:
                json.dump({**self.generation_config, "eos_token_id": self.stop_ids}, f, indent=2)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab={len(self)}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, "
                f"stop={self.stop_ids}, chat_format={self.chat_format!r})")


def load_tokenizer(name_or_path: str, chat_format: str | None = None) -> Tokenizer:
    """Tokenizer of a preset name, hub repo id or local folder (downloads the tokenizer files only)."""
    from .hub import resolve_model_dir

    return Tokenizer.from_dir(resolve_model_dir(name_or_path, weights=False), chat_format=chat_format)


def tokenizer_state(tok) -> bytes:
    """What another process needs to rebuild `tok` (its JSON, configs, chat format name); also
    the tokenizer part of the data cache key. Chat formats hold closures, so no plain pickle of a
    Tokenizer; any other tokenizer object is pickled as it is."""
    if not isinstance(tok, Tokenizer):
        return pickle.dumps(tok)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return pickle.dumps((type(tok), tok.backend.to_str(), tok.config, tok.generation_config, ids,
                         tok.chat_template, tok.chat_format))


def tokenizer_from_state(state: bytes):
    """The tokenizer `tokenizer_state` described (only for states this program wrote itself)."""
    obj = pickle.loads(state)
    if not isinstance(obj, tuple):
        return obj
    cls, js, config, gen, ids, template, fmt = obj
    return cls(_HFTokenizer.from_str(js), config, gen, ids, template, None if fmt == "none" else fmt)
