"""kernels/gpu/act.py::swiglu against torch's silu(gate) * up on the same merged product output.

Without CUDA the kernel runs in the Triton interpreter. fp32: max error relative to the largest value below
1e-6; half precision: at most one unit in the last place (exp may differ from torch's in the last bit
before the rounding to the dtype).
"""
import pytest
import torch
import torch.nn.functional as Fn

from dslocal.kernels.gpu.act import swiglu

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2 * 2816), (3, 2 * 1408), (2, 5, 2 * 40), (0, 8)])
def test_swiglu_matches_torch(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    gu = (3 * torch.randn(*shape[:-1], shape[-1] + 6, generator=g)).to(DEVICE, dtype)[..., :shape[-1]]   # strided
    F = shape[-1] // 2
    want = Fn.silu(gu[..., :F]) * gu[..., F:]
    got = swiglu(gu)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    if not want.numel():
        return
    if dtype == torch.float32:
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-6
    else:
        ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1e-2)
        worst = ((got.float() - want.float()).abs() / ulp).max().item()
        print(f"swiglu {dtype} {shape}: {worst:.2f} ulp")
        assert worst <= 1.0


def test_swiglu_refuses_an_odd_width():
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.zeros(2, 7, device=DEVICE))
