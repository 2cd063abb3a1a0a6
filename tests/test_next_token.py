"""The greedy head's bf16 screen (next_token.py): its error bound holds, its argmax is the fp32
argmax (near ties that bf16 cannot tell apart, exact ties, the last partial block), a non-finite
row falls back, a head changed in place is not used, and generation with it equals generation
without. The screen itself needs oneDNN only; where the CPU has no AMX the decoder never builds
one, so the generation test switches `available` on."""

import pytest
import torch

import minidistill as md
from minidistill import next_token, prepacked, sampling
from minidistill.next_token import BLOCK, GreedyScreen, _Screen, screen_constant
from minidistill.new_tokens import TokenRowsHead
from model_fixtures import write_checkpoint

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def fp32_argmax(x, w):
    """The argmax from exact (float64) logits: the cases below keep fp32's rounding out of it."""
    return (x.double() @ w.double().T).argmax(-1)


@torch.no_grad()
def test_the_bound_holds_for_the_bf16_product():
    g = torch.Generator().manual_seed(0)
    for V, H, scale in ((300, 576, 0.02), (129, 37, 3.0), (64, 1000, 1e-3)):
        w = torch.randn(V, H, generator=g) * scale
        x = torch.randn(9, H, generator=g) * 7
        s = _Screen(w, rows=9)
        z = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), s.packed, None, "none", [], "").double()
        err = (z - x.double() @ w.double().T).abs()
        bound = screen_constant(H) * (x.abs().double() @ w.abs().double().T)  # before Cauchy-Schwarz
        assert err.max() > 0 and (err <= bound).all()
        assert (bound <= screen_constant(H) * x.norm(dim=1, keepdim=True).double() * s.norm_max * 1.0001).all()


@torch.no_grad()
def test_the_screened_argmax_is_the_fp32_argmax():
    g = torch.Generator().manual_seed(1)
    V, H = 2 * BLOCK + 21, 48  # a partial last block
    for trial in range(20):
        w = torch.randn(V, H, generator=g)
        x = torch.randn(6, H, generator=g)
        if trial % 2:  # near ties bf16 cannot see: copies of the best row a little apart (1e-4, far above fp32's eps)
            best = fp32_argmax(x, w)
            for r in range(6):
                for j in torch.randint(0, V, (4,), generator=g).tolist() + [V - 1]:
                    w[j] = w[best[r]] + 1e-4 * torch.randn(H, generator=g) * (x[r] > 0)
        got = _Screen(w, rows=6).argmax(x)
        assert got is not None and torch.equal(got, fp32_argmax(x, w))
    # bf16 alone gets such a case wrong, so the fp32 recomputation is what decides it
    assert not torch.equal((x.bfloat16() @ w.bfloat16().T).float().argmax(-1), fp32_argmax(x, w))


@torch.no_grad()
def test_rows_whose_logits_are_all_negative_or_all_zero():
    # Block maxima are taken on the bf16 bits as int16, where negative values order backwards.
    g = torch.Generator().manual_seed(4)
    V, H = 3 * BLOCK + 5, 24
    w = -torch.rand(V, H, generator=g) - 0.01  # every entry negative
    x = torch.rand(6, H, generator=g) + 0.01  # so every logit of these rows is negative...
    x[1] = -x[1]  # ...but this row's are all positive
    x[2] = 0.0  # all zero: the first token
    w[V - 2] *= 0.5  # the least negative logit of rows 0, 3-5 sits in the partial last block
    got = _Screen(w, rows=6).argmax(x)
    assert got is not None and torch.equal(got, fp32_argmax(x, w))
    assert got[0] == V - 2 and got[2] == 0


@torch.no_grad()
def test_exact_ties_go_to_the_first_token_and_a_non_finite_row_falls_back():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(200, 16, generator=g)
    w /= w.norm(dim=1, keepdim=True)
    w[150] = w[7] = w[190] = 2 * w[190]  # three equal rows, twice as long as the others
    x = w[7:8] * 3  # their logit 12, the others' at most 6
    s = _Screen(w, rows=1)
    assert s.argmax(x).tolist() == [7] == (x @ w.T).argmax(-1).tolist()
    for bad in (float("nan"), float("inf")):
        y = torch.randn(3, 16, generator=g)
        y[1, 4] = bad
        assert s.argmax(y) is None  # the decoder then takes the fp32 head


@torch.no_grad()
def test_a_head_changed_in_place_is_not_screened_until_rebuilt(monkeypatch, caplog):
    monkeypatch.setattr(next_token, "available", lambda: True)
    monkeypatch.setattr(next_token, "MIN_HEAD_MB", 0.0)
    torch.manual_seed(0)
    model = md.Transformer(md.ModelConfig("llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=8)).eval()
    screen = GreedyScreen.for_model(model, temperature=0.0)
    assert GreedyScreen.for_model(model, temperature=0.7) is None  # sampling needs every logit
    assert GreedyScreen.for_model(model, 0.0, budget_mb=0) is None  # its bf16 copy must fit the budget
    x = torch.randn(4, 32)
    screen.prepare(rows=4, steps=prepacked.PACK_MIN_STEPS - 1)
    assert screen.built is None and screen.argmax(x) is None  # too few steps to repay it
    screen.prepare(rows=4, steps=prepacked.PACK_MIN_STEPS)
    w = model.lm_head.weight
    assert torch.equal(screen.argmax(x), fp32_argmax(x, w))
    w.mul_(-1)  # an optimizer step between two yields
    assert screen.argmax(x) is None
    screen.prepare(rows=4, steps=prepacked.PACK_MIN_STEPS)
    assert torch.equal(screen.argmax(x), fp32_argmax(x, w))
    screen.close()
    assert screen.built is None
    w[3, 0] = float("inf")  # a head that cannot be bounded: the fp32 head, and no rebuild at every step
    screen.prepare(rows=4, steps=prepacked.PACK_MIN_STEPS)
    assert screen.built is None and screen.unusable_at == w._version and screen.argmax(x) is None
    w[3, 0] = 0.0

    def no_op(*a):
        raise RuntimeError("no such op")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", no_op)  # a torch build without it
    screen.prepare(rows=4, steps=prepacked.PACK_MIN_STEPS)
    assert screen.built is None and screen.argmax(x) is None and "greedy screen off (no such op)" in caplog.text


@pytest.mark.parametrize("name", ["llama3-tied", "phi4-mini"])
def test_generation_with_the_screen_equals_generation_without(tmp_path, monkeypatch, name):
    write_checkpoint(tmp_path, name)
    model = md.load_model(tmp_path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (1, 9, 20, 4, 13)]
    n = prepacked.PACK_MIN_STEPS + 4
    want = sampling.generate_ids_batch(model, prompts, max_new_tokens=n, batch_size=4)
    monkeypatch.setattr(next_token, "available", lambda: True)
    monkeypatch.setattr(next_token, "MIN_HEAD_MB", 0.0)
    answered = []
    real = _Screen.argmax
    monkeypatch.setattr(_Screen, "argmax", lambda self, x: answered.append(len(x)) or real(self, x))
    assert sampling.generate_ids_batch(model, prompts, max_new_tokens=n, batch_size=4) == want
    assert sum(answered) > n  # the screen picked most of the tokens
    one = [sampling.generate_ids(model, p, max_new_tokens=n) for p in prompts]
    assert one == want
    before = len(answered)
    sampling.generate_ids_batch(model, prompts, max_new_tokens=n, batch_size=4, temperature=0.8, seed=1)
    assert len(answered) == before  # sampling needs every logit: no screen


def test_no_screen_for_a_head_with_trainable_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(next_token, "available", lambda: True)
    monkeypatch.setattr(next_token, "MIN_HEAD_MB", 0.0)
    write_checkpoint(tmp_path, "llama3-tied")
    model = md.load_model(tmp_path, dtype=torch.float32)
    assert GreedyScreen.for_model(model, 0.0) is not None
    model.lm_head = TokenRowsHead(model.lm_head, [5], torch.nn.Parameter(torch.randn(1, 64)))  # what add_tokens makes
    assert GreedyScreen.for_model(model, 0.0) is None  # its logits are not x @ weight.T
