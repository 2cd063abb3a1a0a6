"""Training speed and memory: our LoRA / QLoRA vs transformers + peft, same shapes, one process.

Randomly initialised models with the exact shapes of Phi-4-mini (3.8B) and Llama-3.1-8B (plus
`small`, a Qwen2.5-0.5B shape for quick runs); LoRA r 16 on the seven projections, bf16,
gradient checkpointing, sequence 2048, batch 2, padded rows (lengths drawn from [T/4, T]) and
packed rows (the same samples packed, document-masked). Reports non-padding tokens/s, peak
GPU memory (torch.cuda.max_memory_allocated) and MFU, counting 4·N per token (forward + input
gradient: frozen weights need no weight gradient; recomputation not counted) plus attention
(3 × the causal forward QK and PV products).

    python benchmarks/bench_train.py                       # phi-4-mini and llama-3.1-8b on a GPU
    python benchmarks/bench_train.py --models small --steps 5
    python benchmarks/bench_train.py --smoke               # tiny shapes on CPU: proves the script runs

Prints a table, then one line of JSON. transformers + peft rows need those packages;
its QLoRA row needs bitsandbytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import minidistill as md  # noqa: E402
from minidistill.config import ModelConfig  # noqa: E402
from minidistill.model import Transformer  # noqa: E402
from minidistill.quant import NF4Linear  # noqa: E402

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {  # config.json fields of the real checkpoints (reference/checkpoints.md §1)
    "phi-4-mini": dict(model_type="phi3", vocab_size=200064, hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, rope_theta=10000.0,
                       partial_rotary_factor=0.75, max_position_embeddings=131072,
                       original_max_position_embeddings=4096, tie_word_embeddings=True,
                       rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48}),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "small": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
                  max_position_embeddings=32768, tie_word_embeddings=True),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512,
                 tie_word_embeddings=False),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def make_samples(n_rows: int, seq: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """Sample token ids with lengths uniform in [seq/4, seq], n_rows worth of padded rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 4, seq + 1, (n_rows,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def padded_batch(samples, seq):
    ids = torch.zeros(len(samples), seq, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, :len(s)], labels[i, :len(s)], mask[i, :len(s)] = s, s, 1
    return dict(ids=ids, labels=labels, mask=mask, pos=torch.arange(seq).expand_as(ids).contiguous(), doc=None,
                docs=[[len(s)] for s in samples])


def packed_batch(samples, seq):
    """First-fit pack into rows of seq tokens; positions restart and documents are masked."""
    rows: list[list[torch.Tensor]] = []
    for s in sorted(samples, key=len, reverse=True):
        row = next((r for r in rows if sum(map(len, r)) + len(s) <= seq), None)
        rows.append([s]) if row is None else row.append(s)
    T = max(sum(map(len, r)) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels, pos, doc = torch.full_like(ids, -100), torch.zeros_like(ids), torch.zeros_like(ids)
    for i, r in enumerate(rows):
        t = 0
        for d, s in enumerate(r):
            ids[i, t:t + len(s)], labels[i, t:t + len(s)] = s, s
            pos[i, t:t + len(s)], doc[i, t:t + len(s)] = torch.arange(len(s)), d
            t += len(s)
        doc[i, t:] = len(r)
    return dict(ids=ids, labels=labels, mask=None, pos=pos, doc=doc, docs=[[len(s) for s in r] for r in rows])


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that multiply every token: the block linears and the head (not the embedding)."""
    H, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = H * q + 2 * H * kv + q * H + 3 * H * cfg.intermediate_size
    return cfg.num_hidden_layers * per_layer + cfg.vocab_size * H


def step_flops(n_matmul_params: int, cfg: ModelConfig, batches) -> float:
    tokens = sum(n for b in batches for row in b["docs"] for n in row)
    attn_dim = cfg.num_attention_heads * cfg.head_dim
    pairs = sum(n * (n + 1) / 2 for b in batches for row in b["docs"] for n in row)
    return 4 * n_matmul_params * tokens + 3 * 4 * pairs * attn_dim * cfg.num_hidden_layers


def ours(cfg_dict: dict, dtype, device, quantize: bool):
    cfg = ModelConfig.from_hf(dict(cfg_dict, hidden_act="silu"))
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            model = Transformer(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
    model.tie_weights()
    model.requires_grad_(False)
    if quantize:
        for name, mod in list(model.model.layers.named_modules()):
            for child_name, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(mod, child_name, NF4Linear.from_linear(child))
        gc.collect()
    targets = tuple(t for t in SEVEN if any(n.endswith(t) for n, _ in model.named_modules())) or "all-linear"
    md.apply_lora(model, md.LoraConfig(r=16, alpha=16, targets=targets), verbose=False)
    model.gradient_checkpointing = True
    model.train()

    def loss_fn(b):
        hidden = model(b["ids"], position_ids=b["pos"], document_ids=b["doc"], return_hidden=True)
        labels = md.shift_labels(b["labels"]) if b["doc"] is None else _shift_packed(b)
        return md.chunked_cross_entropy(hidden, model.head_weight, labels).loss
    return model, cfg, loss_fn


def _shift_packed(b):
    labels = md.shift_labels(b["labels"])
    labels[md.shift_labels(b["doc"], ignore_index=-1) != b["doc"]] = -100  # no target across documents
    return labels


def hf_peft(cfg_dict: dict, dtype, device, quantize: bool):
    import transformers
    from peft import LoraConfig, get_peft_model

    hf_cfg = transformers.AutoConfig.for_model(**cfg_dict)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    if quantize:
        import bitsandbytes as bnb

        for mod in list(model.model.layers.modules()):
            for name, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    setattr(mod, name, q.to(device))
        gc.collect()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n.startswith("model.layers.0.")}
    targets = [t for t in (*SEVEN, "qkv_proj", "gate_up_proj") if t in names]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    model.train()

    def loss_fn(b):
        return model(input_ids=b["ids"], attention_mask=b["mask"], labels=b["labels"]).loss
    return model, md.ModelConfig.from_hf(dict(cfg_dict, hidden_act="silu")), loss_fn


def run(name: str, impl: str, layout: str, args, device, dtype) -> dict:
    build = {"ours-lora": (ours, False), "ours-qlora": (ours, True),
             "hf-peft-lora": (hf_peft, False), "hf-peft-qlora": (hf_peft, True)}[impl]
    if impl.startswith("hf") and layout == "packed":
        return dict(model=name, impl=impl, layout=layout, status="n/a: packing needs flash-attn in transformers")
    try:
        model, cfg, loss_fn = build[0](SHAPES[name], dtype, device, build[1])
    except ImportError as e:
        return dict(model=name, impl=impl, layout=layout, status=f"skipped: {e.name or e} not installed")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    samples = make_samples(args.batch, args.seq, SHAPES[name]["vocab_size"], seed=0)
    make = padded_batch if layout == "padded" else packed_batch
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in make(samples, args.seq).items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    tokens = sum(len(s) for s in samples)
    sec = sorted(times)[len(times) // 2]  # median step
    flops = step_flops(matmul_params(cfg), cfg, [batch])
    peak = peak_flops(device)
    row = dict(model=name, impl=impl, layout=layout, status="ok", tokens_per_s=tokens / sec, step_s=sec,
               peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
               mfu=flops / sec / peak if peak else None, loss=float(loss))
    del model, opt, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="phi-4-mini,llama-3.1-8b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--impls", default="ours-lora,ours-qlora,hf-peft-lora,hf-peft-qlora")
    p.add_argument("--layouts", default="padded,packed")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 2 steps (automatic without CUDA)")
    args = p.parse_args()
    if args.smoke or not torch.cuda.is_available():
        args.smoke, args.models, args.seq, args.batch, args.steps, args.warmup = True, "tiny", 128, 2, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = [run(m, i, l, args, device, dtype) for m in args.models.split(",") for i in args.impls.split(",")
            for l in args.layouts.split(",")]

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke: timings mean nothing)"
    print(f"device: {dev}   seq {args.seq} x batch {args.batch}, LoRA r16 on 7 projections, grad checkpointing")
    print(f"{'model':14s} {'impl':14s} {'layout':7s} {'tokens/s':>10s} {'step s':>8s} {'peak GiB':>9s} {'MFU':>6s}  status")

    def f(v, fmt):
        width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()) or 0)
        return format(v, fmt) if v is not None else "-".rjust(width)
    for r in rows:
        print(f"{r['model']:14s} {r['impl']:14s} {r['layout']:7s} {f(r.get('tokens_per_s'), '10.0f')} "
              f"{f(r.get('step_s'), '8.3f')} {f(r.get('peak_mem_gib'), '9.2f')} {f(r.get('mfu'), '6.1%')}  {r['status']}")
    print(json.dumps({"bench": "train", "device": dev, "seq": args.seq, "batch": args.batch, "rows": rows}))


if __name__ == "__main__":
    main()
