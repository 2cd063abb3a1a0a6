"""Compiled blocks (`Transformer.compile_blocks`): no graph breaks in a LoRA block on packed rows,
gradients equal to eager ones, no recompilation when row lengths or packings change."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import minidistill as md
from minidistill import attention as A
from minidistill import doc_attention as D
from minidistill.attention import doc_layout
from minidistill.config import ModelConfig
from minidistill.model import Transformer
from model_fixtures import randomise_lora
from test_attention import packed_batch


def lora_model(dropout=0.0, layers=2, window=None, seed=0) -> Transformer:
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=112,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      sliding_window=window)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    md.apply_lora(model, md.LoraConfig(r=4, alpha=8, dropout=dropout), verbose=False)
    randomise_lora(model)
    return model.train()


def packed(rows, T, seed=0):
    """ids, position_ids (restarting per document) and the layout of packed rows."""
    ids, pos, _ = packed_batch(rows, T, seed)
    return ids, pos, doc_layout(rows, T)


@pytest.mark.parametrize("dropout,ckpt", [(0.0, False), (0.1, False), (0.0, True)],
                         ids=["lora", "lora-dropout", "lora-checkpointed"])
def test_lora_block_on_packed_rows_has_no_graph_break(dropout, ckpt):
    model = lora_model(dropout, layers=1)
    block = model.model.layers[0]
    T = 48
    _, pos, lay = packed([[20, 13], [5, 30]], T)
    x = torch.randn(2, T, 64, requires_grad=True)
    cos, sin = model.rotary(pos, x.dtype, lay.doc_len)

    def fn(x):
        if ckpt:
            return checkpoint(block, x, cos, sin, lay, None, use_reentrant=False)
        return block(x, cos, sin, lay, None)

    torch._dynamo.reset()
    ex = torch._dynamo.explain(fn)(x)
    assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]
    assert ex.graph_count == 1
    ops = {str(n.target) for g in ex.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
           for n in m.graph.nodes if n.op == "call_function"}  # with checkpointing: inside its subgraph
    assert any("doc_attention" in o for o in ops)  # the packed attention is in the graph, as one op


@pytest.mark.parametrize("part", ["block", "mlp"])
def test_compiled_gradients_equal_eager_and_no_recompile(part):
    # Checkpointing on in the compiled run (the train command's default; the whole block, or its MLP
    # only), off in the eager one.
    # Two blocks: the first checkpointed, the last never is (they share one graph per way of calling it)
    model = lora_model(layers=2)
    steps = [([[20, 13], [5, 30]], 64), ([[70, 50], [3, 100, 9]], 128)]

    def step(rows, T):
        ids, pos, lay = packed(rows, T, seed=T)
        model.zero_grad(set_to_none=True)
        logits = model(ids, position_ids=pos, layout=lay)
        logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want = [step(*s) for s in steps]
    torch._dynamo.reset()
    model.compile_blocks(backend="aot_eager")
    model.gradient_checkpointing, model.checkpoint_part = True, part
    stats = torch._dynamo.utils.counters["stats"]
    for i, (s, (logits, grads)) in enumerate(zip(steps, want)):
        got_logits, got = step(*s)
        if i == 0:
            graphs = stats["unique_graphs"]
        torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
        assert len(got) == 2 * 7 * 2
        for n, g in grads.items():
            torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert stats["unique_graphs"] == graphs  # new lengths, documents and padding: no new graph
    ids = packed([[9]], 9)[0]
    with torch.no_grad():  # generation runs the blocks eagerly (a KV cache's position changes every step)
        cache = model.new_cache(1, 12)
        got = torch.cat([model(ids[:, :5], cache=cache), model(ids[:, 5:], cache=cache)], dim=1)
        assert stats["unique_graphs"] == graphs
        torch.testing.assert_close(got, model.eval()(ids), rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(lora_model(layers=2).state_dict())  # keys unchanged (no _orig_mod)


def test_doc_attention_op_fake_and_autograd_registrations():
    rows, T = [[5, 9], [3, 1, 6]], 14
    lay = doc_layout(rows, T)
    n = lay.num_tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    torch.library.opcheck(torch.ops.minidistill.doc_attention_fwd.default, (q, k, v, lay.cu_seqlens, 3, 4),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    y = torch.ops.minidistill.doc_attention_fwd(q, k, v, lay.cu_seqlens, 3, 4)[0]
    assert torch.allclose(y, D.per_document_sdpa(q, k, v, D._segments(lay.lengths, 3, 4, q.device)), atol=1e-6)
