"""kernels/gpu/linear.py: a linear layer on GGUF blocks against x @ W.T on the reference dequantizer's weights
(quant/dequant.py), for the GEMV (a few tokens) and the dequantize-and-multiply path (more).

Tolerances, as normalized squared error NSE = sum((y - ref)^2) / sum(ref^2): float32 x with the blocks'
exact float32 weights, summed in another order than the float64 reference: ~1e-14 measured, bound 1e-10.
bf16 x (GPU only), as relative RMS error: the GEMV reads exact weights and rounds x and y to bf16; the prompt
path rounds the weights to bf16 too: STYLE.md's 5e-3 for both.
"""
import numpy as np
import pytest
import torch

from dslocal.kernels.gpu import gemv
from dslocal.kernels.gpu import linear as gpu_linear
from dslocal.kernels.gpu.linear import GEMV_TOKENS, BlockWeight, linear
from dslocal.quant.dequant import dequantize
from dslocal.quant.ggml import GGMLType
from dslocal.quant.quantize import quantize

T_ = GGMLType
NSE_F32, RMS_BF16 = 1e-10, 5e-3
# type -> (n_in, n_out): whole blocks of columns, rows not a multiple of the row tile
SHAPES = {T_.Q4_K: (512, 37), T_.Q6_K: (256, 21), T_.Q8_0: (96, 45), T_.Q5_0: (160, 19)}
TOKENS = [1, 3, GEMV_TOKENS, GEMV_TOKENS + 1, 40]    # GEMV up to GEMV_TOKENS, then dequantize and multiply


@pytest.fixture(autouse=True)
def few_programs(monkeypatch, device):
    """The interpreter's cost is per program: on the CPU tile 16 rows so a token takes 2-3 programs."""
    if device == "cpu":
        monkeypatch.setattr(gpu_linear, "BLOCK_R", 16)


def nse(y, want) -> float:
    y, want = np.asarray(y, np.float64), np.asarray(want, np.float64)
    return float(((y - want) ** 2).sum() / (want ** 2).sum())


def weight_of(t: GGMLType, n_in: int, n_out: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Blocks uint8 (n_out, row_bytes) of N(0, 1/n_in) values, and their float64 values (n_out, n_in)."""
    raw = quantize(rng.standard_normal((n_out, n_in), dtype=np.float32) / np.float32(n_in ** 0.5), t)
    return raw, dequantize(raw, t).reshape(n_out, n_in).astype(np.float64)


@pytest.mark.parametrize("t", SHAPES, ids=lambda t: t.name)
def test_matches_reference_f32(t, device):
    n_in, n_out = SHAPES[t]
    rng = np.random.default_rng(int(t))
    raw, w = weight_of(t, n_in, n_out, rng)
    bw = BlockWeight(torch.from_numpy(raw).to(device), t, n_in)
    assert bw.n_out == n_out and torch.equal(bw.rows().cpu(), torch.from_numpy(raw))
    assert raw.nbytes <= bw.nbytes <= raw.nbytes + 15 * n_out       # Q6_K planes pad rows to 16 bytes
    for M in TOKENS:
        x = rng.standard_normal((M, n_in), dtype=np.float32)
        y = bw(torch.from_numpy(x).to(device))
        err = nse(y.cpu(), x.astype(np.float64) @ w.T)
        path = "GEMV" if M <= GEMV_TOKENS else "dequantize + matmul"
        print(f"{t.name} {n_out}x{n_in} M={M} ({path}): NSE {err:.2e} (bound {NSE_F32:.0e})")
        assert y.shape == (M, n_out) and y.dtype == torch.float32
        assert err < NSE_F32


def test_leading_axes_and_no_tokens(device):
    rng = np.random.default_rng(1)
    raw, w = weight_of(T_.Q8_0, 64, 10, rng)
    bw = BlockWeight(torch.from_numpy(raw).to(device), T_.Q8_0, 64)
    x = rng.standard_normal((2, 3, 64), dtype=np.float32)
    y = linear(torch.from_numpy(x).to(device), bw)
    assert y.shape == (2, 3, 10) and nse(y.cpu(), x.astype(np.float64) @ w.T) < NSE_F32
    assert linear(torch.zeros(1, 0, 64, device=device), bw).shape == (1, 0, 10)


def test_merged_weight_is_both_weights_as_views(device):
    """merged_with: one product for two projections of one input, the two weights views of the merged one."""
    rng = np.random.default_rng(2)
    (ra, wa), (rb, wb) = weight_of(T_.Q4_K, 256, 12, rng), weight_of(T_.Q4_K, 256, 5, rng)
    a, b = (BlockWeight(torch.from_numpy(r).to(device), T_.Q4_K, 256) for r in (ra, rb))
    both = a.merged_with(b)
    assert both.n_out == 17 and a.blocks.data_ptr() == both.blocks.data_ptr()
    assert b.blocks.data_ptr() == both.blocks[12:].data_ptr()
    x = rng.standard_normal((1, 256), dtype=np.float32)
    y = both(torch.from_numpy(x).to(device))
    assert nse(y.cpu(), x.astype(np.float64) @ np.concatenate([wa, wb]).T) < NSE_F32
    other = BlockWeight(torch.from_numpy(weight_of(T_.Q6_K, 256, 4, rng)[0]).to(device), T_.Q6_K, 256)
    assert a.merged_with(other) is None                   # two types: two products


def test_refuses_what_it_cannot_compute(device):
    raw = torch.zeros(4, 84, dtype=torch.uint8, device=device)                 # Q2_K: no kernel kept for it
    with pytest.raises(ValueError, match="not kept as blocks"):
        BlockWeight(raw, T_.Q2_K, 256)
    with pytest.raises(ValueError, match="needs contiguous uint8 blocks"):
        BlockWeight(torch.zeros(4, 100, dtype=torch.uint8, device=device), T_.Q4_K, 256)
    bw = BlockWeight(torch.zeros(4, 144, dtype=torch.uint8, device=device), T_.Q4_K, 256)
    with pytest.raises(ValueError, match="x must be float"):
        bw(torch.zeros(1, 128, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", SHAPES, ids=lambda t: t.name)
def test_bf16_within_tolerance(t):
    n_in, n_out = SHAPES[t]
    rng = np.random.default_rng(10 + int(t))
    raw, w = weight_of(t, n_in, n_out, rng)
    bw = BlockWeight(torch.from_numpy(raw).cuda(), t, n_in)
    for M in TOKENS:
        x = torch.from_numpy(rng.standard_normal((M, n_in), dtype=np.float32)).cuda().bfloat16()
        y = bw(x)
        err = nse(y.float().cpu(), x.double().cpu().numpy() @ w.T) ** 0.5
        print(f"{t.name} M={M} bf16: relative RMS error {err:.2e} (bound {RMS_BF16:.0e})")
        assert y.dtype == torch.bfloat16 and err < RMS_BF16


def test_q6k_planes_hold_the_rows():
    """gemv.q6k_planes rearranges a row's blocks into aligned planes; q6k_rows gives the same bytes back."""
    rng = np.random.default_rng(3)
    rows = torch.from_numpy(rng.integers(0, 256, (5, 11 * 210), dtype=np.uint8))
    planes = gemv.q6k_planes(rows)
    assert planes.shape == (5, gemv.q6k_plane_bytes(11 * 256)) and planes.shape[1] % 16 == 0
    assert torch.equal(planes[:, :128], rows[:, :128]) and torch.equal(planes[:, 11 * 128:11 * 128 + 64],
                                                                       rows[:, 128:192])
    assert torch.equal(gemv.q6k_rows(planes, 11 * 256), rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", sorted(gemv.TYPES), ids=lambda t: t.name)
def test_gemv_kernels_every_tiling(t):
    """kernels/gpu/gemv.py at every tiling, on 11 blocks a row (a partial last step) and rows that are not a
    multiple of any tile: float32 x within NSE_F32 (its values as 0.5 + q / 256 lose a few bits to the
    offset), bf16 x within RMS_BF16."""
    if not gemv.usable(torch.device("cuda")):
        pytest.skip("this Triton has no Gluon")
    n_in, n_out = 11 * 256, 1001
    rng = np.random.default_rng(20 + int(t))
    raw, w = weight_of(t, n_in, n_out, rng)
    bw = BlockWeight(torch.from_numpy(raw), t, n_in, "cuda")
    assert bw.planar == (t == T_.Q6_K) and torch.equal(bw.rows().cpu(), torch.from_numpy(raw))
    for tile in gemv.TILINGS[t]:
        for M in (1, 3):
            x = torch.from_numpy(rng.standard_normal((M, n_in), dtype=np.float32)).cuda()
            for dtype, bound in ((torch.float32, NSE_F32), (torch.bfloat16, RMS_BF16 ** 2)):
                xd = x.to(dtype)
                y = torch.full((M, n_out), float("nan"), dtype=dtype, device="cuda")
                gemv.gemv(xd, bw.blocks, t, n_in, y, tile)
                err = nse(y.float().cpu(), xd.double().cpu().numpy() @ w.T)
                print(f"{t.name} tile {tile} M={M} {dtype}: NSE {err:.2e} (bound {bound:.0e})")
                assert err < bound
