"""kernels/gpu/mla.py::mla_decode against kernels/ref.py::mla_decode, and both against runtime.model.MLA.

On a machine without CUDA the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set by this
folder's conftest), in fp32 and fp16 only: the interpreter computes bf16 wrongly. Tolerances (STYLE.md
section 5): fp32 max error / max |ref| below 1e-5; 16-bit caches relative RMS error below 5e-3.
"""
import dataclasses

import pytest
import torch

from dslocal.kernels import ref
from dslocal.kernels.gpu import mla
from dslocal.quant.synthetic import PRESETS
from dslocal.runtime.model import DeepSeek, LatentCache, apply_rope, init_weights

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = 1e-5      # max |out - ref| / max |ref|
HALF_TOL = 5e-3      # |out - ref| / |ref| over the whole output
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 and CUDA graphs)")


def max_rel(out, want):
    return ((out - want).abs().max() / want.abs().max()).item()


def rms_rel(out, want):
    return ((out - want).norm() / want.norm()).item()


def inputs(B, T, H, C, R, S_max, dtype, seed=0):
    """Random queries (fp32, as the model makes them) and a latent cache of dtype, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    q_lat = torch.randn(B, T, H, C, generator=g)
    q_pe = torch.randn(B, T, H, R, generator=g)
    kv = torch.randn(B, S_max, C, generator=g)
    pe = torch.randn(B, S_max, R, generator=g)
    return [t.to(DEVICE) for t in (q_lat, q_pe, kv.to(dtype), pe.to(dtype))]


def check(out, want, dtype, what):
    if dtype == torch.float32:
        err = max_rel(out, want)
        print(f"{what}: max rel error {err:.2e} (tol {FP32_TOL:.0e})")
        assert err < FP32_TOL
    else:
        err = rms_rel(out, want)
        print(f"{what}: rel RMS error {err:.2e} (tol {HALF_TOL:.0e})")
        assert err < HALF_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H", [3, 16])
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("S", [1, 7, 63, 300])
def test_matches_reference(S, T, H, dtype):
    if S < T:
        pytest.skip("the T queries are the last T of the S positions")
    B, C, R = 2, 64, 16
    q_lat, q_pe, kv, pe = inputs(B, T, H, C, R, S + 5, dtype)
    kv[:, S:] = float("nan")     # positions past the length must never be read
    pe[:, S:] = float("nan")
    out = mla.mla_decode(q_lat, q_pe, kv, pe, S, 0.3)
    assert out.shape == (B, T, H, C) and out.dtype == torch.float32
    check(out, ref.mla_decode(q_lat, q_pe, kv, pe, S, 0.3), dtype, f"S={S} T={T} H={H} {dtype}")


@pytest.mark.parametrize("C, R, dtype", [(512, 64, torch.float32), (512, 64, torch.float16),
                                         (40, 8, torch.float32)])
def test_latent_widths(C, R, dtype):
    """V2/V3's C = 512, R = 64, and widths that are no power of two (padded tiles)."""
    q_lat, q_pe, kv, pe = inputs(1, 1, 3, C, R, 70, dtype, seed=1)
    out = mla.mla_decode(q_lat, q_pe, kv, pe, 70, 0.1)
    check(out, ref.mla_decode(q_lat, q_pe, kv, pe, 70, 0.1), dtype, f"C={C} R={R} {dtype}")


@pytest.mark.parametrize("S", [2, 37, 200])
def test_length_on_device(S):
    """A 0-d int32 length: the grid follows S_max, most splits find no positions."""
    q_lat, q_pe, kv, pe = inputs(1, 2, 3, 64, 16, 200, torch.float32, seed=2)
    length = torch.tensor(S, dtype=torch.int32, device=DEVICE)
    out = mla.mla_decode(q_lat, q_pe, kv, pe, length, 0.2)
    check(out, ref.mla_decode(q_lat, q_pe, kv, pe, S, 0.2), torch.float32, f"device length {S}")


@pytest.mark.parametrize("S,T", [(37, 1), (200, 2)])
def test_length_from_a_position(S, T):
    """A decode step's int64 position on the device plus T (length_add), and an int length plus length_add."""
    q_lat, q_pe, kv, pe = inputs(1, T, 3, 64, 16, 200, torch.float32, seed=5)
    want = ref.mla_decode(q_lat, q_pe, kv, pe, S, 0.2)
    pos = torch.tensor(S - T, dtype=torch.int64, device=DEVICE)
    check(mla.mla_decode(q_lat, q_pe, kv, pe, pos, 0.2, length_add=T), want, torch.float32, f"position {S - T} + {T}")
    check(mla.mla_decode(q_lat, q_pe, kv, pe, S - T, 0.2, length_add=T), want, torch.float32, f"int {S - T} + {T}")


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("op", [ref.mla_decode, mla.mla_decode], ids=["ref", "triton"])
def test_matches_model_attention(op, T):
    """MLA.forward of a tiny model after a prefill, against the same layer with its attention step done by op."""
    cfg = dataclasses.replace(PRESETS["tiny-v2"], n_layer=1, n_head=3, kv_lora_rank=64, qk_rope_dim=16)
    torch.manual_seed(3)
    model = DeepSeek(cfg)
    init_weights(model, std=0.1)
    attn, start = model.layers[0].attn, 9
    cache = LatentCache(cfg, 2, 16, torch.float32, "cpu")
    with torch.no_grad():
        model.hidden(torch.randint(0, cfg.vocab_size, (2, start)), cache, 0)
        x = torch.randn(2, T, cfg.hidden)
        cos, sin = model.rope(start, T, "cpu")
        want = attn(x, cos, sin, cache, 0, start)                        # also writes the T new positions
        # the layer's own projections around the attention step (runtime/model.py MLA.forward)
        q = attn.wq(x).view(2, T, cfg.n_head, cfg.qk_head_dim)
        q_pe = apply_rope(q[..., cfg.qk_nope_dim:], cos[:, None], sin[:, None])
        q_lat = torch.einsum("bthn,hnc->bthc", q[..., :cfg.qk_nope_dim], attn.wk_b)   # strided: fine
        dev = [t.to(DEVICE) for t in (q_lat, q_pe, cache.kv[0], cache.pe[0])]
        o_lat = op(*dev, start + T, attn.scale).cpu()
        got = attn.wo(torch.einsum("bthc,hvc->bthv", o_lat, attn.wv_b).flatten(2))
    check(got, want, torch.float32, f"model attention T={T} {op.__module__}")


def test_rejects_bad_inputs():
    q_lat, q_pe, kv, pe = inputs(1, 1, 3, 64, 16, 10, torch.float32)
    with pytest.raises(ValueError, match="length"):
        mla.mla_decode(q_lat, q_pe, kv, pe, 11, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        mla.mla_decode(q_lat.transpose(2, 3).contiguous().transpose(2, 3), q_pe, kv, pe, 5, 0.1)
    with pytest.raises(ValueError, match="dtypes"):
        mla.mla_decode(q_lat, q_pe, kv, pe.half(), 5, 0.1)
    with pytest.raises(ValueError, match="shapes"):
        mla.mla_decode(q_lat, q_pe, kv[:, :, :32], pe, 5, 0.1)
    with pytest.raises(ValueError, match="int32 or int64"):
        mla.mla_decode(q_lat, q_pe, kv, pe, torch.tensor(5.0, device=DEVICE), 0.1)


@needs_cuda
@pytest.mark.parametrize("H", [16, 128])
def test_bf16_v2_v3_shapes(H):
    q_lat, q_pe, kv, pe = inputs(1, 1, H, 512, 64, 1000, torch.bfloat16, seed=4)
    out = mla.mla_decode(q_lat, q_pe, kv, pe, 1000, 0.1)
    check(out, ref.mla_decode(q_lat, q_pe, kv, pe, 1000, 0.1), torch.bfloat16, f"bf16 H={H}")


@needs_cuda
def test_cuda_graph_replays_at_growing_lengths():
    q_lat, q_pe, kv, pe = inputs(1, 1, 16, 512, 64, 4096, torch.bfloat16, seed=5)
    length = torch.tensor(1, dtype=torch.int32, device=DEVICE)
    mla.mla_decode(q_lat, q_pe, kv, pe, length, 0.1)       # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla.mla_decode(q_lat, q_pe, kv, pe, length, 0.1)
    for S in (1, 100, 1000, 4096):
        length.fill_(S)
        graph.replay()
        check(out, ref.mla_decode(q_lat, q_pe, kv, pe, S, 0.1), torch.bfloat16, f"graph replay S={S}")
