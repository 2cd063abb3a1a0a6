"""Tiny but realistic tokenizer folders, one per chat family, for tests that must not touch the network.

`write_tokenizer(family, folder)` trains a small BPE in code (byte-level like o200k / cl100k / Llama 3 /
Qwen, or Metaspace like the SentencePiece Phi-3 tokenizer), adds the family's special and added tokens with
their real strings and flags (special, lstrip, rstrip), and writes the files a hub checkpoint ships:
tokenizer.json, tokenizer_config.json (the family's real chat template, bos/eos/pad), generation_config.json
(eos ids) and a config.json stub. Ids differ from the real ones; strings and flags do not.
Templates are verbatim copies of the public tokenizer_config.json / chat_template.jinja files.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# ---- the real chat templates (data) ----------------------------------------------------------------------

PHI4_MINI = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

PHI4_MINI_REASONING = (
    "{{ '<|system|>Your name is Phi, an AI math expert developed by Microsoft.' }}{% for message in messages %}"
    "{% if message['role'] == 'system' %} {{ message['content'] }}{% if 'tools' in message and message['tools'] "
    "is not none %}{{ '<|tool|>' + message['tools'] + '<|/tool|>' }}{% endif %}{% endif %}{% endfor %}"
    "{{ '<|end|>' }}{% for message in messages %}{% if message['role'] != 'system' %}{{ '<|' + message['role'] + "
    "'|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

PHI4 = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant"
    "<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

PHI35 = PHI3.replace("{% if message['role'] == 'system' %}",
                     "{% if message['role'] == 'system' and message['content'] %}")

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

DEEPSEEK_R1 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = "
    "namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages "
    "%}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set "
    "ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and "
    "message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not "
    "ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + "
    "'<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + "
    "'```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}{% set content = "
    "content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set "
    "ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")

_LLAMA_TOOLS_SYSTEM = r"""{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
"""

_LLAMA_TAIL = r"""    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

_LLAMA_HEAD = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
DATE_BLOCK
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

"""

LLAMA31 = (_LLAMA_HEAD.replace("DATE_BLOCK\n", '    {%- set date_string = "26 Jul 2024" %}\n') + r"""{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
""" + _LLAMA_TOOLS_SYSTEM + r"""        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
""" + _LLAMA_TAIL)

LLAMA32 = (_LLAMA_HEAD.replace("DATE_BLOCK\n", r"""    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
""") + r"""{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
""" + _LLAMA_TOOLS_SYSTEM + r"""        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
""" + _LLAMA_TAIL)

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# ---- special tokens: (content, special, lstrip, rstrip), flags as in the real tokenizer_config ----------

_PHI4_MINI_TOKENS = [("<|endoftext|>", True, False, False), ("<|endofprompt|>", True, False, False)] + [
    (t, True, False, True) for t in ("<|assistant|>", "<|end|>", "<|user|>", "<|system|>")] + [
    (t, False, False, False) for t in ("<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>",
                                       "<|tool_response|>", "<|tag|>")]
_PHI4_TOKENS = [(t, True, True, True) for t in (
    "<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|im_start|>", "<|im_end|>",
    "<|im_sep|>", "<|endofprompt|>", "<|dummy_85|>")]
_PHI3_TOKENS = [("<|endoftext|>", True, False, False)] + [(t, True, False, True) for t in (
    "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|system|>", "<|end|>", "<|user|>")]
_LLAMA3_TOKENS = [(t, True, False, False) for t in (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")]
_R1_QWEN_TOKENS = [("<｜end▁of▁sentence｜>", True, False, False), ("<｜User｜>", False, False, False),
                   ("<｜Assistant｜>", False, False, False), ("<｜begin▁of▁sentence｜>", True, False, False),
                   ("<|EOT|>", False, False, False), ("<think>", False, False, False),
                   ("</think>", False, False, False), ("<|quad_start|>", True, False, False)]
_R1_LLAMA_TOKENS = [(t, True, False, False) for t in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")] + [
    (t, True, False, False) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>")] + [
    (t, False, False, False) for t in ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")]
_CHATML_TOKENS = [(t, True, False, False) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]

_BOS_R1, _EOS_R1 = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
_PHI4_MINI = dict(kind="bytelevel", tokens=_PHI4_MINI_TOKENS, model_type="phi3", bos="<|endoftext|>",
                  eos="<|endoftext|>", pad="<|endoftext|>", unk="<|endoftext|>", gen_eos=["<|end|>", "<|endoftext|>"])
_PHI3 = dict(kind="metaspace", tokens=_PHI3_TOKENS, model_type="phi3", bos="<s>", eos="<|endoftext|>",
             pad="<|endoftext|>", unk="<unk>")
_LLAMA3 = dict(kind="bytelevel", split="llama3", tokens=_LLAMA3_TOKENS, model_type="llama", bos_post=True,
               bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None,
               gen_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], format="llama3")
_R1 = dict(kind="bytelevel", template=DEEPSEEK_R1, bos=_BOS_R1, eos=_EOS_R1, pad=_EOS_R1, unk=None,
           gen_eos=[_EOS_R1], add_bos_token=True, format="deepseek-r1")
_CHATML = dict(kind="bytelevel", tokens=_CHATML_TOKENS, eos="<|im_end|>")

# kind: "bytelevel" or "metaspace"; split: the Split regex before ByteLevel (default: GPT-2's built-in one);
# bos_post: the tokenizer.json post-processor adds BOS (Llama 3 style); format: what detect_format must say.
FAMILIES: dict[str, dict] = {
    "phi-4-mini": dict(_PHI4_MINI, template=PHI4_MINI, format="phi-4-mini"),
    "phi-4-mini-reasoning": dict(_PHI4_MINI, template=PHI4_MINI_REASONING, template_file=True,
                                 format="phi-4-mini-reasoning"),
    "phi-4": dict(kind="bytelevel", tokens=_PHI4_TOKENS, template=PHI4, model_type="phi3", bos="<|endoftext|>",
                  eos="<|im_end|>", pad="<|dummy_85|>", unk="<|endoftext|>", gen_eos=["<|im_end|>"], format="phi-4"),
    "phi-3": dict(_PHI3, template=PHI3, gen_eos=["<|endoftext|>", "<|assistant|>", "<|end|>"], format="phi-3"),
    "phi-3.5": dict(_PHI3, template=PHI35, gen_eos=["<|end|>", "<|assistant|>", "<|endoftext|>"], format="phi-3.5"),
    "llama-3.1": dict(_LLAMA3, template=LLAMA31),
    "llama-3.2": dict(_LLAMA3, template=LLAMA32),
    "r1-distill-qwen": dict(_R1, split="qwen", tokens=_R1_QWEN_TOKENS, model_type="qwen2"),
    "r1-distill-llama": dict(_R1, split="llama3", tokens=_R1_LLAMA_TOKENS, model_type="llama", bos_post=True),
    "smollm2": dict(_CHATML, template=SMOLLM2, model_type="llama", bos="<|im_start|>", pad="<|im_end|>",
                    unk="<|endoftext|>", gen_eos=["<|im_end|>"], format="smollm2"),
    "qwen2.5": dict(_CHATML, split="qwen", template=QWEN25, model_type="qwen2", bos=None, pad="<|endoftext|>",
                    unk=None, gen_eos=["<|im_end|>", "<|endoftext|>"], format="qwen2.5"),
}

CORPUS = [
    "Hello, how are you today? I am fine, thank you very much.",
    "What is 2 + 2? The answer is 4. Let me think step by step.",
    "You are a helpful assistant. Answer the question briefly and clearly.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Solve x^2 - 5x + 6 = 0: the roots are x = 2 and x = 3, since (x-2)(x-3) = 0.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # 3",
    "  Leading spaces, trailing spaces  \n\nand blank lines\n\n\nare common in chat data.",
    "Reasoning first, then the final answer. So the result is forty-two.",
]


# Split regexes of the real tokenizer.json files (Qwen2 / Llama 3); GPT-2's is ByteLevel's built-in one.
_WORD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT = {"qwen": _WORD + r"\p{N}" + _REST, "llama3": _WORD + r"\p{N}{1,3}" + _REST}


def _train(kind: str, unk: str | None, split: str | None = None) -> Tokenizer:
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:  # transformers' Qwen2Tokenizer rebuilds exactly this pipeline, so the fixture must match it
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLIT[split]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            if split == "qwen":
                tok.normalizer = normalizers.NFC()
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:  # SentencePiece-style BPE (Phi-3): "▁" marks word starts, <unk>, <s>, </s> are ids 0, 1, 2
        tok = Tokenizer(models.BPE(unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=list(string.printable.strip()) + ["▁"])
        tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_tokenizer(family: str, folder: str | Path) -> Path:
    """Write the tokenizer files of `family` (a FAMILIES key) into folder; returns the folder."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _train(spec["kind"], spec["unk"], spec.get("split"))
    for content, special, lstrip, rstrip in spec["tokens"]:
        added = AddedToken(content, special=special, lstrip=lstrip, rstrip=rstrip, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    if spec.get("bos_post"):  # Llama 3: the post-processor prepends BOS, the template writes it too
        bos = spec["bos"]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(str(folder / "tokenizer.json"))

    decoder = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                        "single_word": t.single_word, "special": t.special}
               for i, t in sorted(tok.get_added_tokens_decoder().items())}
    config = {"add_bos_token": spec.get("add_bos_token", False), "add_eos_token": False,
              "added_tokens_decoder": decoder, "bos_token": spec["bos"], "eos_token": spec["eos"],
              "pad_token": spec["pad"], "unk_token": spec["unk"], "clean_up_tokenization_spaces": False,
              "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"}
    if spec.get("template_file"):  # Phi-4-mini-reasoning ships its template as chat_template.jinja
        (folder / "chat_template.jinja").write_text(spec["template"], encoding="utf-8")
    else:
        config["chat_template"] = spec["template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    eos_ids = [tok.token_to_id(t) for t in spec["gen_eos"]]
    gen = {"eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0]}
    if spec["bos"] is not None:
        gen["bos_token_id"] = tok.token_to_id(spec["bos"])
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    stub = {"model_type": spec["model_type"], "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "bos_token_id": gen.get("bos_token_id"), "eos_token_id": eos_ids,
            "pad_token_id": tok.token_to_id(spec["pad"]) if spec["pad"] else None}
    (folder / "config.json").write_text(json.dumps(stub, indent=2), encoding="utf-8")
    return folder


# ---- Qwen3 (issue 18) ------------------------------------------------------------------------------------

# Qwen3's chat template (Qwen/Qwen3-0.6B ... Qwen3-8B tokenizer_config.json), reconstructed from memory of the
# public file rather than copied from it: reasoning in <think> blocks, dropped from assistant turns before the
# last user query, an empty think block on a final turn without reasoning, and `enable_thinking=False`
# writing an empty think block into the generation prompt.
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Qwen3's added tokens: the ChatML specials, and the think / tool tags as plain (non-special) added tokens.
_QWEN3_TOKENS = _CHATML_TOKENS + [(t, False, False, False) for t in (
    "<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>")]


def _register_qwen3() -> None:
    FAMILIES["qwen3"] = dict(_CHATML, split="qwen", tokens=_QWEN3_TOKENS, template=QWEN3, model_type="qwen3",
                             bos=None, pad="<|endoftext|>", unk=None, gen_eos=["<|im_end|>", "<|endoftext|>"],
                             format="qwen3")


_register_qwen3()
