"""On CUDA, inference runs the model through kernels/gpu (fused norms with the residual add, rope and the
latent cache write, MLA decode): the same logits as the torch code that training uses, with and without a
cache, also with MLA's two input projections and each MLP's gate and up merged into one product, and
autocast evaluation (mixed dtypes) keeps the torch code. Needs a GPU, but for the merged projections on the
CPU; the kernels themselves are tested against their references in tests/kernels/gpu, in CI through the
Triton interpreter."""
import dataclasses

import pytest
import torch

from dslocal.quant.synthetic import PRESETS
from dslocal.runtime import model as rm
from dslocal.runtime.model import DeepSeek, LatentCache, fused, init_weights

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = 1e-4     # max |fused - torch| / max |torch| of the logits, fp32 weights


def model_of(preset: str, device: str = "cuda") -> DeepSeek:
    torch.manual_seed(0)
    m = DeepSeek(dataclasses.replace(PRESETS[preset], vocab_size=256))
    init_weights(m, std=0.05)
    return m.to(device).eval()


def merge(m: DeepSeek) -> DeepSeek:
    m.merge_projections()
    return m


@needs_cuda
@pytest.mark.parametrize("merged", [False, True], ids=["apart", "merged"])
@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_fused_inference_equals_the_torch_path(preset, merged):
    m = model_of(preset)
    tokens = torch.randint(0, 256, (1, 20), device="cuda")
    want = m(tokens)                                      # grad enabled: the torch code
    with torch.no_grad():
        assert fused(torch.zeros(1, device="cuda"))
        if merged:
            merge(m)
        got = m(tokens)
        cache = LatentCache(m.cfg, 1, 32, torch.float32, "cuda")
        first = m(tokens[:, :5], cache, 0)                # prefill, then one token at a time
        steps = [m(tokens[:, i:i + 1], cache, i) for i in range(5, 9)]
        more = m(tokens[:, 9:20], cache, 9)               # a second prompt after them (attention over a cache)
    for name, out, ref in [("no cache", got, want), ("prefill", first, want[:, :5]),
                           ("decode", torch.cat(steps, 1), want[:, 5:9]), ("more", more, want[:, 9:])]:
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        print(f"{preset} {name}: max rel error {err:.2e} (tol {TOL:.0e})")
        assert err < TOL


@needs_cuda
@pytest.mark.parametrize("kv_bytes", [None, 1], ids=["all-heads", "one-head-at-a-time"])
@pytest.mark.parametrize("start", [0, 37])
def test_prompt_attention_expanded_equals_absorbed(start, kv_bytes, monkeypatch):
    """A prompt's attention on a GPU (MLA._attend_expanded: per-head keys and values, torch's fused
    attention) against the absorbed form in float32 (MLA._attend), in bf16 at V2-Lite's head shapes, from
    an empty cache and after 37 cached positions; all heads at once, and one at a time (long contexts)."""
    if kv_bytes is not None:
        monkeypatch.setattr(rm, "EXPANDED_KV_BYTES", kv_bytes)
    torch.manual_seed(1)
    m = DeepSeek(dataclasses.replace(PRESETS["v2-lite"], vocab_size=256, n_layer=1)).to("cuda", torch.bfloat16)
    a, T, S = m.layers[0].attn, 300, start + 300
    for w in (a.wk_b, a.wv_b):
        torch.nn.init.normal_(w, std=0.05)
    q_nope = torch.randn(1, T, a.H, a.N, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(1, T, a.H, a.R, device="cuda", dtype=torch.bfloat16)
    c_kv = torch.randn(1, S, a.C, device="cuda", dtype=torch.bfloat16)
    k_pe = torch.randn(1, S, a.R, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = a._attend_expanded(q_nope, q_pe, c_kv, k_pe, start).float()
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope.float(), a.wk_b.float())
        want = torch.einsum("bthc,hvc->bthv", a._attend(q_lat, q_pe, c_kv, k_pe, start), a.wv_b.float())
    err = ((got - want).norm() / want.norm()).item()
    print(f"start {start}: relative RMS error {err:.2e}")
    assert got.shape == (1, T, a.H, a.wv_b.shape[1]) and err < 1e-2


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_merged_input_projections_change_no_output(preset):
    """The two projections as views of one weight: the same parameters, the same logits (one product
    instead of two may sum in another order: within 1e-5)."""
    m = model_of(preset, "cpu")
    tokens = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        want = m(tokens)
        shapes = {n: p.shape for n, p in m.named_parameters()}
        got = merge(m)(tokens)
        attn = m.layers[0].attn
        first = attn.wq if hasattr(attn, "wq") else attn.wq_a
        assert attn.w_in is not None and first.weight.data_ptr() == attn.w_in.data_ptr()
        assert attn.wkv_a.weight.data_ptr() == attn.w_in[first.out_features:].data_ptr()
        mlps = [mod for mod in m.modules() if type(mod).__name__ == "MLP"]
        assert mlps and all(mlp.w_gate_up is not None for mlp in mlps)
        assert {n: p.shape for n, p in m.named_parameters()} == shapes
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-5


@needs_cuda
def test_autocast_evaluation_keeps_the_torch_path():
    m = model_of("tiny-v3")
    tokens = torch.randint(0, 256, (2, 7), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert not fused(torch.zeros(1, device="cuda"))
        out = m(tokens)
    assert out.shape == (2, 7, 256) and torch.isfinite(out).all()
