"""The offline demo: arithmetic word problems with reasoning traces, and a tiny random model.

Everything is made here, in code: the data (also bundled as examples/data/arithmetic.jsonl,
written by `python -m minidistill.demo`), a byte-level BPE tokenizer trained on it with a
ChatML chat template and atomic <think> tokens, and a randomly initialised Llama-layout
checkpoint on disk. The demo then runs the real pipeline (loader, tokenizer, data, LoRA,
loop) on that folder, so it exercises exactly what a real run does, without a network.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

DEMO_DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "arithmetic.jsonl"
DEMO_VERSION = 3  # bump when the demo model's recipe changes, so cached copies are not reused


def demo_cache() -> Path:
    """Where the demo keeps its model (and data, when examples/ is absent): $MINIDISTILL_CACHE/demo."""
    return Path(os.environ.get("MINIDISTILL_CACHE", Path.home() / ".cache" / "minidistill")) / "demo"


def demo_model_dir() -> Path:
    """The demo model's folder, built on first use."""
    return build_demo_model(demo_cache() / f"model-v{DEMO_VERSION}")

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
_THINGS = ["apples", "books", "coins", "marbles", "pens", "stamps", "cards", "shells"]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_problem(rng: random.Random) -> dict:
    """One word problem in the dolphin-r1 layout: prompt messages, reasoning, answer."""
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 20), rng.randint(1, 9)
    if rng.random() < 0.5:
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        steps, ans = f"{name} starts with {a} {thing}. {name} gets {b} more, so {a} + {b} = {a + b}.", a + b
    else:
        a = max(a, b + 1)
        q = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        steps, ans = f"{name} starts with {a} {thing}. {name} gives away {b}, so {a} - {b} = {a - b}.", a - b
    unit = thing if ans != 1 else thing[:-1]  # "1 card", "2 cards"
    return {"messages": [{"role": "user", "content": q}], "reasoning": steps,
            "answer": f"{name} has {ans} {unit}. The answer is {ans}."}


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def write_demo_data(path: str | Path = DEMO_DATA, n: int = 2000, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in make_records(n, seed):
            f.write(json.dumps(r) + "\n")
    return path


def demo_data_path(cache: Path) -> Path:
    """The bundled data file, or the same records written into `cache` when it is absent
    (an installed wheel carries the package only, not examples/)."""
    if DEMO_DATA.exists():
        return DEMO_DATA
    return write_demo_data(cache / "arithmetic.jsonl")


def build_demo_model(folder: str | Path, seed: int = 0, hidden: int = 128, layers: int = 4,
                     init_seed: int | None = None) -> Path:
    """Write a tiny randomly initialised Llama-layout checkpoint + trained tokenizer to folder.

    The tokenizer depends on `seed` only; `init_seed` (default: seed) draws the weights, so two
    folders can share a tokenizer with different weights (a teacher and a student)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return folder
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = []
    for r in make_records(2000, seed=seed + 1):
        texts += [r["messages"][0]["content"], r["reasoning"], r["answer"], "user assistant system"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=448, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens(["<think>", "</think>"])  # atomic, non-special, as in the R1 tokenizers
    return write_demo_checkpoint(folder, tok, {"bos_token": None, "eos_token": "<|im_end|>",
                                               "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE},
                                 hidden=hidden, layers=layers, seed=seed if init_seed is None else init_seed)


def write_demo_checkpoint(folder: str | Path, tok, tokenizer_config: dict, *, hidden: int = 128, layers: int = 4,
                          seed: int = 0) -> Path:
    """Write `tok` (a trained `tokenizers.Tokenizer`), its tokenizer_config.json (bos / eos / pad
    tokens, chat template) and a random Llama-layout model sized for it, with the demo's init,
    into folder: a checkpoint in the hub layout that `load_model` reads."""
    from safetensors.torch import save_file

    from .config import ModelConfig
    from .model import Transformer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "add_bos_token": False}, indent=2))
    eos = tok.token_to_id(tokenizer_config["eos_token"])
    pad = tok.token_to_id(tokenizer_config.get("pad_token") or tokenizer_config["eos_token"])
    vocab = (tok.get_vocab_size() + 63) // 64 * 64
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": hidden * 3, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": True,
              "bos_token_id": None, "eos_token_id": eos, "pad_token_id": pad, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(config))
    with torch.no_grad():
        # The head is tied to the embedding and stays frozen under LoRA, so its scale bounds how
        # confident the model can become: unit-variance embeddings with a final norm of 0.2
        # start near uniform predictions (logit std ~1.6) yet leave logits room to reach ~13,
        # where the usual std 0.02 would cap them near 1. Linears get 1/sqrt(fan_in).
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.normal_(0, 1.0)
            elif name == "model.norm.weight":
                p.fill_(0.2)
            elif not name.endswith("norm.weight"):
                p.normal_(0, p.shape[1] ** -0.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


if __name__ == "__main__":
    print(f"wrote {write_demo_data()}")
