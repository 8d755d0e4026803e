"""kernels/cpu/gemm.py: the dequantizer against quant/dequant.py (bit-exact, float32 and bf16 out), and the
matrix path taken only where it should be (its products are tested against kernels/ref.py in test_moe.py)."""
import numpy as np
import pytest
import torch

from dslocal.kernels import ref
from dslocal.kernels.cpu import gemm
from dslocal.kernels.cpu import moe as cpu
from dslocal.kernels.experts import ExpertTensors
from dslocal.quant.dequant import dequantize
from dslocal.quant.ggml import GGMLType as T_
from dslocal.quant.quantize import quantize

K_QUANTS = [T_.Q4_K, T_.Q5_K, T_.Q6_K, T_.Q2_K, T_.Q3_K]
ALL = K_QUANTS + [T_.Q8_0, T_.Q4_0, T_.Q4_1, T_.Q5_0, T_.Q5_1, T_.BF16, T_.F16, T_.F32]


def experts(t, rng, E=4, F=64, D=512):
    """Random experts of type t; down in Q8_0 when t is a K-quant (rows of F = 64 are not super-blocks)."""
    td = T_.Q8_0 if t in K_QUANTS else t
    q = lambda rows, cols, tt, s: quantize(rng.standard_normal((E, rows, cols), dtype=np.float32) * s, tt)  # noqa: E731
    # scales up to 1e4 reach every fp16 exponent the blocks' scales use; bf16 rounding then matters
    return ExpertTensors(q(F, D, t, 3.0), q(F, D, t, 1e-3), q(D, F, td, 1e4), t, t, td)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_dequantize_experts_is_bit_exact(t):
    rng = np.random.default_rng(int(t))
    ex = experts(t, rng)
    F, D = ex.ffn, ex.hidden
    which = np.array([3, 1], np.int64)
    want_gu = [np.concatenate([dequantize(ex.gate[e], ex.gate_type), dequantize(ex.up[e], ex.up_type)]) for e in which]
    want_dn = [dequantize(ex.down[e], ex.down_type) for e in which]
    args = (ex.gate, ex.up, ex.down, int(ex.gate_type), int(ex.up_type), int(ex.down_type), which)
    gu, dn = np.empty((3, 2 * F, D), np.float32), np.empty((3, D, F), np.float32)   # one slot more than needed
    gemm.dequantize_experts(*args, gu, dn, 32)
    gb, db = np.empty((2, 2 * F, D), np.uint16), np.empty((2, D, F), np.uint16)
    gemm.dequantize_experts(*args, gb, db, 32)
    for g in range(2):
        assert np.array_equal(gu[g].view(np.uint32), want_gu[g].view(np.uint32))
        assert np.array_equal(dn[g].view(np.uint32), want_dn[g].view(np.uint32))
        # bf16 bits as torch rounds float32 (to nearest, ties to even)
        assert np.array_equal(gb[g], torch.from_numpy(want_gu[g]).bfloat16().view(torch.int16).numpy().view(np.uint16))
        assert np.array_equal(db[g], torch.from_numpy(want_dn[g]).bfloat16().view(torch.int16).numpy().view(np.uint16))


def test_only_experts_with_enough_tokens_take_the_matrix_path(monkeypatch):
    """One expert with many tokens, the rest with few: only that one goes to add_experts."""
    rng = np.random.default_rng(3)
    ex = experts(T_.Q4_K, rng)
    T = max(gemm.GEMM_MIN_CALL, gemm.GEMM_MIN_TOKENS_TILED) + 5    # Q4_K gate / up: tiles of eight below
    ids = np.stack([np.full(T, 2), rng.integers(0, 2, T)], axis=1).astype(np.int64)   # expert 2: every token
    ids[10:, 1] = -1          # experts 0 and 1 get at most 10 tokens; the other pairs are computed elsewhere
    ids[-1, 0] = -1
    w = rng.random((T, 2), dtype=np.float32)
    x = rng.standard_normal((T, ex.hidden), dtype=np.float32)
    seen = []
    real = gemm.add_experts
    monkeypatch.setattr(gemm, "add_experts", lambda *a: (seen.append(list(a[4])), real(*a)))
    monkeypatch.setattr(gemm, "ENABLED", True)
    y = cpu.moe_ffn(x, ids, w, ex)
    assert seen == [[2]]
    want = np.asarray(ref.moe_ffn(x, ids, w, ex))
    assert ((y - want) ** 2).sum() / (want ** 2).sum() < 3e-4
    monkeypatch.setattr(gemm, "ENABLED", False)
    seen.clear()
    cpu.moe_ffn(x, ids, w, ex)
    assert seen == []


def test_enabled_follows_the_setting_then_the_environment(monkeypatch):
    monkeypatch.setattr(gemm, "ENABLED", None)
    monkeypatch.setenv("DSLOCAL_CPU_GEMM", "1")
    assert gemm.enabled()
    monkeypatch.setenv("DSLOCAL_CPU_GEMM", "0")
    assert not gemm.enabled()
    monkeypatch.setattr(gemm, "ENABLED", True)
    assert gemm.enabled()
