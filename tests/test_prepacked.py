"""fp32 weights packed for MKL's sgemm during generation (prepacked.py): the products equal
F.linear's, the rule (rows, dtype, Parameters only, the budget, a weight changed in place), never
active outside a generate step, and generation with packed weights equal to generation without."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minidistill as md
from minidistill import prepacked, sampling
from minidistill.prepacked import PackedWeights
from model_fixtures import randomise_lora, write_checkpoint

pytestmark = pytest.mark.skipif(not prepacked.available(), reason="this torch build has no MKL (packing is off)")


def close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def packing(rows, budget_mb=None):
    packs = PackedWeights(budget_mb)
    packs.rows = rows  # what the decoder sets for a steady batch
    return packs


@torch.no_grad()
def test_packed_products_equal_f_linear_over_odd_shapes():
    g = torch.Generator().manual_seed(0)
    for out_f, in_f, bias in ((37, 53, True), (8, 200, False), (300, 17, True)):
        lin = nn.Linear(in_f, out_f, bias=bias)
        for x in (torch.randn(5, in_f, generator=g), torch.randn(33, in_f, generator=g),
                  torch.randn(3, 5, in_f, generator=g),  # (B, T, in): 15 rows
                  torch.randn(in_f, 7, generator=g).t()):  # not contiguous
            rows = x.numel() // in_f
            packs = packing(rows)
            y = packs.linear(x, lin.weight, lin.bias)
            assert y is not None and y.shape == (*x.shape[:-1], out_f)
            assert close(y, F.linear(x, lin.weight, lin.bias))
            assert close(packs.linear(x, lin.weight, lin.bias), y)  # kept for the call: no packing again
            assert packs.packs == 1 and packs.kept_bytes == out_f * in_f * 4 and packs.padded == 0
            fewer = x.reshape(rows, in_f)[1:]  # a batch that lost a row: padded to the packed rows
            assert close(packs.linear(fewer, lin.weight, lin.bias), F.linear(fewer, lin.weight, lin.bias))
            assert packs.packs == 1 and packs.padded == 1
            assert packs.linear(torch.randn(rows + 1, in_f), lin.weight, lin.bias) is None  # more rows
            packs.rows = rows + 1  # the decoder's batch changed: packed again for it
            z = torch.randn(rows + 1, in_f, generator=g)
            assert close(packs.linear(z, lin.weight, lin.bias), F.linear(z, lin.weight, lin.bias))
            assert packs.packs == 2 and packs.kept_bytes == out_f * in_f * 4
            packs.close()
            assert packs.kept == {} and packs.kept_bytes == 0


@torch.no_grad()
def test_the_rule_sends_the_rest_to_f_linear():
    lin = nn.Linear(24, 16)
    x = torch.randn(32, 24)
    assert PackedWeights().linear(x, lin.weight, None) is None  # rows 0: the decoder asked for none
    for rows, args in ((3, (x[:3], lin.weight, lin.bias)),  # under PAD_MIN_ROWS: near a matrix-vector product
                       (32, (x[:7], lin.weight, lin.bias)),  # under a quarter of the packed rows
                       (4, (x[:4].bfloat16(), lin.weight.bfloat16(), None)),  # bf16: oneDNN's own path
                       (4, (x[:4], lin.weight.detach().clone(), None))):  # not a Parameter (a decoded buffer)
        packs = packing(rows)
        assert packs.linear(*args) is None and packs.packs == 0
    assert packing(32).linear(x[:8], lin.weight, None) is not None  # a quarter: padded
    assert packing(4, budget_mb=0).linear(x[:4], lin.weight, None) is None  # budget 0: nothing packed
    small = packing(4, 16 * 24 * 4 * 1.5 / 2**20)  # room for one such weight, not two
    other = nn.Linear(24, 16)
    assert small.linear(x[:4], lin.weight, None) is not None and small.linear(x[:4], other.weight, None) is None
    assert small.kept_bytes == 16 * 24 * 4 <= small.budget
    with pytest.raises(ValueError, match="budget_mb must be >= 0"):
        PackedWeights(-1)


def test_when_the_decoder_packs():
    packs = PackedWeights()
    n = prepacked.PACK_MIN_STEPS
    assert not packs.worth(3, 10 * n)  # too few rows to gain
    assert not packs.worth(32, n - 1) and packs.worth(32, n)  # a first packing: for PACK_MIN_STEPS steps
    packs.rows = 32
    assert not packs.worth(32, 10 * n) and not packs.worth(17, 10 * n)  # served, padded; not halved
    assert packs.worth(16, 10) and not packs.worth(16, 9)  # halved: (32 - 16) x steps >= REPACK_ROW_STEPS
    assert not packs.worth(7, n - 1) and packs.worth(7, n)  # under a quarter: not served, a packing again
    assert packs.worth(40, n)  # more rows than packed for (refilled)


@torch.no_grad()
def test_a_weight_changed_in_place_is_packed_again():
    lin = nn.Linear(24, 16)
    packs, x = packing(5), torch.randn(5, 24)
    before = packs.linear(x, lin.weight, lin.bias)
    lin.weight.mul_(-2)  # an optimizer step or a LoRA merge between two yields
    after = packs.linear(x, lin.weight, lin.bias)
    assert close(after, F.linear(x, lin.weight, lin.bias)) and not close(after, before)
    assert packs.packs == 2 and packs.kept_bytes == 16 * 24 * 4  # the same entry, packed again


def test_active_only_under_no_grad_and_only_inside_it():
    lin = prepacked.Linear(24, 16)
    x = torch.randn(4, 24, requires_grad=True)
    with pytest.raises(RuntimeError, match="under torch.no_grad"):
        with PackedWeights():
            pass
    with torch.no_grad(), PackedWeights() as packs:
        packs.rows = 4
        lin(x)
    assert packs.packs == 1
    lin(x).sum().backward()  # outside: plain F.linear, with its backward
    assert x.grad is not None and lin.weight.grad is not None


def recording(monkeypatch):
    made = []

    class Recorded(PackedWeights):
        def __init__(self, budget_mb=None):
            super().__init__(budget_mb)
            made.append(self)

        def close(self):
            self.at_close, self.packed_ids, self.padded_at_close = (self.packs, self.kept_bytes), set(self.kept), self.padded
            super().close()

    monkeypatch.setattr(sampling, "PackedWeights", Recorded)
    return made


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name, lora", [("llama3-tied", False), ("phi4-mini", False), ("qwen2", True)])
def test_generation_with_packed_weights_equals_generation_without(tmp_path, monkeypatch, name, lora):
    write_checkpoint(tmp_path, name)
    model = md.load_model(tmp_path, dtype=torch.float32)
    if lora:  # the LoRA function's base matmuls take the packed path too
        md.apply_lora(model, md.LoraConfig(r=4, alpha=8), verbose=False)
        randomise_lora(model)
    model.eval()
    prompts = prompts_of([1, 9, 20, 4, 13])
    made = recording(monkeypatch)
    n = prepacked.PACK_MIN_STEPS + 4

    def generate(batch_size=4, **kw):
        done = sampling.iter_generate(model, prompts, max_new_tokens=n, batch_size=batch_size, **kw)
        return [c.ids for c in sorted(done, key=lambda c: c.index)]

    want = generate(decode_budget_mb=0)
    assert made[-1].at_close == (0, 0)  # budget 0: nothing packed
    got = generate()  # batch 4 of 5 prompts: a finished row is refilled, the batch is steady
    packs, kept = made[-1].at_close
    assert got == want and packs > 0 and kept <= sum(p.numel() * 4 for p in model.parameters())
    layers = [m for m in model.modules() if isinstance(m, md.LoRALinear if lora else prepacked.Linear)]
    assert layers and all(id(m.weight) in made[-1].packed_ids for m in layers)  # every projection (LoRA bases too)
    assert not getattr(prepacked._state, "active", None)  # gone when the call ends
    assert generate(batch_size=5) == want and made[-1].at_close[0] > 0  # no row can end before n tokens
    stop = {want[0][-1], want[3][-1]}  # rows end early, some at their first token: the batch shrinks
    cut = [w[:min([i for i, t in enumerate(w) if t in stop], default=n)] for w in want]
    assert generate(batch_size=5, stop_ids=stop) == cut


@torch.no_grad()
def test_a_shrinking_batch_is_padded_to_its_packing_and_generates_the_same(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, "llama3-tied")
    model = md.load_model(tmp_path, dtype=torch.float32).eval()
    n = prepacked.PACK_MIN_STEPS + 4
    prompts = prompts_of([3, 17, 8, 1, 12, 6, 20, 9], seed=2)
    made = recording(monkeypatch)
    want = [sampling.generate_ids(model, p, max_new_tokens=n) for p in prompts]
    def cut_at(stop):
        return [w[:min([i for i, t in enumerate(w) if t in stop], default=n)] for w in want]

    # Two stop ids that end two of the eight rows after 2-6 tokens and leave at least four whole: the
    # batch is rebuilt at 6 rows, which the packing for 8 serves padded.
    firsts = {t for w in want for i, t in enumerate(w[:7]) if i >= 2 and t not in w[:i]}
    stop = next({a, b} for a in sorted(firsts) for b in sorted(firsts) if a < b
                and sum(2 <= len(c) <= 6 for c in cut_at({a, b})) == 2 and sum(len(c) == n for c in cut_at({a, b})) >= 4)
    cut = cut_at(stop)
    got = sampling.generate_ids_batch(model, prompts, max_new_tokens=n, batch_size=8, stop_ids=stop)
    assert got == cut
    assert made[-1].at_close[0] > 0 and made[-1].padded_at_close > 0  # 6 rows took the packing for 8, padded
