"""How fast is NF4 dequantization (bnb layout, double quant, bf16 out) against the copy roofline,
and what does it cost a QLoRA training step on the CPU?

python benchmarks/bench_nf4.py            # CUDA: the Triton kernel on real model shapes
python benchmarks/bench_nf4.py --smoke    # tiny shapes on CPU (auto without CUDA): proves it runs
python benchmarks/bench_nf4.py --train-step [--train-layers 4]   # CPU: QLoRA step / LoRA step

The matvec rows (CUDA) time batch-1 decode of Llama-3.1-8B-shaped layers, bf16: the 4-bit
matrix-vector kernel (kernels/nf4_matvec.py) against dequantize-then-matmul (Triton decode, then
cuBLAS), per linear and for one whole block (target: the kernel >= 2x); --smoke runs one tiny
shape through the interpreter.

The train-step rows time one optimizer step (forward, chunked CE, backward, AdamW) of a
SmolLM2-135M-shaped model with random weights (hidden 576, MLP 1536, 9/3 heads, vocab 49152,
depth reduced), fp32, LoRA r16 on the seven projections, over a dense and over an NF4 base.

Bytes per element (reference/nf4.md): 0.5 packed + 1/64 uint8 absmax + 2 bf16 write ≈ 2.516,
read + write counted once each, like the copy it is compared with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

if not torch.cuda.is_available():  # the kernel runs through the interpreter on CPU; set first
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No sys.path entry for the repo root: its top-level kernels/ folder would shadow the `kernels`
# package that bitsandbytes imports (minidistill's kernels install as minidistill.kernels).
import minidistill as md  # noqa: E402
from minidistill.config import ModelConfig  # noqa: E402
from minidistill.kernels.nf4 import dequantize_nf4_lut, dequantize_nf4_reference, dequantize_nf4_triton  # noqa: E402
from minidistill.kernels.nf4_matvec import nf4_matvec, nf4_matvec_reference  # noqa: E402
from minidistill.model import Transformer  # noqa: E402
from minidistill.quant import NF4Linear, quantize_nf4  # noqa: E402

try:  # oracle only; the library never imports it
    import bitsandbytes.functional as bnbf
except ImportError:
    bnbf = None

# (name, out_features, in_features) per layer, and the layer count, of each model.
MODELS = {
    "llama-3.1-8b": (32, [("q", 4096, 4096), ("k", 1024, 4096), ("v", 1024, 4096),
                          ("o", 4096, 4096), ("gate", 14336, 4096), ("up", 14336, 4096),
                          ("down", 4096, 14336)]),
    "phi-4-mini": (32, [("qkv", 5120, 3072), ("o", 3072, 3072), ("gate_up", 16384, 3072),
                        ("down", 3072, 8192)]),
    "phi-4": (40, [("qkv", 7680, 5120), ("o", 5120, 5120), ("gate_up", 35840, 5120),
                   ("down", 5120, 17920)]),
}
BLOCKSIZE = 64


def _timer(fn, iters: int, cuda: bool) -> float:
    """Median microseconds of fn()."""
    fn()  # warm-up / compile
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, iters: int, cuda: bool, device: str) -> float:
    """GB/s of a large device copy, read + write counted."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _timer(lambda: dst.copy_(src), iters, cuda) / 1e3


def bench_rows(models: dict, device: str, iters: int, cuda: bool, impl, impl_name: str,
               copy_gbs: float) -> list[dict]:
    rows = []
    for model, (n_layers, linears) in models.items():
        quantized = []
        for name, out_f, in_f in linears:
            w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) * 0.02
            packed, state = quantize_nf4(w, BLOCKSIZE)
            bnb_q = None
            if bnbf is not None:
                bnb_q = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4",
                                           compress_statistics=True)
            del w
            quantized.append((name, out_f * in_f, packed, state, bnb_q))
        for name, numel, packed, state, bnb_q in quantized:
            us = _timer(lambda: impl(packed, state, torch.bfloat16), iters, cuda)
            rows.append(_row(model, f"{name} {state.shape[0]}x{state.shape[1]}", numel, us,
                             copy_gbs, impl_name, bnb_q, iters, cuda))

        def whole_model():  # every linear of every layer, in order (weights reused per layer)
            for _ in range(n_layers):
                for _, _, packed, state, _ in quantized:
                    impl(packed, state, torch.bfloat16)

        def whole_model_bnb():
            for _ in range(n_layers):
                for *_, (bp, bs) in quantized:
                    bnbf.dequantize_4bit(bp, bs)

        numel = n_layers * sum(q[1] for q in quantized)
        us = _timer(whole_model, max(2, iters // 5), cuda)
        bnb_us = _timer(whole_model_bnb, max(2, iters // 5), cuda) if bnbf is not None else None
        rows.append(_row(model, f"all linears x{n_layers} layers", numel, us, copy_gbs, impl_name,
                         None, iters, cuda, bnb_us=bnb_us))
    return rows


def _row(model, name, numel, us, copy_gbs, impl_name, bnb_q, iters, cuda, bnb_us=None) -> dict:
    gbs = numel * (0.5 + 1 / BLOCKSIZE + 2) / us / 1e3
    if bnb_q is not None:
        bp, bs = bnb_q
        bnb_us = _timer(lambda: bnbf.dequantize_4bit(bp, bs), iters, cuda)
    return {"model": model, "linear": name, "numel": numel, "impl": impl_name, "us": round(us, 1),
            "gbs": round(gbs, 1), "pct_copy": round(100 * gbs / copy_gbs, 1),
            "bnb_us": None if bnb_us is None else round(bnb_us, 1),
            "speedup_vs_bnb": None if bnb_us is None else round(bnb_us / us, 2)}


def matvec_rows(iters: int, cuda: bool, rows: int = 1) -> list[dict]:
    """Batch-`rows` decode through each Llama-3.1-8B linear: kernel vs decode + matmul (CUDA), or
    one tiny shape through the interpreter (CPU). Both outputs are checked against the reference."""
    device = "cuda" if cuda else "cpu"
    linears = MODELS["llama-3.1-8b"][1] if cuda else [("tiny", 96, 192)]
    out, totals = [], {"kernel": 0.0, "dequant+matmul": 0.0}
    for name, out_f, in_f in linears:
        packed, state = quantize_nf4(torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) * 0.02, BLOCKSIZE)
        x = torch.randn(rows, in_f, device=device, dtype=torch.bfloat16)
        ref = nf4_matvec_reference(x, packed, state).float()
        err = ((nf4_matvec(x, packed, state).float() - ref).abs().max() / ref.abs().max()).item()
        k_us = _timer(lambda: nf4_matvec(x, packed, state), iters, cuda)
        d_us = _timer(lambda: torch.nn.functional.linear(x, dequantize_nf4_triton(packed, state, torch.bfloat16)),
                      iters, cuda)
        totals["kernel"] += k_us
        totals["dequant+matmul"] += d_us
        out.append({"model": "llama-3.1-8b" if cuda else "tiny", "linear": f"matvec {name} {out_f}x{in_f}",
                    "rows": rows, "kernel_us": round(k_us, 1), "dequant_matmul_us": round(d_us, 1),
                    "speedup": round(d_us / k_us, 2), "rel_err": float(f"{err:.2g}")})
    if len(linears) > 1:
        out.append({"model": "llama-3.1-8b", "linear": "matvec, one block (7 linears)", "rows": rows,
                    "kernel_us": round(totals["kernel"], 1), "dequant_matmul_us": round(totals["dequant+matmul"], 1),
                    "speedup": round(totals["dequant+matmul"] / totals["kernel"], 2), "rel_err": None})
    return out


SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True, hidden_act="silu")


def _smollm2_lora(cfg: ModelConfig, nf4: bool) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.requires_grad_(False)
    if nf4:  # what load_model(quantize="nf4") does to the block linears
        for mod in list(model.model.layers.modules()):
            for name, child in list(mod.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(mod, name, NF4Linear.from_linear(child))
    return md.apply_lora(model, md.LoraConfig(r=16, alpha=16), verbose=False).train()


def train_step_rows(layers: int, batch: int, seq: int, steps: int) -> list[dict]:
    """Median seconds of one LoRA and one QLoRA optimizer step on the CPU, same model and data,
    timed alternately so that a noisy machine slows both alike."""
    cfg = ModelConfig.from_hf(dict(SMOLLM2, num_hidden_layers=layers))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = md.shift_labels(ids)
    models = {"dense": _smollm2_lora(cfg, False), "nf4": _smollm2_lora(cfg, True)}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}

    def step(base: str) -> float:
        t = time.perf_counter()
        model = models[base]
        out = md.chunked_cross_entropy(model(ids, return_hidden=True), model.head_weight, labels)
        out.loss.backward()
        opts[base].step()
        opts[base].zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"dense": [], "nf4": []}
    for i in range(steps + 1):  # the first round warms up
        for base in times:
            dt = step(base)
            if i:
                times[base].append(dt)
    rows = [{"model": f"smollm2-135m x{layers} layers", "linear": f"train step, {base} base",
             "impl": "lora" if base == "dense" else "qlora", "tokens": batch * seq,
             "step_s": round(statistics.median(t), 3)} for base, t in times.items()]
    rows[1]["qlora_over_lora"] = round(rows[1]["step_s"] / rows[0]["step_s"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (auto without CUDA)")
    ap.add_argument("--iters", type=int, default=50, help="timed repetitions per row (median)")
    ap.add_argument("--train-step", action="store_true", help="also time a LoRA vs QLoRA step on the CPU")
    ap.add_argument("--train-layers", type=int, default=4, help="depth of the SmolLM2-shaped model")
    ap.add_argument("--train-seq", type=int, default=256, help="tokens per row of the training batch")
    ap.add_argument("--train-batch", type=int, default=2, help="rows of the training batch")
    ap.add_argument("--train-steps", type=int, default=5, help="timed steps (median), after one warm-up")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 = steadier on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    if cuda:
        models, impl, impl_name = MODELS, dequantize_nf4_triton, "triton"
        copy_gbs = copy_bandwidth(2 << 30, 20, cuda, device)
        dev_name = torch.cuda.get_device_name()
    else:  # every dimension / 64, two layers: seconds, not minutes, through the reference
        models = {m: (2, [(n, o // 64, i // 64) for n, o, i in lins])
                  for m, (_, lins) in MODELS.items()}
        impl, impl_name = dequantize_nf4_lut, "torch-lut"
        copy_gbs = copy_bandwidth(64 << 20, 5, cuda, device)
        dev_name = "cpu (smoke)"
        args.iters = min(args.iters, 5)
    rows = bench_rows(models, device, args.iters, cuda, impl, impl_name, copy_gbs)
    if not cuda:  # the kernel itself, once, through the interpreter on one tiny shape
        packed, state = quantize_nf4(torch.randn(64, 48, dtype=torch.bfloat16), BLOCKSIZE)
        us = _timer(lambda: dequantize_nf4_triton(packed, state, torch.bfloat16), 2, False)
        same = torch.equal(dequantize_nf4_triton(packed, state, torch.bfloat16),
                           dequantize_nf4_reference(packed, state, torch.bfloat16))
        rows.append(_row("tiny", f"64x48 (interpreter, == ref: {same})", 64 * 48, us, copy_gbs,
                         "triton-interp", None, 2, False))

    if not cuda:  # the plain reference beside the lookup-table path, on the largest smoke shape
        w = torch.randn(16384 // 64 * 8, 3072 // 64 * 8, dtype=torch.bfloat16) * 0.02
        packed, state = quantize_nf4(w, BLOCKSIZE)
        bnb_q = None if bnbf is None else bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4",
                                                             compress_statistics=True)
        for name, fn in (("torch-ref", dequantize_nf4_reference), ("torch-lut", dequantize_nf4_lut)):
            us = _timer(lambda: fn(packed, state, torch.bfloat16), args.iters, False)
            rows.append(_row("ref vs lut", f"{state.shape[0]}x{state.shape[1]}", w.numel(), us,
                             copy_gbs, name, bnb_q, args.iters, False))
    matvec = matvec_rows(args.iters if cuda else 2, cuda)
    train = train_step_rows(args.train_layers, args.train_batch, args.train_seq, args.train_steps) \
        if args.train_step else []

    print(f"device: {dev_name}   copy bandwidth: {copy_gbs:.0f} GB/s   blocksize {BLOCKSIZE}, "
          "double quant, bf16 out")
    head = (f"{'model':<14}{'linear':<36}{'impl':<15}{'us':>11}{'GB/s':>9}{'%copy':>7}"
            f"{'bnb us':>11}{'x bnb':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        bnb_us = "-" if r["bnb_us"] is None else f"{r['bnb_us']:.1f}"
        ratio = "-" if r["speedup_vs_bnb"] is None else f"{r['speedup_vs_bnb']:.2f}"
        print(f"{r['model']:<14}{r['linear']:<36}{r['impl']:<15}{r['us']:>11.1f}{r['gbs']:>9.1f}"
              f"{r['pct_copy']:>7.1f}{bnb_us:>11}{ratio:>7}")
    print(f"\nbatch-1 decode, bf16: the 4-bit matvec kernel vs dequantize-then-matmul"
          f"{'' if cuda else ' (interpreter: proves it runs, not a speed)'}; target >= 2x on a GPU")
    print(f"{'model':<14}{'linear':<36}{'kernel':>14}{'dequant+mm':>14}{'x':>8}")
    for r in matvec:
        err = "" if r["rel_err"] is None else f"   rel err {r['rel_err']:.1e}"
        print(f"{r['model']:<14}{r['linear']:<36}{r['kernel_us']:>11.1f} us{r['dequant_matmul_us']:>11.1f} us"
              f"{r['speedup']:>7.2f}x{err}")
    if train:
        print(f"\nCPU training step, batch {args.train_batch} x {args.train_seq} tokens, fp32, LoRA r16 x 7 projections")
        for r in train:
            ratio = f"   qlora / lora = {r['qlora_over_lora']:.2f}" if "qlora_over_lora" in r else ""
            print(f"{r['model']:<28}{r['linear']:<24}{r['step_s']:>9.3f} s{ratio}")
    print(json.dumps({"bench": "nf4_dequant", "device": dev_name, "copy_gbs": round(copy_gbs, 1),
                      "rows": rows, "matvec": matvec, "train_step": train}))


if __name__ == "__main__":
    main()
