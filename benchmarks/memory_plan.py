"""A lower bound on the GPU memory of a LoRA / QLoRA training step, from the model's shapes alone.

The GPU targets of issue 13 (Llama-3.1-8B QLoRA at 2 x 2048 <= 6.5 GiB, Phi-4-mini QLoRA <= 4.5 GiB)
can only be measured on a GPU (`bench_train.py --full-length`, run by gpu.sh); this script says,
without one, what no step can go below, counting only what must be allocated when the loss runs:

- weights: the blocks' linears in NF4 (bitsandbytes' layout as quant.py stores it: 4 bits a
  weight, one uint8 absmax code per 64, one fp32 scale per 256 codes) or bf16; embeddings, head
  and norms in bf16 (a tied head counted once);
- LoRA (r 16 on the seven projections, fp32): the parameters and AdamW's two moments (the
  gradients are not allocated yet: zero_grad sets them to None);
- the checkpointed block inputs, bf16, (L - 1) x rows x seq x hidden (the last block is never
  recomputed, so its input is counted among its activations, which are left out);
- the loss's chunk of logits: chunk rows x vocab x (fp32 buffer + bf16 matmul output), the rows
  from the default 256 MiB budget (chunked.chunk_rows).

Left out (so the true peak is higher): the last block's activations, the final hidden states, the
gradients, cuBLAS / Triton workspaces, allocator rounding. With `--activation-offload` the
checkpointed inputs live in host memory: the bound drops them; `--embedding-on-host` (untied models)
also drops the input embedding.

    python benchmarks/memory_plan.py                       # the two targets' models, 2 x 2048
    python benchmarks/memory_plan.py --models llama-3.1-8b --rows 1 --seq 16384

Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

import minidistill as md
from bench_train import QLORA_GIB, shape_config  # benchmarks/ is sys.path[0]
from minidistill.chunked import DEFAULT_CHUNK_BUDGET_MB, chunk_rows
from minidistill.config import ModelConfig
from minidistill.loss import _CE_BUFFERS
from minidistill.model import Transformer
from minidistill.quant import _NESTED_BLOCKSIZE

GIB = 2**30


def nf4_bytes(numel: int, blocksize: int = 64) -> int:
    """What quant.NF4Linear stores for a weight of numel elements: packed nibbles, uint8 absmax
    codes, fp32 nested scales, its 16-value code and offset (the shared 256-value map: not counted)."""
    blocks = -(-numel // blocksize)
    return (numel + 1) // 2 + blocks + 4 * -(-blocks // _NESTED_BLOCKSIZE) + 4 * 16 + 4


def meta_model(shape: dict, r: int = 16) -> Transformer:
    """The model of `shape` on the meta device (bf16), LoRA applied: shapes only, no memory."""
    cfg = ModelConfig.from_hf(dict(shape, hidden_act="silu"))
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    md.apply_lora(model, md.LoraConfig(r=r, alpha=r), verbose=False)
    return model


def plan(shape: dict, quantized: bool, rows: int, seq: int, chunk_mb: float = DEFAULT_CHUNK_BUDGET_MB) -> dict:
    """The lower bound's parts, in bytes."""
    model = meta_model(shape)
    cfg = model.config
    base = lora = 0
    for name, p in model.named_parameters():  # a tied head once
        if "lora_" in name:
            lora += p.numel()
        elif quantized and name.startswith("model.layers.") and name.endswith("_proj.weight"):
            base += nf4_bytes(p.numel())
        else:
            base += p.numel() * p.element_size()
    emb = model.model.embed_tokens.weight
    host = 0 if model.lm_head.weight is emb else emb.numel() * emb.element_size()  # what --embedding-on-host moves
    tokens = rows * seq
    ckpt = (cfg.num_hidden_layers - 1) * tokens * cfg.hidden_size * 2
    chunk = min(tokens, chunk_rows(cfg.vocab_size, cfg.hidden_size, torch.bfloat16, buffers=_CE_BUFFERS,
                                   budget_mb=chunk_mb))
    loss = chunk * cfg.vocab_size * (4 + 2)
    return dict(weights=base, lora_and_adam=lora * 4 * 3, checkpoints=ckpt, loss_chunk=loss,
                bound=base + lora * 12 + ckpt + loss, bound_offload=base + lora * 12 + loss,
                bound_offload_host=None if not host else base - host + lora * 12 + loss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(QLORA_GIB), help="comma list of bench_train.py's shapes")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--loss-chunk-mb", type=float, default=DEFAULT_CHUNK_BUDGET_MB)
    args = p.parse_args()
    out = []
    print(f"lower bound of a step's GPU memory at {args.rows} x {args.seq} tokens, GiB (bf16, LoRA r16 x 7, "
          f"gradient checkpointing)")
    print(f"{'model':14s} {'base':5s} {'weights':>8s} {'lora+adam':>9s} {'ckpt in':>8s} {'loss':>6s} {'bound':>6s} "
          f"{'offload':>7s} {'+ host emb':>10s} {'target':>6s}")
    for name in args.models.split(","):
        for quantized in (True, False):
            r = plan(shape_config(name), quantized, args.rows, args.seq, args.loss_chunk_mb)
            target = QLORA_GIB.get(name) if quantized and (args.rows, args.seq) == (2, 2048) else None
            r.update(model=name, base="nf4" if quantized else "bf16", rows=args.rows, seq=args.seq, target_gib=target)
            out.append(r)
            g = {k: r[k] / GIB for k in ("weights", "lora_and_adam", "checkpoints", "loss_chunk", "bound",
                                         "bound_offload")}
            host = "tied" if r["bound_offload_host"] is None else f"{r['bound_offload_host'] / GIB:.2f}"
            print(f"{name:14s} {r['base']:5s} {g['weights']:8.2f} {g['lora_and_adam']:9.2f} {g['checkpoints']:8.2f} "
                  f"{g['loss_chunk']:6.2f} {g['bound']:6.2f} {g['bound_offload']:7.2f} {host:>10s} "
                  f"{'-' if target is None else target:>6}")
    print(json.dumps({"bench": "memory_plan", "rows": out}))


if __name__ == "__main__":
    main()
