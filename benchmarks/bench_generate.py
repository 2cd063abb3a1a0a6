"""How fast is batched generation on mixed prompt lengths: ours (ragged rows), our previous
length-grouped batching, and transformers `generate` with left padding, on one random model?

python benchmarks/bench_generate.py                      # SmolLM2-135M shape, CPU, a few minutes
python benchmarks/bench_generate.py --smoke              # a tiny shape: proves it runs

Every method decodes the same prompts greedily; tokens/s = new tokens / wall time, prefill
included. Scenario "fixed": no stop token, every reply is --max-new-tokens long (pure decode
speed). Scenario "eos": a set of stop ids ends the replies at varied lengths, as end-of-turn
tokens do (a random model's greedy tokens are near uniform, so a stop set of 2 / max_new of the
vocabulary gives geometric lengths). transformers gets the prompts in the same order, in chunks
of the batch size, left padded with an attention mask (what its docs recommend for batched
generation); its finished rows are padded until the chunk ends, as `generate` does. "grouped" is
the generate_ids_batch of before the ragged decoder (prompts batched only with prompts of the
same token length), its behaviour kept here. Greedy tokens are compared with transformers' as a
check that every method computed the same thing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

import minidistill as md
from minidistill import sampling

try:  # oracle only; the library never imports it
    import transformers
except ImportError:
    transformers = None

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json), random weights.
SMOLLM2 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
               intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
               tie_word_embeddings=True, hidden_act="silu", torch_dtype="float32",
               bos_token_id=0, eos_token_id=0, pad_token_id=0)
TINY = dict(SMOLLM2, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def write_model(hub_config: dict, folder: str):
    cfg = transformers.AutoConfig.for_model(**hub_config)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if name.endswith("norm.weight") else p.normal_(0, 0.05)
    ref.save_pretrained(folder, safe_serialization=True)
    ref.generation_config.eos_token_id = None  # no early stop: every method generates max_new_tokens
    return ref.eval()


# ---- our previous batching (before the ragged decoder), its behaviour kept as it was ----------
def _grouped_rows(model, rows, max_new_tokens, stop):
    """One batch of same-length prompts: no padding; finished rows leave the batch."""
    device = model.model.embed_tokens.weight.device
    cache = model.new_cache(len(rows), len(rows[0]) + max_new_tokens)
    logits = model(torch.tensor(rows, device=device), cache=cache)[:, -1]
    stop_t = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    out, live = [[] for _ in rows], list(range(len(rows)))
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        stopped = torch.isin(nxt, stop_t).tolist()
        for j, (r, tok) in enumerate(zip(live, nxt.tolist())):
            if not stopped[j]:
                out[r].append(tok)
        keep = [i for i, x in enumerate(stopped) if not x]
        if step == max_new_tokens - 1 or not keep:
            break
        if len(keep) < len(live):
            idx = torch.tensor(keep, device=device)
            cache.k = [k.index_select(0, idx) for k in cache.k]
            cache.v = [v.index_select(0, idx) for v in cache.v]
            live, nxt = [live[i] for i in keep], nxt[idx]
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return out


@torch.no_grad()
def grouped_generate(model, prompts, max_new_tokens, batch_size, stop):
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    results = [None] * len(prompts)
    for length in sorted(groups):
        idxs = groups[length]
        for b in range(0, len(idxs), batch_size):
            chunk = idxs[b: b + batch_size]
            for i, o in zip(chunk, _grouped_rows(model, [prompts[i] for i in chunk], max_new_tokens, stop)):
                results[i] = o
    return results


@torch.no_grad()
def hf_generate(ref, prompts, max_new_tokens, batch_size, stop):
    out = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b: b + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        gen = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=0, eos_token_id=sorted(stop) or None)
        for row in gen[:, width:].tolist():  # a finished row is padded to the batch's end: cut at its stop id
            out.append(next((row[:i] for i, t in enumerate(row) if t in stop), row))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32, help="prompts per row of the table (default: %(default)s)")
    p.add_argument("--min-len", type=int, default=4, help="shortest prompt, tokens (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=96, help="longest prompt, tokens (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="default: %(default)s")
    p.add_argument("--batch-sizes", default="1,8,32", help="default: %(default)s")
    p.add_argument("--batch1-prompts", type=int, default=8,
                   help="prompts timed at batch 1 (one at a time: fewer keep the run short; default: %(default)s)")
    p.add_argument("--scenarios", default="fixed,eos", help="fixed: every reply max_new_tokens long; eos: replies "
                   "end at a stop id, at varied lengths (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="time each row this many times, keep the best (a shared "
                                                          "machine is noisy; default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is; on a shared CPU, 1 "
                                                          "avoids the thread-spinning slowdowns of 2 busy cores)")
    p.add_argument("--smoke", action="store_true", help="tiny shape: proves the script runs")
    args = p.parse_args()
    if transformers is None:
        raise SystemExit("this benchmark compares with transformers: pip install transformers")
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    hub = TINY if args.smoke else SMOLLM2
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(1, hub["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    n_new, V = args.max_new_tokens, hub["vocab_size"]
    # A random model's greedy tokens are close to uniform: a stop set of V / (n_new / 2) random ids
    # ends replies at geometrically spread lengths (mean about n_new / 2), like end-of-turn tokens do.
    eos = set(torch.randperm(V - 1, generator=g)[: max(1, 2 * V // n_new)].add(1).tolist())
    folder = tempfile.mkdtemp(prefix="bench_generate_")
    ref = write_model(hub, folder)
    model = md.load_model(folder, dtype=torch.float32)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    impls = {"ours": lambda ps, bs, stop: sampling.generate_ids_batch(model, ps, max_new_tokens=n_new, batch_size=bs,
                                                                        stop_ids=stop),
             "transformers": lambda ps, bs, stop: hf_generate(ref, ps, n_new, bs, stop),
             "ours, length-grouped (before)": lambda ps, bs, stop: grouped_generate(model, ps, n_new, bs, stop)}
    for fn in impls.values():
        fn(prompts[:2], 2, eos)  # warm-up
    rows = []
    for scenario in args.scenarios.split(","):
        stop = eos if scenario == "eos" else set()
        for bs in sizes:
            ps = prompts[:args.batch1_prompts] if bs == 1 else prompts
            results = {}
            for name, fn in impls.items():
                if name.startswith("ours, length") and bs != max(sizes):
                    continue
                sec = float("inf")
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    results[name] = fn(ps, bs, stop)
                    sec = min(sec, time.perf_counter() - t)
                n_tok = sum(map(len, results["ours"]))  # every row counts the same tokens
                rows.append({"scenario": scenario, "batch": bs, "impl": name, "prompts": len(ps),
                             "new_tokens": n_tok, "seconds": round(sec, 2), "tokens_per_s": round(n_tok / sec, 1)})
                print(f"  {scenario}, batch {bs}, {name}: {sec:.1f} s", file=sys.stderr, flush=True)
            want = results["transformers"]
            for r in rows[-len(results):]:
                got = results[r["impl"]]
                same = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y)) if \
                    [len(x) for x in got] == [len(y) for y in want] else 0
                r["same_as_transformers"] = f"{same}/{sum(map(len, want))}"
    print(f"model: {'tiny' if args.smoke else 'SmolLM2-135M shape'}, random weights, fp32, "
          f"{torch.get_num_threads()} thread(s); {args.prompts} prompts of {args.min_len}-{args.max_len} tokens "
          f"(mean {sum(lengths) / len(lengths):.0f}); up to {n_new} new tokens, greedy")
    print("| scenario | batch | impl | prompts | new tokens | seconds | tokens/s | greedy tokens = transformers |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['batch']} | {r['impl']} | {r['prompts']} | {r['new_tokens']} | {r['seconds']} "
              f"| {r['tokens_per_s']} | {r['same_as_transformers']} |")
    by = {(r["scenario"], r["batch"], r["impl"]): r["tokens_per_s"] for r in rows}
    top, summary = max(sizes), {"rows": rows}
    for scenario in args.scenarios.split(","):
        vs_hf = by[scenario, top, "ours"] / by[scenario, top, "transformers"]
        vs_old = by[scenario, top, "ours"] / by[scenario, top, "ours, length-grouped (before)"]
        summary[f"{scenario}_ours_vs_transformers_at_{top}"] = round(vs_hf, 2)
        summary[f"{scenario}_ours_vs_grouped_at_{top}"] = round(vs_old, 2)
        print(f"{scenario}: ours / transformers at batch {top}: {vs_hf:.2f}x; ours / length-grouped: {vs_old:.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
