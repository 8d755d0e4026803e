"""kernels/gpu/norm.py::rms_norm against kernels/ref.py::rms_norm, and the reference against the model's RMSNorm.

Without CUDA the kernel runs in the Triton interpreter, in fp32 and fp16 (its bf16 is wrong). Tolerances
(STYLE.md section 5): fp32 max |out - ref| / max |ref| below 1e-5; fp16 and bf16 relative RMS below 5e-3.
"""
import pytest
import torch

from dslocal.kernels import ref
from dslocal.kernels.gpu import norm
from dslocal.runtime.model import RMSNorm

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = 1e-5      # max |out - ref| / max |ref|
HALF_TOL = 5e-3      # |out - ref| / |ref|
EPS = 1e-6
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def check(out, want, what):
    if out.dtype == torch.float32:
        err = ((out - want).abs().max() / want.abs().max()).item()
        print(f"{what}: max rel error {err:.2e} (tol {FP32_TOL:.0e})")
        assert err < FP32_TOL
    else:
        err = ((out.float() - want.float()).norm() / want.float().norm()).item()
        print(f"{what}: rel RMS error {err:.2e} (tol {HALF_TOL:.0e})")
        assert err < HALF_TOL


def inputs(M, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=g) * 3.0
    res = torch.randn(M, D, generator=g)
    w = 1.0 + 0.5 * torch.randn(D, generator=g)        # fp32, as the model keeps norm weights
    return x.to(DEVICE, dtype), res.to(DEVICE, dtype), w.to(DEVICE)


def test_reference_is_the_model_norm():
    x, res, w = inputs(7, 513, torch.float32)
    module = RMSNorm(513, EPS)
    with torch.no_grad():
        module.weight.copy_(w)
        want = module.cpu()(x.cpu())
    y, h = ref.rms_norm(x.cpu(), w.cpu(), EPS)
    assert h is not None
    check(y, want, "ref vs RMSNorm")
    y, h = ref.rms_norm(x.cpu(), w.cpu(), EPS, res.cpu())
    check(h, x.cpu() + res.cpu(), "ref residual sum")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [7, 100, 512, 2048])
@pytest.mark.parametrize("M", [1, 7, 63])
@pytest.mark.parametrize("with_res", [False, True], ids=["plain", "residual"])
def test_matches_reference(with_res, M, D, dtype):
    x, res, w = inputs(M, D, dtype, seed=M + D)
    r = res if with_res else None
    y, h = norm.rms_norm(x, w, EPS, r)
    y_ref, h_ref = ref.rms_norm(x, w, EPS, r)
    assert y.dtype == dtype and y.shape == x.shape
    check(y, y_ref, f"M={M} D={D} {dtype} {'residual' if with_res else 'plain'}")
    if with_res:
        # the sum rounds to x's dtype exactly as torch's addition does
        assert torch.equal(h, h_ref)
    else:
        assert h is x


def test_model_shapes_and_strided_rows():
    """(B, T, D) input, and the model's kv_norm input: the first C columns of a (B, T, C + R) projection."""
    kv = torch.randn(2, 5, 512 + 64, device=DEVICE)
    w = torch.rand(512, device=DEVICE)
    c_kv = kv[..., :512]                                                     # (B, T, C), row stride C + R
    y, _ = norm.rms_norm(c_kv, w, EPS)
    check(y, ref.rms_norm(c_kv, w, EPS)[0], "strided (2, 5, 512) rows")
    x, res, w = inputs(9, 7168, torch.float32, seed=1)
    y, h = norm.rms_norm(x.view(3, 3, 7168), w, EPS, res.view(3, 3, 7168))
    y_ref, h_ref = ref.rms_norm(x, w, EPS, res)
    check(y.view(9, 7168), y_ref, "(3, 3, 7168) with residual")


def test_rejects_bad_inputs():
    x, res, w = inputs(4, 64, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        norm.rms_norm(x, w[:32], EPS)
    with pytest.raises(ValueError, match="residual"):
        norm.rms_norm(x, w, EPS, res.half())
    with pytest.raises(ValueError, match="last axis"):
        norm.rms_norm(x.t(), w[:4], EPS)
