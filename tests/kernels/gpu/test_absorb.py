"""kernels/gpu/absorb.py against the einsums of runtime/model.py MLA.forward.

Without CUDA the kernels run in the Triton interpreter. Both sides multiply and sum in fp32 from the same
inputs, so only the order of the sums differs: max |out - ref| / max |ref| below 1e-5 in fp32 output; an
output in half precision at most one unit in the last place from the fp32 reference rounded once.
"""
import pytest
import torch

from dslocal.kernels.gpu.absorb import absorb_o, absorb_q, decode_queries
from dslocal.kernels.gpu.rope import latent_to_cache, rope

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def rel(out, want) -> float:
    return ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,N,R,C", [(1, 1, 16, 128, 64, 512), (2, 3, 5, 24, 8, 40), (1, 4, 3, 7, 0, 33)])
def test_absorb_q_matches_the_einsum(dtype, B, T, H, N, R, C):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, N + R, generator=g).to(DEVICE, dtype)
    wk_b = (torch.randn(H, N, C, generator=g) / N ** 0.5).to(DEVICE, dtype)
    q_nope = q[..., :N]                              # a strided view, as MLA passes it
    want = torch.einsum("bthn,hnc->bthc", q_nope.float(), wk_b.float())
    got = absorb_q(q_nope, wk_b)
    assert got.shape == want.shape and got.dtype == torch.float32
    err = rel(got, want)
    print(f"absorb_q {dtype} B{B} T{T} H{H} N{N} C{C}: {err:.1e}")
    assert err < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,C,V", [(1, 1, 16, 512, 128), (2, 3, 5, 40, 24), (1, 4, 3, 33, 7)])
def test_absorb_o_matches_the_einsum(dtype, B, T, H, C, V):
    g = torch.Generator().manual_seed(1)
    o_lat = torch.randn(B, T, H, C, generator=g).to(DEVICE)
    wv_b = (torch.randn(H, V, C, generator=g) / C ** 0.5).to(DEVICE, dtype)
    want = torch.einsum("bthc,hvc->bthv", o_lat, wv_b.float())
    got = absorb_o(o_lat, wv_b, dtype)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        assert rel(got, want) < 1e-5
    else:
        ulp = torch.finfo(dtype).eps * want.abs().clamp_min(1e-3)
        worst = ((got.float() - want).abs() / ulp).max().item()
        print(f"absorb_o {dtype} B{B} T{T} H{H} C{C} V{V}: {worst:.2f} ulp")
        assert worst <= 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,N,R,C,on_device", [(1, 1, 16, 128, 64, 512, True), (2, 3, 5, 24, 8, 40, False),
                                                   (1, 2, 3, 16, 16, 64, True)])
def test_decode_queries_is_the_three_kernels_in_one(dtype, B, T, H, N, R, C, on_device):
    """decode_queries against absorb_q, rope and latent_to_cache (each tested against the model's torch code)
    on the same strided views MLA passes: q_lat and q_pe equal to the bit, the cache rows too."""
    g = torch.Generator().manual_seed(3)
    both = torch.randn(B, T, H * (N + R) + C + R, generator=g).to(DEVICE, dtype)    # one GEMV's output
    q = both[..., :H * (N + R)].view(B, T, H, N + R)
    kv = both[..., H * (N + R):]
    wk_b = (torch.randn(H, N, C, generator=g) / N ** 0.5).to(DEVICE, dtype)
    w_norm = (1 + 0.3 * torch.randn(C, generator=g)).to(DEVICE)
    a = torch.arange(5, 5 + T, dtype=torch.float64)[:, None] * (10000.0 ** (-torch.arange(0, R, 2) / R))[None]
    cos, sin = a.cos().float().to(DEVICE), a.sin().float().to(DEVICE)
    S, start = 16, 5
    want_kv, want_pe = torch.zeros(B, S, C, dtype=dtype, device=DEVICE), torch.zeros(B, S, R, dtype=dtype, device=DEVICE)
    latent_to_cache(kv, w_norm, 1e-6, cos, sin, want_kv, want_pe, start)
    got_kv, got_pe = torch.zeros_like(want_kv), torch.zeros_like(want_pe)
    at = torch.tensor(start, device=DEVICE) if on_device else start
    q_lat, q_pe = decode_queries(q, wk_b, cos, sin, kv, w_norm, 1e-6, got_kv, got_pe, at)
    assert q_lat.dtype == torch.float32 and q_pe.dtype == dtype and q_pe.is_contiguous()
    assert torch.equal(q_lat, absorb_q(q[..., :N], wk_b))
    assert torch.equal(q_pe, rope(q[..., N:], cos, sin))
    assert torch.equal(got_kv, want_kv) and torch.equal(got_pe, want_pe)


def test_absorb_refuses_mismatched_shapes():
    q = torch.zeros(1, 1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="absorb_q"):
        absorb_q(q, torch.zeros(4, 9, 16, device=DEVICE))
    with pytest.raises(ValueError, match="absorb_o"):
        absorb_o(torch.zeros(1, 1, 4, 16, device=DEVICE), torch.zeros(4, 8, 15, device=DEVICE), torch.float32)
