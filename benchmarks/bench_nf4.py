"""How fast is NF4 dequantization (bnb layout, double quant, bf16 out) against the copy roofline?

python benchmarks/bench_nf4.py            # CUDA: the Triton kernel on real model shapes
python benchmarks/bench_nf4.py --smoke    # tiny shapes on CPU (auto without CUDA): proves it runs

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

from minidistill.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference  # noqa: E402
from minidistill.quant import quantize_nf4  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (auto without CUDA)")
    ap.add_argument("--iters", type=int, default=50, help="timed repetitions per row (median)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    if cuda:
        models, impl, impl_name = MODELS, dequantize_nf4, "triton"
        copy_gbs = copy_bandwidth(2 << 30, 20, cuda, device)
        dev_name = torch.cuda.get_device_name()
    else:  # every dimension / 64, two layers: seconds, not minutes, through the reference
        models = {m: (2, [(n, o // 64, i // 64) for n, o, i in lins])
                  for m, (_, lins) in MODELS.items()}
        impl, impl_name = dequantize_nf4_reference, "torch-ref"
        copy_gbs = copy_bandwidth(64 << 20, 5, cuda, device)
        dev_name = "cpu (smoke)"
        args.iters = min(args.iters, 5)
    rows = bench_rows(models, device, args.iters, cuda, impl, impl_name, copy_gbs)
    if not cuda:  # the kernel itself, once, through the interpreter on one tiny shape
        packed, state = quantize_nf4(torch.randn(64, 48, dtype=torch.bfloat16), BLOCKSIZE)
        us = _timer(lambda: dequantize_nf4(packed, state, torch.bfloat16), 2, False)
        same = torch.equal(dequantize_nf4(packed, state, torch.bfloat16),
                           dequantize_nf4_reference(packed, state, torch.bfloat16))
        rows.append(_row("tiny", f"64x48 (interpreter, == ref: {same})", 64 * 48, us, copy_gbs,
                         "triton-interp", None, 2, False))

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
    print(json.dumps({"bench": "nf4_dequant", "device": dev_name, "copy_gbs": round(copy_gbs, 1),
                      "rows": rows}))


if __name__ == "__main__":
    main()
