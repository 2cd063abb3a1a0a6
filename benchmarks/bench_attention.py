"""Packed long rows: time and peak memory of one LoRA training step (forward + backward) of a
Phi-4-mini-shaped and a Llama-3.1-8B-shaped model, ours vs the dense-mask path this project used
before (`today`) vs transformers + peft, on the same packed input, in one process.

Rows are packed with whole documents drawn from a length mix (`mix`: log-uniform 256-4096
tokens, at most T/2; `1k`: uniform 768-1280), positions restarting per document, a padding tail.
- ours:    Batch layout -> per-document SDPA on the CPU, varlen_attn (FlashAttention-2) on CUDA.
- today:   the same model with attention swapped for `dense_mask_attention` (a (B, 1, T, T) mask).
- hf:      transformers + peft, SDPA, `position_ids` only and use_cache=False (as training recipes
           set; with a cache transformers skips its detection of packed rows and runs plain causal
           attention over the row). Whether the documents were then kept apart is checked on the
           same model and batch (a document of the packed row vs that document alone) and shown
           in the row's status ("docs apart" / "docs NOT apart": then a cost floor, not our maths).
- hf-mask: transformers + peft, SDPA, with a 4-d additive document mask (the same maths as ours).

    python benchmarks/bench_attention.py                 # CUDA: full shapes, T up to 32k
    python benchmarks/bench_attention.py --cpu           # default without CUDA: 1 layer, 1/4 width
    python benchmarks/bench_attention.py --cpu --seqs 8192 --mix 1k --impls ours,today

On the CPU, width is cut to a quarter (head_dim 128 and the GQA ratio kept), depth to one layer,
vocab to 2048; memory is the step's peak resident memory above what the process held before it
(VmHWM, reset through /proc/self/clear_refs; glibc set to hand freed memory back, so the figure
follows the step's own allocations). On CUDA: torch.cuda.max_memory_allocated. The CPU
implementations take turns step by step (the machine may be shared) and the best step is kept.
Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import minidistill as md  # noqa: E402
from minidistill import attention as A  # noqa: E402
from minidistill.attention import dense_mask_attention, doc_layout  # noqa: E402
from minidistill.config import ModelConfig  # noqa: E402
from minidistill.model import Transformer  # noqa: E402

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {  # config.json fields of the real checkpoints
    "phi-4-mini": dict(model_type="phi3", vocab_size=200064, hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, rope_theta=10000.0,
                       partial_rotary_factor=0.75, max_position_embeddings=131072,
                       original_max_position_embeddings=4096, tie_word_embeddings=True, hidden_act="silu",
                       rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.5] * 48}),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=False, hidden_act="silu",
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def cpu_shape(d: dict, layers: int) -> dict:
    """A quarter of the width (heads and KV heads / 4, head_dim 128 kept), `layers` deep, vocab 2048."""
    return dict(d, hidden_size=d["hidden_size"] // 4, intermediate_size=d["intermediate_size"] // 4,
                num_attention_heads=d["num_attention_heads"] // 4, num_key_value_heads=d["num_key_value_heads"] // 4,
                head_dim=128, num_hidden_layers=layers, vocab_size=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def pack_rows(T: int, rows: int, mix: str, seed: int) -> list[list[int]]:
    """Document lengths per row: drawn from the mix while they fit; the last one takes the rest
    of the row when at least 256 tokens are left, else the row ends in padding."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        row, left = [], T
        while left > 0:
            hi = min(4096, T // 2)  # at least two documents a row
            n = int(np.exp(rng.uniform(np.log(256), np.log(hi)))) if mix == "mix" else int(rng.integers(768, 1281))
            if n <= left:
                row.append(n)
            elif left >= 256:
                row.append(left)
            else:
                break
            left = T - sum(row)
        out.append(row)
    return out


def batch(rows: list[list[int]], T: int, vocab: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    B = len(rows)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    pos, doc = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        t = 0
        for d, n in enumerate(r):
            pos[b, t: t + n], doc[b, t: t + n] = torch.arange(n), d
            t += n
        pos[b, t:], doc[b, t:] = torch.arange(T - t), len(r)
    # transformers' 4-d additive mask: same document and causal (padding: a document of its own)
    return dict(ids=ids.to(device), pos=pos.to(device), doc=doc.to(device), layout=doc_layout(rows, T).to(device))


def hf_mask(b: dict, dtype) -> torch.Tensor:
    doc, T = b["doc"], b["doc"].shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    same = (doc[:, None, :, None] == doc[:, None, None, :]) & causal  # (B, 1, T, T)
    return torch.where(same, 0.0, torch.finfo(dtype).min).to(dtype)


def build_ours(cfg_dict: dict, dtype, device, ckpt: bool):
    cfg = ModelConfig.from_hf(cfg_dict)
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            model = Transformer(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
    model.tie_weights()
    model.requires_grad_(False)
    md.apply_lora(model, md.LoraConfig(r=16, alpha=16, targets=SEVEN), verbose=False)
    model.gradient_checkpointing = ckpt
    return model.train()


def build_hf(cfg_dict: dict, dtype, device, ckpt: bool):
    import transformers
    from peft import LoraConfig, get_peft_model

    hf_cfg = transformers.AutoConfig.for_model(**cfg_dict)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n.startswith("model.layers.0.")}
    targets = [t for t in (*SEVEN, "qkv_proj", "gate_up_proj") if t in names]
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    return model.train()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _libc():
    """glibc, set so that freed memory leaves the resident set: blocks over 128 KiB always come
    from mmap (no dynamic threshold), and malloc_trim returns the rest before each step."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = None


def measure(step, device) -> tuple[float, float | None]:
    """Seconds of one `step`, and its peak memory in MiB (see the module docstring)."""
    global _LIBC
    gc.collect()
    base = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _LIBC = _LIBC or _libc()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            base = _rss_kib("VmRSS")
        except OSError:
            pass
    t = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    if device.type == "cuda":
        return sec, torch.cuda.max_memory_allocated(device) / 2**20
    return sec, None if base is None else (_rss_kib("VmHWM") - base) / 1024


def prepare(impl: str, cfg: dict, b: dict, args, device, dtype, rows: list[list[int]] | None = None,
            out: dict | None = None):
    """The step function of one implementation on batch b (for an hf row, whether it keeps the
    documents of `rows` apart goes into out["docs_apart"])."""
    model = (build_hf if impl.startswith("hf") else build_ours)(cfg, dtype, device, args.ckpt)
    g = torch.randn(1, b["ids"].shape[1], cfg["hidden_size"], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    mask = hf_mask(b, dtype) if impl == "hf-mask" else None
    if impl.startswith("hf") and rows is not None and out is not None:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out["docs_apart"] = hf_documents_apart(model, b, rows, mask)
        out["status"] += "; docs apart" if out["docs_apart"] else "; docs NOT apart (plain causal)"

    def dense(q, k, v, *, window, layout, cache=None, layer=0):
        return dense_mask_attention(q, k, v, b["doc"], window)

    def step():
        original = A.attend
        if impl == "today":
            A.attend = dense
        try:
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                if impl.startswith("hf"):
                    kw = dict(input_ids=b["ids"], position_ids=b["pos"], use_cache=False)
                    if mask is not None:
                        kw["attention_mask"] = mask
                    h = model.get_base_model().model(**kw).last_hidden_state
                else:
                    h = model(b["ids"], position_ids=b["pos"], layout=b["layout"], return_hidden=True)
                loss = (h.float() * g).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        finally:
            A.attend = original
    return step


def hf_documents_apart(model, b: dict, rows: list[list[int]], mask: torch.Tensor | None) -> bool:
    """Does the hf row keep documents apart? The hidden states of row 0's second document within
    the packed row (the hf call of `prepare`) against the same document run alone."""
    if len(rows[0]) < 2:
        return True  # one document: nothing to keep apart
    s, n = rows[0][0], rows[0][1]
    base = model.get_base_model().model
    kw = dict(input_ids=b["ids"][:1], position_ids=b["pos"][:1], use_cache=False)
    if mask is not None:
        kw["attention_mask"] = mask[:1]
    with torch.no_grad():
        packed = base(**kw).last_hidden_state[0, s:s + n].float()
        alone = base(input_ids=b["ids"][:1, s:s + n], position_ids=b["pos"][:1, s:s + n],
                     use_cache=False).last_hidden_state[0].float()
    tol = 1e-3 if packed.dtype == torch.float32 and b["ids"].device.type == "cpu" else 5e-2
    return bool(((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-6)) < tol)


def run(shape: str, impls: list[str], T: int, mix: str, args, device, dtype) -> list[dict]:
    """One row per implementation on the same packed batch. On the CPU the implementations take
    turns step by step, so that a shared machine's load falls on all of them alike; the best step
    of each is reported. On CUDA they run one after another (one model in memory at a time)."""
    cfg = SHAPES[shape] if device.type == "cuda" else cpu_shape(SHAPES[shape], args.layers)
    rows = pack_rows(T, args.batch, mix, seed=T)
    b = batch(rows, T, cfg["vocab_size"], device)
    lengths = [n for r in rows for n in r]
    out = {i: dict(shape=shape, impl=i, T=T, mix=mix, docs=len(lengths), mean_doc=int(np.mean(lengths)),
                   tokens=int(sum(lengths)), status="ok") for i in impls}
    groups = [impls] if device.type == "cpu" else [[i] for i in impls]
    for group in groups:
        steps = {}
        for i in group:
            try:
                steps[i] = prepare(i, cfg, b, args, device, dtype, rows, out[i])
            except ImportError as e:
                out[i]["status"] = f"skipped: {e.name or e} not installed"
        times: dict[str, list] = {i: [] for i in steps}
        for r in range(args.warmup + args.steps):
            for i in list(steps):
                try:
                    sec, peak = measure(steps[i], device)
                except torch.OutOfMemoryError:
                    out[i]["status"] = "out of memory"
                    del steps[i]
                    continue
                if r >= args.warmup:
                    times[i].append(sec)
                    if peak is not None:
                        out[i]["peak_mib"] = max(out[i].get("peak_mib", 0.0), peak)
        for i, ts in times.items():
            if ts:
                out[i]["step_s"] = min(ts)
        del steps
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return [out[i] for i in impls]


def attention_only(T: int, args, device) -> list[dict]:
    """CUDA: forward + backward of the attention alone, our entry point vs a direct varlen_attn call
    on the same documents (the 1.3x target), Llama-3.1-8B heads, bf16."""
    rows = pack_rows(T, args.batch, "mix", seed=T)
    lay = doc_layout(rows, T).to(device)
    q = torch.randn(args.batch, T, 32, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(args.batch, T, 8, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    flat = [t.detach().reshape(-1, t.shape[2], 128)[lay.token_index].requires_grad_() if lay.token_index is not None
            else t.detach().reshape(-1, t.shape[2], 128).requires_grad_() for t in (q, k, v)]
    varlen = A._varlen_fn()
    out = []
    for name, fn in [("ours attend", lambda: A.attend(q, k, v, window=None, layout=lay)),
                     ("varlen_attn", lambda: varlen(*flat, lay.cu_seqlens, lay.cu_seqlens, lay.max_seqlen,
                                                    lay.max_seqlen, window_size=(-1, 0), enable_gqa=True))]:
        if varlen is None:
            break
        for _ in range(args.warmup):
            measure(lambda: fn().float().sum().backward(), device)
        sec = min(measure(lambda: fn().float().sum().backward(), device)[0] for _ in range(args.steps + 5))
        out.append(dict(impl=name, T=T, step_s=sec))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="reduced shapes on the CPU (default without CUDA)")
    p.add_argument("--shapes", default="phi-4-mini,llama-3.1-8b")
    p.add_argument("--impls", default="ours,today,hf,hf-mask")
    p.add_argument("--seqs", default=None, help="comma list (default: 2048,4096,8192 on CPU; up to 32768 on CUDA)")
    p.add_argument("--mix", default="mix", help="comma list of mix, 1k")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=1, help="depth on the CPU")
    p.add_argument("--steps", type=int, default=2, help="timed steps (the best is reported)")
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    args.ckpt = not cpu  # full depth on CUDA needs recomputation at 16k-32k
    seqs = [int(s) for s in (args.seqs or ("2048,4096,8192" if cpu else "2048,4096,8192,16384,32768")).split(",")]
    rows = [r for m in args.mix.split(",") for s in args.shapes.split(",") for T in seqs
            for r in run(s, args.impls.split(","), T, m, args, device, dtype)]
    attn = [] if cpu else [r for T in seqs for r in attention_only(T, args, device)]

    dev = "cpu, %d threads" % torch.get_num_threads() if cpu else torch.cuda.get_device_name(device)
    cfgs = {s: (SHAPES[s] if not cpu else cpu_shape(SHAPES[s], args.layers)) for s in args.shapes.split(",")}
    print(f"device: {dev}; LoRA r16 on 7 projections; batch {args.batch}; {'fp32' if cpu else 'bf16'}; "
          f"best of {args.steps} step(s) after {args.warmup} warmup")
    for s, c in cfgs.items():
        print(f"  {s}: {c['num_hidden_layers']} layer(s), hidden {c['hidden_size']}, heads {c['num_attention_heads']}"
              f"/{c['num_key_value_heads']}, head_dim {c.get('head_dim', c['hidden_size'] // c['num_attention_heads'])}, "
              f"intermediate {c['intermediate_size']}")
    mem = "peak MiB" + (" (RSS)" if cpu else "")
    print(f"{'shape':13s} {'mix':4s} {'T':>6s} {'docs':>5s} {'mean':>5s} {'impl':8s} {'step s':>8s} {'x ours':>7s} "
          f"{mem:>15s}  status")
    for r in rows:
        base = next((x for x in rows if x["impl"] == "ours" and x["shape"] == r["shape"] and x["T"] == r["T"]
                     and x["mix"] == r["mix"] and x.get("step_s")), None)
        ratio = f"{r['step_s'] / base['step_s']:7.2f}" if base and r.get("step_s") else "      -"
        step = f"{r['step_s']:8.3f}" if r.get("step_s") else "       -"
        peak = f"{r['peak_mib']:15.0f}" if r.get("peak_mib") is not None else "              -"
        print(f"{r['shape']:13s} {r['mix']:4s} {r['T']:6d} {r['docs']:5d} {r['mean_doc']:5d} {r['impl']:8s} {step} "
              f"{ratio} {peak}  {r['status']}")
    for r in attn:
        print(f"attention only (llama heads, bf16): T={r['T']} {r['impl']:12s} {r['step_s'] * 1e3:8.2f} ms")
    print(json.dumps({"bench": "attention", "device": dev, "batch": args.batch, "rows": rows, "attention_only": attn}))


if __name__ == "__main__":
    main()
