"""Logit parity of the loader + decoder against transformers, for every family and rope variant."""

import contextlib
import json

import pytest
import torch

import minidistill as md
from model_fixtures import CONFIGS, rel_err, write_checkpoint

transformers = pytest.importorskip("transformers")


def ids(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CONFIGS["llama3"]["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


# (config, sequence lengths): long inputs cross original_max_position_embeddings (64 for llama3,
# 32 for the LongRoPE ones, where the long factors take over) and the sliding windows.
CASES = [
    ("llama3", [9, 150]),
    ("llama3-tied", [9, 150]),
    ("phi3.5", [20, 50]),
    ("phi4-mini", [20, 33, 70]),
    ("phi4", [9, 100]),
    ("phi3-window", [5, 30]),
    ("qwen2", [9, 60]),
    ("mistral", [5, 40]),
    ("qwen3", [9, 150]),  # past its 128 positions too
    ("qwen3-untied", [9, 40]),
]


@pytest.mark.parametrize("name,lengths", CASES, ids=[c[0] for c in CASES])
def test_logits_match_transformers(tmp_path, name, lengths):
    ref = write_checkpoint(tmp_path, name)
    model = md.load_model(tmp_path, dtype=torch.float32)
    for n in lengths:
        x = ids(n)
        with torch.no_grad():
            want = ref(x).logits
            got = model(x)
        assert got.shape == want.shape == (2, n, CONFIGS[name]["vocab_size"])
        assert rel_err(got, want) <= 1e-4, f"{name} T={n}: rel err {rel_err(got, want):.2e}"


@pytest.mark.parametrize("name", ["llama3", "phi4-mini"])
def test_new_rope_parameters_layout_and_shards(tmp_path, name):
    # transformers' own save_pretrained writes `rope_parameters`; sharded via an index.
    ref = write_checkpoint(tmp_path, name, shard=True, hub_layout=False)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    model = md.load_model(tmp_path, dtype=torch.float32)
    x = ids(45)
    with torch.no_grad():
        assert rel_err(model(x), ref(x).logits) <= 1e-4


def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_checkpoint(tmp_path, "llama3")
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.down_proj.weight'\].*unexpected keys \['model.layers.0.extra.weight'\]"):
        md.load_model(tmp_path, dtype=torch.float32)


def test_no_safetensors_is_refused(tmp_path):
    write_checkpoint(tmp_path, "llama3")
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        md.load_model(tmp_path)


def test_dtype_and_tied_head(tmp_path):
    write_checkpoint(tmp_path, "phi4-mini")
    model = md.load_model(tmp_path, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)


@pytest.mark.parametrize("name", ["llama3", "phi4-mini", "phi3-window", "qwen2", "qwen3"])
def test_kv_cache_matches_full_forward(tmp_path, name):
    write_checkpoint(tmp_path, name)
    model = md.load_model(tmp_path, dtype=torch.float32)
    x = ids(24)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 32)
        steps = [model(x[:, :10], cache=cache)]  # prefill, then chunks of 1 and 3 tokens
        for s, e in [(10, 11), (11, 14)] + [(i, i + 1) for i in range(14, 24)]:
            steps.append(model(x[:, s:e], cache=cache))
    assert cache.pos == 24
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


@pytest.mark.parametrize("name", ["llama3", "phi4-mini", "qwen3"])
def test_keep_runs_the_last_block_past_attention_for_the_kept_tokens_only(tmp_path, name):
    # A prefill wants each prompt's last token: keep gives those outputs (the same as slicing the full
    # forward), and the cache still holds every token's keys (the next step equals a full forward).
    write_checkpoint(tmp_path, name)
    model = md.load_model(tmp_path, dtype=torch.float32)
    x = ids(12, batch=3)
    keep = torch.tensor([11, 12 + 4, 35, 0])  # row-major flat indices into (3, 12), in any order
    with torch.no_grad():
        full = model(x)  # (3, 12, V)
        got = model(x, keep=keep)
        assert got.shape == (4, full.shape[-1]) and rel_err(got, full.flatten(0, 1)[keep]) <= 1e-5
        assert rel_err(model(x, keep=keep, return_hidden=True),
                       model(x, return_hidden=True).flatten(0, 1)[keep]) <= 1e-5
        cache = model.new_cache(3, 13)
        model(x, cache=cache, keep=keep)
        nxt = ids(1, batch=3, seed=5)
        assert rel_err(model(nxt, cache=cache)[:, 0], model(torch.cat([x, nxt], 1))[:, -1]) <= 1e-5
    seen = []  # the last block's o_proj and MLP saw 4 rows, the others all 36
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[:-1].numel()))
             for m in (model.model.layers[0].mlp.down_proj, model.model.layers[-1].self_attn.o_proj,
                       model.model.layers[-1].mlp.down_proj)]
    with torch.no_grad():
        model(x, keep=keep)
    assert seen == [36, 4, 4]
    for h in hooks:
        h.remove()


def test_hidden_path_and_packed_documents(tmp_path):
    write_checkpoint(tmp_path, "qwen2")
    model = md.load_model(tmp_path, dtype=torch.float32)
    a, b = ids(7, batch=1, seed=3), ids(5, batch=1, seed=4)
    with torch.no_grad():
        hidden = model(a, return_hidden=True)
        assert torch.allclose(model.lm_head(hidden), model(a), atol=1e-6)
        # Two samples packed in one row: positions restart, attention stays within a sample.
        packed = torch.cat([a, b], dim=1)
        pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
        doc = torch.tensor([[0] * 7 + [1] * 5])
        out = model(packed, position_ids=pos, document_ids=doc)
        assert rel_err(out[:, :7], model(a)) <= 1e-5
        assert rel_err(out[:, 7:], model(b)) <= 1e-5


def test_gradient_checkpointing_same_gradients(tmp_path):
    write_checkpoint(tmp_path, "phi4-mini")
    model = md.load_model(tmp_path, dtype=torch.float32).train()
    x = ids(12)
    grads, recomputed = [], []
    for flag, every in ((False, 1), (True, 1), (True, 2)):  # off, every block, every other block
        model.zero_grad()
        model.gradient_checkpointing, model.checkpoint_every = flag, every
        calls = []
        hooks = [b.register_forward_pre_hook(lambda m, i, k=k: calls.append(k)) for k, b in enumerate(model.model.layers)]
        model(x).logsumexp(-1).mean().backward()
        for h in hooks:
            h.remove()
        recomputed.append(sorted(set(k for k in calls if calls.count(k) > 1)))
        grads.append(model.model.layers[0].mlp.down_proj.weight.grad.clone())
    assert all(torch.allclose(grads[0], g, atol=1e-6) for g in grads[1:])
    n = len(model.model.layers)
    # which blocks ran again in backward: never the last one (backward would rebuild it first thing)
    assert recomputed == [[], list(range(n - 1)), list(range(0, n - 1, 2))]



def test_an_outer_saved_tensor_hook_holds_everything_a_checkpointed_step_keeps(tmp_path):
    # --activation-offload is torch's save_on_cpu around the forward: it frees device memory only if
    # every tensor backward needs reaches its pack hook, the checkpointed block inputs included, and
    # nothing else keeps them alive. A hook that packs a copy stands in for the host copy here.
    import gc
    import weakref

    write_checkpoint(tmp_path, "llama3")
    model = md.load_model(tmp_path, dtype=torch.float32).train()
    md.apply_lora(model, md.LoraConfig(r=4, alpha=8), verbose=False)
    for p in (p for n, p in model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(p, std=0.1)  # B = 0 would give A no gradient to compare
    model.gradient_checkpointing = True
    x = ids(12)
    grads = []
    for hooked in (False, True):
        model.zero_grad(set_to_none=True)
        inputs = []
        pre = [b.register_forward_pre_hook(lambda m, a: inputs.append(weakref.ref(a[0])) if len(inputs) < len(
            model.model.layers) else None) for b in model.model.layers]
        with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t) if hooked else contextlib.nullcontext():
            loss = model(x).logsumexp(-1).mean()
        for h in pre:
            h.remove()
        gc.collect()
        if hooked:
            assert len(inputs) == len(model.model.layers)
            assert all(r() is None for r in inputs), [r() is None for r in inputs]  # only the copies are left
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])



def test_embedding_on_host_refuses_a_tied_or_trainable_embedding(tmp_path):
    write_checkpoint(tmp_path / "tied", "llama3-tied")
    with pytest.raises(ValueError, match="tied to the output head"):
        md.load_model(tmp_path / "tied", dtype=torch.float32).embedding_on_host()
    write_checkpoint(tmp_path / "untied", "llama3")
    model = md.load_model(tmp_path / "untied", dtype=torch.float32)
    model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable rows"):
        model.embedding_on_host()
    model.model.embed_tokens.weight.requires_grad_(False)
    from minidistill.sampling import generate_ids

    x = ids(9)
    with torch.no_grad():
        want, want_ids = model(x), generate_ids(model, [5, 9, 3, 7], max_new_tokens=6)
        assert model.embedding_on_host() is model and not model.host_embedding  # all of it is on the host here
        assert model.model.embed_tokens.weight.device.type == "cpu" and model.device.type == "cpu"
        # on the CPU the lookup is the embedding's own
        assert torch.equal(model(x), want) and generate_ids(model, [5, 9, 3, 7], max_new_tokens=6) == want_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_embedding_on_host_gives_the_same_step_on_cuda_and_no_more_host_syncs(tmp_path):
    from minidistill.batches import make_batches
    from minidistill.samples import DataSummary, Sample, SFTData
    from minidistill.sampling import generate_ids
    from sync_count import CountSyncs

    write_checkpoint(tmp_path, "llama3")
    rows = []
    for host in (False, True):
        torch.manual_seed(0)
        model = md.load_model(tmp_path, dtype=torch.bfloat16, device="cuda").train()
        md.apply_lora(model, md.LoraConfig(r=4, alpha=8), verbose=False)
        for p in (p for n, p in model.named_parameters() if "lora_B" in n):
            torch.nn.init.normal_(p, std=0.1)
        if host:
            model.embedding_on_host()
            assert model.model.embed_tokens.weight.device.type == "cpu" and model.device.type == "cuda"
            assert model.host_embedding
        samples = [Sample(ids(n, batch=1, seed=n)[0].numpy(), ids(n, batch=1, seed=n)[0].numpy()) for n in (7, 12, 5)]
        b = make_batches(SFTData(samples, DataSummary()), 2, 16)[0].pin()
        torch.cuda.synchronize()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                h = model(**b.model_inputs("cuda", host_ids=host), return_hidden=True)
            h.float().square().mean().backward()
            return h
        with CountSyncs() as mode:
            h = step()
        rows.append(mode.seen)  # the same with the embedding on the host: its ids never come back from the GPU
        rows.append((h.detach().float().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters()
                                                if p.grad is not None}))
        rows.append(generate_ids(model.eval(), [5, 9, 3, 7], max_new_tokens=6))  # its cache on the blocks' device
    syncs, (h, grads), gen, syncs_host, (h_host, grads_host), gen_host = rows
    assert syncs_host == syncs and torch.equal(h, h_host) and gen == gen_host
    assert grads.keys() == grads_host.keys() and all(torch.equal(grads[n], grads_host[n]) for n in grads)


# ---------------------------------------------------------------------------- packed rows

def packed(rows, T, seed=7):
    """A (B, T) packed batch of random documents: ids, positions, layout, and each document alone."""
    from minidistill.attention import doc_layout

    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros_like(ids)
    docs = []  # (row, start, ids (1, n))
    for b, r in enumerate(rows):
        t = 0
        for n in r:
            ids[b, t: t + n] = torch.randint(3, 96, (n,), generator=g)
            pos[b, t: t + n] = torch.arange(n)
            docs.append((b, t, ids[b:b + 1, t: t + n]))
            t += n
    return ids, pos, doc_layout(rows, T), docs


# Documents of length 1, one filling its row, padding at the end; with the LongRoPE configs (original
# context 32) documents on both sides of it; windows (7, 9) shorter than the long documents.
@pytest.mark.parametrize("name", ["llama3", "phi4-mini", "phi3.5", "phi3-window", "mistral", "qwen2", "qwen3",
                                  "llama-yarn"])
def test_packed_rows_match_transformers_per_document(tmp_path, name):
    ref = write_checkpoint(tmp_path, name)
    model = md.load_model(tmp_path, dtype=torch.float32)
    rows, T = [[1, 12, 40, 3], [50, 1], [56]], 56
    ids, pos, layout, docs = packed(rows, T)
    with torch.no_grad():
        out = model(ids, position_ids=pos, layout=layout)
        for b, t, x in docs:
            want = ref(x).logits[0]
            got = out[b, t: t + x.shape[1]]
            assert rel_err(got, want) <= 1e-4, f"{name} doc of {x.shape[1]} at ({b}, {t}): {rel_err(got, want):.2e}"


def test_longrope_choice_per_document_differs_from_transformers_batch_max(tmp_path):
    # A 40-token and a 20-token document in one row, original context 32. Run alone, the 20-token
    # one gets the short factors. transformers, even told where the documents are (a 4-d mask),
    # picks the factors from the largest position in the batch: long ones for both.
    ref = write_checkpoint(tmp_path, "phi4-mini")
    model = md.load_model(tmp_path, dtype=torch.float32)
    ids, pos, layout, docs = packed([[40, 20]], 60)
    doc = torch.tensor([[0] * 40 + [1] * 20])
    same = (doc[:, None, :, None] == doc[:, None, None, :]) & torch.ones(60, 60, dtype=torch.bool).tril()
    mask = torch.where(same, 0.0, torch.finfo(torch.float32).min)  # (1, 1, 60, 60) additive
    with torch.no_grad():
        theirs = ref(ids, position_ids=pos, attention_mask=mask).logits
        ours = model(ids, position_ids=pos, layout=layout)
        long_alone, short_alone = ref(docs[0][2]).logits, ref(docs[1][2]).logits
        from_ids = model(ids, position_ids=pos, document_ids=doc)  # the layout derived from document_ids
    assert rel_err(ours[:, :40], long_alone) <= 1e-4 and rel_err(theirs[:, :40], long_alone) <= 1e-4
    assert rel_err(ours[:, 40:], short_alone) <= 1e-4  # what the document gets at inference
    assert rel_err(theirs[:, 40:], short_alone) > 0.1  # transformers: long factors, from the batch max
    assert rel_err(from_ids[:, 40:], short_alone) <= 1e-4  # per document as well


def test_longrope_short_documents_agree_with_transformers(tmp_path):
    ref = write_checkpoint(tmp_path, "phi4-mini")
    model = md.load_model(tmp_path, dtype=torch.float32)
    ids, pos, layout, docs = packed([[20, 12], [9]], 32)
    with torch.no_grad():
        out = model(ids, position_ids=pos, layout=layout)
        for b, t, x in docs:
            assert rel_err(out[b, t: t + x.shape[1]], ref(x).logits[0]) <= 1e-4


def test_layout_errors_name_the_shapes(tmp_path):
    from minidistill.attention import doc_layout

    write_checkpoint(tmp_path, "llama3")
    model = md.load_model(tmp_path, dtype=torch.float32)
    x = ids(8)
    with pytest.raises(ValueError, match=r"layout of shape \(1, 8\).*got \(2, 8\)"):
        model(x, position_ids=torch.arange(8).expand(2, 8), layout=doc_layout([[8]], 8))
    cache = model.new_cache(2, 16)
    cache.pos = 4
    with pytest.raises(ValueError, match="cannot be used with a KV cache that already holds keys"):
        model(x, position_ids=torch.arange(8).expand(2, 8), layout=doc_layout([[8], [8]], 8), cache=cache)


CUDA_BF16 = pytest.param("cuda", torch.bfloat16, 2e-2, id="cuda-bf16-varlen", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])


@pytest.mark.parametrize("device, dtype, tol", [pytest.param("cpu", torch.float32, 1e-5, id="cpu-fp32"), CUDA_BF16])
@pytest.mark.parametrize("name", ["llama3", "phi3-window", "phi4-mini"])
def test_packed_prefill_keeps_each_prompts_keys_at_its_columns(tmp_path, name, device, dtype, tol):
    """A layout with an empty cache: every prompt's keys, values and hidden states as if prefilled alone."""
    from minidistill.attention import doc_layout

    write_checkpoint(tmp_path, name)
    model = md.load_model(tmp_path, dtype=dtype).to(device)
    lengths = [5, 1, 12, 40]  # phi3-window: a window of 7, shorter than two; phi4-mini: 40 past LongRoPE's 32
    prompts = [ids(n, batch=1, seed=i)[0].tolist() for i, n in enumerate(lengths)]
    n = sum(lengths)
    flat = torch.tensor([[t for p in prompts for t in p]], device=device)
    pos = torch.tensor([[i for p in prompts for i in range(len(p))]], device=device)
    cache = model.new_cache(1, n)
    with torch.no_grad():
        hidden = model(flat, position_ids=pos, layout=doc_layout([lengths], n).to(device), cache=cache,
                       return_hidden=True)
        assert cache.pos == n
        at = 0
        for p in prompts:
            alone = model.new_cache(1, len(p))
            want = model(torch.tensor([p], device=device), cache=alone, return_hidden=True)
            assert rel_err(hidden[0, at:at + len(p)], want[0]) < tol
            for layer in range(model.config.num_hidden_layers):
                assert rel_err(cache.k[layer][0, :, at:at + len(p)], alone.k[layer][0]) < tol
                assert rel_err(cache.v[layer][0, :, at:at + len(p)], alone.v[layer][0]) < tol
            at += len(p)


def test_linear_group_hook_gets_projections_sharing_an_input(tmp_path):
    from minidistill.model import linear_group

    calls = []

    class Grouped(torch.nn.Linear):
        @staticmethod
        def group_forward(x, mods):
            calls.append(tuple(type(m).__name__ for m in mods))
            return [torch.nn.functional.linear(x, m.weight, m.bias) for m in mods]

    write_checkpoint(tmp_path, "qwen2")
    model = md.load_model(tmp_path, dtype=torch.float32)
    x = ids(6)
    with torch.no_grad():
        want = model(x)
        for block in model.model.layers:
            for mod in (block.self_attn, block.mlp):
                for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                    if hasattr(mod, name):
                        lin = getattr(mod, name)
                        g = Grouped(lin.in_features, lin.out_features, bias=lin.bias is not None)
                        g.load_state_dict(lin.state_dict())
                        setattr(mod, name, g)
        got = model(x)
    assert calls == [("Grouped",) * 3, ("Grouped",) * 2] * 2  # q/k/v, then gate/up, per layer
    assert torch.allclose(got, want, atol=1e-6)
    single = torch.nn.Linear(4, 3)
    assert torch.equal(linear_group(torch.ones(2, 4), [single])[0], single(torch.ones(2, 4)))


# ---------------------------------------------------------------------------- qwen3

def test_qwen3_layout_and_norms_matter(tmp_path):
    ref = write_checkpoint(tmp_path, "qwen3-untied")
    model = md.load_model(tmp_path, dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 24, 64) and attn.k_proj.weight.shape == (2 * 24, 64)  # head_dim 24
    assert attn.q_proj.bias is None and attn.o_proj.bias is None
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (24,)
    assert torch.equal(attn.k_norm.weight, ref.model.layers[0].self_attn.k_norm.weight)  # hub key names
    x = ids(20)
    with torch.no_grad():
        want = model(x)
        attn.k_norm.weight.fill_(1.0)  # the norm's weights take part: a check that can fail
        assert rel_err(model(x), want) > 1e-2


def test_qwen3_sliding_window_layers_match_transformers(tmp_path):
    ref = write_checkpoint(tmp_path, "qwen3", use_sliding_window=True, sliding_window=6, max_window_layers=1)
    model = md.load_model(tmp_path, dtype=torch.float32)
    assert [b.self_attn.window for b in model.model.layers] == [None, 6]
    x = ids(30)
    with torch.no_grad():
        assert rel_err(model(x), ref(x).logits) <= 1e-4
