"""kernels/cpu/norm.py rms_norm against runtime/model.py RMSNorm's torch code: decode-sized inputs only."""
import pytest
import torch

from dslocal.kernels.cpu.norm import MAX_ROWS, rms_norm
from dslocal.runtime.model import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 2048), (1, 3, 512), (4, 100)])
def test_rms_norm_is_the_torch_norm(shape, dtype):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-6)
    norm.weight.data = torch.randn(shape[-1]) + 1
    x = (torch.randn(shape) * 3).to(dtype)
    with torch.no_grad():
        want = norm(x)                          # cpu_kernel off: the torch code
        got = rms_norm(x, norm.weight, norm.eps)
        norm.cpu_kernel = True
        through_module = norm(x)
    assert got.dtype == dtype and got.shape == x.shape and torch.equal(through_module, got)
    tol = 1e-6 if dtype == torch.float32 else 1e-2           # bf16 outputs: one rounding of the result
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < tol


def test_more_rows_are_refused_and_the_module_keeps_torch_for_them():
    norm = RMSNorm(64, 1e-6)
    norm.cpu_kernel = True
    x = torch.randn(MAX_ROWS + 1, 64)
    with pytest.raises(ValueError, match="at most"):
        rms_norm(x, norm.weight, norm.eps)
    with torch.no_grad():
        assert norm(x).shape == x.shape
