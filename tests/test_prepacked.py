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


@torch.no_grad()
def test_packed_products_equal_f_linear_over_odd_shapes():
    g = torch.Generator().manual_seed(0)
    for out_f, in_f, bias in ((37, 53, True), (8, 200, False), (300, 17, True)):
        lin = nn.Linear(in_f, out_f, bias=bias)
        packs = PackedWeights()
        inputs = [torch.randn(2, in_f, generator=g), torch.randn(33, in_f, generator=g),
                  torch.randn(3, 5, in_f, generator=g),  # (B, T, in)
                  torch.randn(in_f, 7, generator=g).t()]  # not contiguous
        for x in inputs:
            y = packs.linear(x, lin.weight, lin.bias)
            assert y is not None and y.shape == (*x.shape[:-1], out_f)
            assert close(y, F.linear(x, lin.weight, lin.bias))
        assert packs.packs == 1 and packs.kept_bytes == out_f * in_f * 4  # packed once, kept for the call
        packs.close()
        assert packs.kept == {} and packs.kept_bytes == 0


@torch.no_grad()
def test_the_rule_sends_the_rest_to_f_linear():
    lin = nn.Linear(24, 16)
    packs = PackedWeights()
    x = torch.randn(4, 24)
    assert packs.linear(x[:1], lin.weight, lin.bias) is None  # one row: a matrix-vector product
    assert packs.linear(torch.randn(257, 24), lin.weight, lin.bias) is None  # a prefill's many rows
    assert packs.linear(x.bfloat16(), lin.weight.bfloat16(), None) is None  # bf16: oneDNN's own path
    assert packs.linear(x, lin.weight.detach().clone(), None) is None  # not a Parameter (a decoded buffer)
    assert packs.packs == 0
    assert PackedWeights(0).linear(x, lin.weight, None) is None  # budget 0: nothing packed
    small = PackedWeights(16 * 24 * 4 * 1.5 / 2**20)  # room for one such weight, not two
    other = nn.Linear(24, 16)
    assert small.linear(x, lin.weight, None) is not None and small.linear(x, other.weight, None) is None
    assert small.kept_bytes == 16 * 24 * 4 <= small.budget
    with pytest.raises(ValueError, match="budget_mb must be >= 0"):
        PackedWeights(-1)


@torch.no_grad()
def test_a_weight_changed_in_place_is_packed_again():
    lin = nn.Linear(24, 16)
    packs, x = PackedWeights(), torch.randn(5, 24)
    before = packs.linear(x, lin.weight, lin.bias)
    lin.weight.mul_(-2)  # an optimizer step or a LoRA merge between two yields
    after = packs.linear(x, lin.weight, lin.bias)
    assert close(after, F.linear(x, lin.weight, lin.bias)) and not close(after, before)
    assert packs.packs == 2 and packs.kept_bytes == 16 * 24 * 4  # the same entry, packed again


def test_active_only_under_no_grad_and_only_inside_it():
    lin = prepacked.Linear(24, 16)
    x = torch.randn(3, 24, requires_grad=True)
    with pytest.raises(RuntimeError, match="under torch.no_grad"):
        with PackedWeights():
            pass
    with torch.no_grad(), PackedWeights() as packs:
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
            self.at_close = (self.packs, self.kept_bytes)
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

    def generate(n=20, **kw):
        done = sampling.iter_generate(model, prompts, max_new_tokens=n, batch_size=3, **kw)
        return [c.ids for c in sorted(done, key=lambda c: c.index)]

    want = generate(decode_budget_mb=0)
    assert made[-1].at_close == (0, 0)  # budget 0: nothing packed
    got = generate()
    packs, kept = made[-1].at_close
    assert got == want and packs > 0 and 0 < kept <= sum(p.numel() * 4 for p in model.parameters())
    assert not getattr(prepacked._state, "active", None)  # gone when the call ends
    generate(prepacked.PACK_MIN_NEW_TOKENS - 1)
    assert made[-1].at_close == (0, 0)  # a short call: packing would cost more than it saves
