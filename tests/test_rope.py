"""rope.py: linear / dynamic (NTK) / yarn RoPE against transformers, on inputs shorter and longer than the
original context, per packed document, through the KV cache; `--rope-scaling` applied at load and exported."""

import json

import pytest
import torch

import minidistill as md
from minidistill.config import ModelConfig
from minidistill.rope import Rotary, dynamic_inv_freq, inv_freq
from model_fixtures import CONFIGS, ids, rel_err, write_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:rope_scaling attn_factor")

# Original context 32 in every config: 9 tokens stay inside it, 80 go past it.
SCALED = ["llama-linear", "llama-dynamic", "llama-yarn", "qwen3-yarn"]


def hf_inv_freq(name: str, seq_len: int | None = None) -> torch.Tensor:
    """transformers' own inverse frequencies for CONFIGS[name] (at seq_len, for dynamic)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hub = json.loads(json.dumps(CONFIGS[name]))  # transformers writes into the nested dicts
    cfg = transformers.AutoConfig.for_model(**hub)
    return ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg, "cpu", seq_len=seq_len)[0]


@pytest.mark.parametrize("name", ["llama-linear", "llama-yarn", "qwen3-yarn"])
def test_static_frequencies_match_transformers(name):
    cfg = ModelConfig.from_hf(CONFIGS[name])
    plain = ModelConfig.from_hf(dict(CONFIGS[name], rope_scaling=None))
    assert torch.allclose(inv_freq(cfg), hf_inv_freq(name), rtol=1e-6, atol=0)
    assert not torch.allclose(inv_freq(cfg), inv_freq(plain))  # the scaling does something


def test_dynamic_frequencies_follow_the_length():
    cfg = ModelConfig.from_hf(CONFIGS["llama-dynamic"])
    lengths = torch.tensor([[5, 32, 33, 80, 1000]])
    got = dynamic_inv_freq(cfg, lengths)  # (1, 5, rd/2)
    for i, n in enumerate(lengths[0].tolist()):
        assert torch.allclose(got[0, i], hf_inv_freq("llama-dynamic", torch.tensor(n)), rtol=1e-6, atol=0), n
    default = ModelConfig.from_hf(CONFIGS["llama-plain"])
    assert torch.equal(got[0, 0], got[0, 1]) and torch.allclose(got[0, 0], inv_freq(default))
    assert (got[0, 3] <= got[0, 2]).all() and (got[0, 4, 1:] < got[0, 3, 1:]).all()  # the base grows with length


@pytest.mark.parametrize("name", SCALED)
def test_logits_match_transformers_short_and_long(tmp_path, name):
    ref = write_checkpoint(tmp_path, name)
    model = md.load_model(tmp_path, dtype=torch.float32)
    plain = md.load_model(tmp_path, dtype=torch.float32)
    plain.rotary = Rotary(ModelConfig.from_hf(dict(CONFIGS[name], rope_scaling=None)))  # same weights, plain rope
    for n in (9, 80):
        x = ids(n)
        with torch.no_grad():
            want, got, unscaled = ref(x).logits, model(x), plain(x)
        assert rel_err(got, want) <= 1e-4, f"{name} T={n}: {rel_err(got, want):.2e}"
        if name == "llama-dynamic" and n == 9:
            assert rel_err(unscaled, want) <= 1e-5  # inside the context dynamic is plain rope
        else:
            assert rel_err(unscaled, want) > 1e-3  # the test can tell the scaling from none


def test_dynamic_per_document_lengths_in_packed_rows(tmp_path):
    from test_model import packed

    ref = write_checkpoint(tmp_path, "llama-dynamic")
    model = md.load_model(tmp_path, dtype=torch.float32)
    x, pos, layout, docs = packed([[45, 12, 3], [60]], 60)
    with torch.no_grad():
        out = model(x, position_ids=pos, layout=layout)
        rows = model(x[1:], position_ids=pos[1:])  # an unpacked row: its own length
        for b, t, doc in docs:
            ref(doc[:, :1])  # transformers keeps its largest base until a short input resets it
            want = ref(doc).logits[0]
            assert rel_err(out[b, t: t + doc.shape[1]], want) <= 1e-4, (b, t, doc.shape[1])
    assert rel_err(rows[0], out[1]) <= 1e-5


def test_dynamic_kv_cache_decoding_matches_transformers(tmp_path):
    # Past the original context every new token sees a larger base; the cached keys keep the rotation
    # they were stored with, in transformers' cache as in ours.
    ref = write_checkpoint(tmp_path, "llama-dynamic")
    model = md.load_model(tmp_path, dtype=torch.float32)
    x = ids(44)
    with torch.no_grad():
        out = ref(x[:, :28], use_cache=True)
        pkv, want = out.past_key_values, [out.logits]
        for i in range(28, 44):
            out = ref(x[:, i:i + 1], cache=pkv, use_cache=True)
            pkv = out.past_key_values
            want.append(out.logits)
        cache = model.new_cache(2, 44)
        got = [model(x[:, :28], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(28, 44)]
        full = model(x)
    got, want = torch.cat(got, 1), torch.cat(want, 1)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(got[:, -1], full[:, -1]) > 1e-3  # incremental dynamic rope is not the full forward's


def test_dynamic_uses_the_current_length_where_transformers_keeps_its_largest(tmp_path):
    ref = write_checkpoint(tmp_path, "llama-dynamic")
    model = md.load_model(tmp_path, dtype=torch.float32)
    x = ids(50)
    with torch.no_grad():
        ref(ids(80))  # transformers grows its base for 80 tokens and keeps it for the 50 below
        stale = ref(x).logits
        ref(x[:, :1])  # a short input resets it
        fresh = ref(x).logits
        got = model(x)
    assert rel_err(got, fresh) <= 1e-4 and rel_err(stale, fresh) > 1e-3


@pytest.mark.parametrize("spec", ["linear:4", "dynamic:2", "yarn:3:32"])
def test_rope_scaling_at_load_and_in_the_merged_export(tmp_path, spec):
    write_checkpoint(tmp_path / "base", "qwen3")
    model = md.apply_lora(md.load_model(tmp_path / "base", dtype=torch.float32, rope_scaling=spec),
                          md.LoraConfig(r=4, alpha=8), verbose=False)
    assert model.config.rope_type == spec.split(":")[0]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        x = ids(140)  # past the source's 128 positions: dynamic scales too
        want = model(x)
    md.save_model(md.merge_lora(model), tmp_path / "merged")
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    kind, factor = spec.split(":")[:2]
    assert cfg["rope_scaling"]["rope_type"] == kind and cfg["rope_scaling"]["factor"] == float(factor)
    assert cfg["max_position_embeddings"] == {"linear": 512, "dynamic": 128, "yarn": 96}[kind]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    again = md.load_model(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(hf(x).logits, want) <= 1e-4
        assert rel_err(again(x), want) <= 1e-5
        again.rotary = Rotary(ModelConfig.from_hf(CONFIGS["qwen3"]))  # the same weights with the source's rope
        assert rel_err(again(x), want) > 1e-3


def test_rope_scaling_dict_and_errors_at_load(tmp_path):
    write_checkpoint(tmp_path, "llama3")
    with pytest.raises(ValueError, match="already scales its rope"):
        md.load_model(tmp_path, rope_scaling="yarn:2")
    with pytest.raises(ValueError, match="not understood"):
        md.load_model(tmp_path, rope_scaling="yarn")
    write_checkpoint(tmp_path / "plain", "llama-plain")
    model = md.load_model(tmp_path / "plain", dtype=torch.float32, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert (model.config.rope_type, model.config.max_position_embeddings) == ("linear", 64)


@pytest.mark.parametrize("shape", [(2, 3, 4, 16), (1, 2100, 5, 64), (1, 2100, 5, 96)], ids=["small", "large", "partial"])
def test_rotation_without_autograd_rounds_as_with_it(shape):
    # No grad: small inputs sum into a product, large ones rotate each half alone; both must give the
    # autograd formula's bits (greedy tokens equal to transformers' rest on it). "partial": 64 of 96 dims.
    from minidistill.rope import apply_rotary

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    rd = 64 if shape[-1] == 96 else shape[-1]
    cos, sin = torch.randn(*shape[:2], rd, generator=g), torch.randn(*shape[:2], rd, generator=g)
    with torch.enable_grad():
        want = apply_rotary(x.requires_grad_(), cos, sin).detach()
    with torch.no_grad():
        got = apply_rotary(x, cos, sin)
    assert torch.equal(got, want)
