"""kernels/gpu/rope.py against the model's own torch code: apply_rope, and RMSNorm + apply_rope + the
cache write of MLA.forward.

Without CUDA the kernels run in the Triton interpreter, in fp32 and fp16. Tolerances (STYLE.md section 5):
fp32 max |out - ref| / max |ref| below 1e-5; half precision: at most one unit in the last place apart
(the kernel and torch may round a product differently before the single cast).
"""
import pytest
import torch

from dslocal.kernels.gpu import rope as gpu_rope
from dslocal.runtime.model import RMSNorm, apply_rope

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
FP32_TOL = 1e-5


def check(out, want, what):
    """fp32: max error relative to the largest value; half precision: worst error in units in the last place."""
    if out.dtype == torch.float32:
        worst, tol, unit = ((out - want).abs().max() / want.abs().max()).item(), FP32_TOL, "relative"
    else:
        ulp = torch.finfo(out.dtype).eps * want.float().abs().clamp_min(1e-3)
        worst, tol, unit = ((out.float() - want.float()).abs() / ulp).max().item(), 1.0, "ulp"
    print(f"{what}: worst {worst:.2e} {unit} (tol {tol:.0e})")
    assert worst <= tol


def angles(T, R, start=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    freq = 10000.0 ** (-torch.arange(0, R, 2, dtype=torch.float64) / R) * (1 + 0.1 * torch.rand(R // 2, generator=g,
                                                                                                   dtype=torch.float64))
    a = (torch.arange(start, start + T, dtype=torch.float64)[:, None] * freq[None])
    return a.cos().float().to(DEVICE), a.sin().float().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,N,R", [(1, 1, 16, 128, 64), (2, 3, 5, 16, 8), (1, 4, 1, 0, 64)])
def test_rope_matches_apply_rope(dtype, B, T, H, N, R):
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(B, T, H, N + R, generator=g) * 2).to(DEVICE, dtype)
    cos, sin = angles(T, R)
    x = q[..., N:]                                    # a strided view, as MLA passes q_pe
    want = apply_rope(x, cos[:, None], sin[:, None])
    got = gpu_rope.rope(x, cos, sin)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    check(got, want, f"rope {dtype} B{B} T{T} H{H} R{R}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,R,on_device", [(1, 1, 512, 64, True), (2, 3, 40, 8, False), (1, 5, 512, 64, True)])
def test_latent_to_cache_matches_the_model(dtype, B, T, C, R, on_device):
    g = torch.Generator().manual_seed(2)
    kv = (torch.randn(B, T, C + R + 3, generator=g) * 3).to(DEVICE, dtype)[..., :C + R]   # strided rows
    norm = RMSNorm(C, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(C, generator=g))
    norm = norm.to(DEVICE)
    cos, sin = angles(T, R, start=7)
    S, start = 16, 7
    want_kv = torch.zeros(B, S, C, dtype=dtype, device=DEVICE)
    want_pe = torch.zeros(B, S, R, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        want_kv[:, start:start + T] = norm.cpu()(kv[..., :C].cpu()).to(DEVICE)   # the torch path
        want_pe[:, start:start + T] = apply_rope(kv[..., C:], cos, sin)
    got_kv, got_pe = torch.zeros_like(want_kv), torch.zeros_like(want_pe)
    at = torch.tensor(start, device=DEVICE) if on_device else start
    gpu_rope.latent_to_cache(kv, norm.to(DEVICE).weight.detach(), 1e-6, cos, sin, got_kv, got_pe, at)
    assert not got_kv[:, :start].any() and not got_kv[:, start + T:].any()    # only the new rows written
    assert not got_pe[:, :start].any() and not got_pe[:, start + T:].any()
    check(got_kv[:, start:start + T], want_kv[:, start:start + T], f"c_kv {dtype} B{B} T{T} C{C}")
    check(got_pe[:, start:start + T], want_pe[:, start:start + T], f"k_pe {dtype} B{B} T{T} R{R}")


def test_shapes_are_checked():
    kv = torch.zeros(1, 1, 10, device=DEVICE)
    with pytest.raises(ValueError, match="C \\+ R"):
        gpu_rope.latent_to_cache(kv, torch.ones(8, device=DEVICE), 1e-6, *angles(1, 4), torch.zeros(1, 4, 8, device=DEVICE),
                                 torch.zeros(1, 4, 4, device=DEVICE), 0)
    with pytest.raises(ValueError, match="cos and sin"):
        gpu_rope.rope(torch.zeros(1, 2, 1, 4, device=DEVICE), *angles(1, 4))
