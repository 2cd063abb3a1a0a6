"""Per-family chat formats, written by hand: messages -> text segments, each marked trainable or not.

Every format reproduces one family's Jinja chat template exactly (the tests compare with transformers'
`apply_chat_template` on the real templates), without Jinja at run time. A format returns segments; the
trainable ones are each assistant turn's content plus its terminator token (`<|end|>`, `<|eot_id|>`, ...).
The tokenizer encodes the joined text once and maps segments to tokens through character offsets, so
token merges and whitespace-stripping special tokens at segment boundaries cannot shift the mask.

The format is chosen from the checkpoint's own template text (`detect_chat_format`), never from a folder name.
Templates with a thinking switch (Qwen3's `enable_thinking`) have a second format for the switch off
(`ChatFormat.no_thinking`), which `render_segments(..., enable_thinking=False)` picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Segment = tuple[str, bool]  # (text, trainable)
ROLES = ("system", "user", "assistant")

PHI4_MINI_REASONING_SYSTEM = "Your name is Phi, an AI math expert developed by Microsoft."
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Llama 3.1's template fixes this date; 3.2's uses today's date when rendered by transformers. A fixed date
# keeps tokenized training data reproducible from one day to the next.
LLAMA3_DATE = "26 Jul 2024"


def _phi4_mini(msgs: list[dict], gen: bool, bos: str, eos: str) -> list[Segment]:
    out: list[Segment] = []
    for m in msgs:
        out += [(f"<|{m['role']}|>", False), (m["content"] + "<|end|>", m["role"] == "assistant")]
    return out + [("<|assistant|>" if gen else eos, False)]


def _phi4_mini_reasoning(msgs: list[dict], gen: bool, bos: str, eos: str) -> list[Segment]:
    system = "".join(" " + m["content"] for m in msgs if m["role"] == "system")
    out: list[Segment] = [(f"<|system|>{PHI4_MINI_REASONING_SYSTEM}{system}<|end|>", False)]
    for m in msgs:
        if m["role"] != "system":
            out += [(f"<|{m['role']}|>", False), (m["content"] + "<|end|>", m["role"] == "assistant")]
    return out + [("<|assistant|>" if gen else eos, False)]


def _phi4(msgs: list[dict], gen: bool, bos: str, eos: str) -> list[Segment]:
    out: list[Segment] = []
    for m in msgs:
        out += [(f"<|im_start|>{m['role']}<|im_sep|>", False),
                (m["content"] + "<|im_end|>", m["role"] == "assistant")]
    return out + ([("<|im_start|>assistant<|im_sep|>", False)] if gen else [])


def _phi3(skip_empty_system: bool) -> Callable:
    def render(msgs: list[dict], gen: bool, bos: str, eos: str) -> list[Segment]:
        out: list[Segment] = []
        for m in msgs:
            if m["role"] == "system" and skip_empty_system and not m["content"]:
                continue  # Phi-3.5 emits no system block for an empty system message
            out += [(f"<|{m['role']}|>\n", False), (m["content"] + "<|end|>", m["role"] == "assistant"),
                    ("\n", False)]
        return out + [("<|assistant|>\n" if gen else eos, False)]
    return render


def _llama3(msgs: list[dict], gen: bool, bos: str, eos: str) -> list[Segment]:
    system = ""
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"].strip(), msgs[1:]  # Jinja's |trim is str.strip()
    out: list[Segment] = [(f"{bos}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
                           f"2023\nToday Date: {LLAMA3_DATE}\n\n{system}<|eot_id|>", False)]
    for m in msgs:
        out += [(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False),
                (m["content"].strip() + "<|eot_id|>", m["role"] == "assistant")]
    return out + ([("<|start_header_id|>assistant<|end_header_id|>\n\n", False)] if gen else [])


def _deepseek_r1(think_prompt: bool) -> Callable:
    def render(msgs: list[dict], gen: bool, bos: str, eos: str) -> list[Segment]:
        system = ""
        for m in msgs:
            if m["role"] == "system":
                system = m["content"]  # the template keeps the last system message, right after BOS
        out: list[Segment] = [(bos + system, False)]
        for i, m in enumerate(msgs):
            if m["role"] == "user":
                out.append(("<｜User｜>" + m["content"], False))
            elif m["role"] == "assistant":
                content = m["content"]
                # The template drops the reasoning of every assistant turn. We keep it on the final turn of a
                # training example (no generation prompt): that trace is what distillation trains on.
                is_target = not gen and i == len(msgs) - 1
                if "</think>" in content and not is_target:
                    content = content.split("</think>")[-1]
                out += [("<｜Assistant｜>", False), (content + eos, True)]
        if gen:
            out.append(("<｜Assistant｜><think>\n" if think_prompt else "<｜Assistant｜>", False))
        return out
    return render


def _chatml(default_system: str | None) -> Callable:
    def render(msgs: list[dict], gen: bool, bos: str, eos: str) -> list[Segment]:
        out: list[Segment] = []
        if default_system is not None and msgs and msgs[0]["role"] != "system":
            out.append((f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
        for m in msgs:
            out += [(f"<|im_start|>{m['role']}\n", False), (m["content"] + "<|im_end|>", m["role"] == "assistant"),
                    ("\n", False)]
        return out + ([("<|im_start|>assistant\n", False)] if gen else [])
    return render


def _qwen3(thinking: bool) -> Callable:
    def render(msgs: list[dict], gen: bool, bos: str, eos: str) -> list[Segment]:
        out: list[Segment] = []
        if msgs[0]["role"] == "system":
            out.append((f"<|im_start|>system\n{msgs[0]['content']}<|im_end|>\n", False))
        # The last real user query (tool responses sent as user turns do not count): reasoning is kept
        # only on the assistant turns after it, the answer being written now.
        last_query = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i]["role"] == "user" and not (
            msgs[i]["content"].startswith("<tool_response>") and msgs[i]["content"].endswith("</tool_response>"))),
            len(msgs) - 1)
        for i, m in enumerate(msgs):
            role, content = m["role"], m["content"]
            if role == "user" or (role == "system" and i > 0):
                out.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", False))
                continue
            if role != "assistant":
                continue
            reasoning = m.get("reasoning_content")
            if not isinstance(reasoning, str):
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            head = "<|im_start|>assistant\n"
            if i > last_query and (i == len(msgs) - 1 or reasoning):
                think = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"
                content = content.lstrip("\n")
                if thinking or reasoning:
                    content = think + content  # the model writes its think block: trained
                else:
                    head += think  # thinking off: the empty block is part of the prompt, as at inference
            out += [(head, False), (content + "<|im_end|>", True), ("\n", False)]
        if gen:
            out.append(("<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n"), False))
        return out
    return render


@dataclass(frozen=True)
class ChatFormat:
    """One family's layout: how to render, how to recognise its template, which tokens it needs."""
    name: str
    render: Callable[[list[dict], bool, str, str], list[Segment]]  # (messages, add_generation_prompt, bos, eos)
    markers: tuple[str, ...]  # substrings that must all be in the template (newlines unescaped)
    tokens: tuple[str, ...]  # strings that must be single tokens in the vocabulary
    forbidden: tuple[str, ...] = ()  # substrings that rule the format out (a different template variant)
    no_thinking: str | None = None  # the format of this template rendered with enable_thinking=False


_PHI_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_R1_MARKERS = ("<｜User｜>", "<｜Assistant｜>", "content.split('</think>')[-1]")
_R1_TOKENS = ("<｜User｜>", "<｜Assistant｜>")
# DeepSeek-V3-0324-style templates (R1-0528 and later) track `ns.is_last_user` and lay turns out differently:
# not reproduced here, so they are refused rather than rendered with the R1-Distill layout.
_R1_LATER = ("ns.is_last_user",)
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_CHATML_MARKER = "'<|im_start|>' + message['role'] + '\n'"
_QWEN3_MARKERS = ("'\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n'", "ns.last_query_index",
                  "enable_thinking")

# Order matters for detection: the first format whose markers all match wins.
FORMATS: dict[str, ChatFormat] = {f.name: f for f in [
    ChatFormat("deepseek-r1", _deepseek_r1(True), _R1_MARKERS + ("<｜Assistant｜><think>\n",), _R1_TOKENS, _R1_LATER),
    ChatFormat("deepseek-r1-nothink", _deepseek_r1(False), _R1_MARKERS, _R1_TOKENS, _R1_LATER),
    ChatFormat("phi-4-mini-reasoning", _phi4_mini_reasoning, (PHI4_MINI_REASONING_SYSTEM, "<|end|>"), _PHI_TOKENS),
    ChatFormat("phi-4", _phi4, ("'<|im_start|>assistant<|im_sep|>' + message['content']",),
               ("<|im_start|>", "<|im_sep|>", "<|im_end|>")),
    ChatFormat("llama3", _llama3, ("<|start_header_id|>", "Cutting Knowledge Date: December 2023",
                                   "message['content'] | trim"), ("<|start_header_id|>", "<|eot_id|>")),
    ChatFormat("qwen3", _qwen3(True), _QWEN3_MARKERS, _CHATML_TOKENS, no_thinking="qwen3-nothink"),
    ChatFormat("qwen3-nothink", _qwen3(False), _QWEN3_MARKERS, _CHATML_TOKENS),  # never detected: qwen3 matches first
    ChatFormat("smollm2", _chatml(SMOLLM2_SYSTEM), (_CHATML_MARKER, SMOLLM2_SYSTEM), _CHATML_TOKENS),
    ChatFormat("qwen2.5", _chatml(QWEN25_SYSTEM), ("'<|im_start|>' + message.role + '\n'", QWEN25_SYSTEM),
               _CHATML_TOKENS, ("<think>", "reasoning_content")),
    ChatFormat("chatml", _chatml(None), (_CHATML_MARKER,), _CHATML_TOKENS,
               ("<think>", "reasoning_content", "You are", "bos_token")),
    ChatFormat("phi-3.5", _phi3(True), ("'<|assistant|>\n' + message['content']",
                                        "message['role'] == 'system' and message['content']"), _PHI_TOKENS),
    ChatFormat("phi-3", _phi3(False), ("'<|assistant|>\n' + message['content']",), _PHI_TOKENS,
               ("bos_token",)),
    ChatFormat("phi-4-mini", _phi4_mini, ("'<|' + message['role'] + '|>' + message['content'] + '<|end|>'",),
               _PHI_TOKENS, ("bos_token",)),
]}


def detect_chat_format(template: str) -> str:
    """Name of the chat format whose markers the Jinja template text contains; ValueError if none does."""
    text = template.replace("\\n", "\n")  # templates write newlines both as escapes and literally
    for f in FORMATS.values():
        if all(m in text for m in f.markers) and not any(m in text for m in f.forbidden):
            return f.name
    head = template[:160].replace("\n", "\\n")
    raise ValueError(f"unrecognised chat template (starts {head!r}...); supported formats: {', '.join(FORMATS)}. "
                     "If the checkpoint uses one of these layouts, force it with chat_format=NAME.")


def get_format(name: str) -> ChatFormat:
    """The format called `name`; ValueError listing the valid names otherwise."""
    if name not in FORMATS:
        raise ValueError(f"unknown chat format {name!r}; supported formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def check_messages(messages: list[dict]) -> None:
    """Fail early, naming the bad message, on anything the formats cannot render."""
    if not messages:
        raise ValueError("messages is empty: give at least one {'role': ..., 'content': ...} message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} is {m!r}: each message needs role in {ROLES} and a str content")


def render_segments(fmt: ChatFormat, messages: list[dict], add_generation_prompt: bool,
                    bos: str, eos: str, enable_thinking: bool = True) -> list[Segment]:
    """The conversation as (text, trainable) segments in order; their texts joined are the prompt.

    enable_thinking=False renders as the template does with that switch (Qwen3: an empty think
    block closes the generation prompt); templates without the switch ignore it, as Jinja does."""
    check_messages(messages)
    if not enable_thinking and fmt.no_thinking is not None:
        fmt = FORMATS[fmt.no_thinking]
    return [(t, train) for t, train in fmt.render(messages, add_generation_prompt, bos, eos) if t]
