"""kernels/cpu/moe.py::moe_ffn against kernels/ref.py::moe_ffn, for every weight type, at odd shapes.

Tolerances, as normalized squared error sum((y - ref)^2) / sum(ref^2) (both use the same quantized weights,
so only the activation side differs):
- Quantized types (K-quants Q2_K..Q6_K and the 32-value types Q4_0..Q8_0): x and h = silu(gate x) * up x
  are rounded to 11-bit integers in blocks of 256 (kernels/cpu/rows.py). A block's step is max|v| / 1023 and
  the rounding error has variance step^2 / 12; for Gaussian x (max ~3.5 sigma) that is ~1e-6 of the signal,
  and for heavy-tailed h with block maxima up to ~10 sigma ~8e-6. Two such roundings in series measure
  1e-6..9e-6 over these cases (one token with one expert varies most); the bound 5e-5 leaves 5x room (inputs
  are seeded) and is 10x below STYLE.md's 5e-4 for quantized matmuls, so a wrong scale or min in one
  sub-block (NSE ~1e-3 and up) still fails. The 32-value types were dotted in float32 with unquantized
  activations (bound 1e-10) until their integer dot, which is 3-6x faster per core (kernels/cpu/NOTES.md),
  gave them the same activation rounding as the K-quants.
- K-quants: x and h go in 8 bits (rows.py, XMAX8: llama.cpp's Q8_K), so a step is max|v| / 127, variance
  ~6e-5 of the signal for Gaussian x (gate and up each add one: 0.75e-4..1.31e-4 measured with h in 11
  bits) and more for heavy-tailed h: 2.4e-4..5.4e-4 measured with both in 8 bits (one token with one
  expert varies most). Bound 1e-3: two quantized products in series, each within STYLE.md's 5e-4; a wrong
  sub-block scale still fails (Q4_K with two scales swapped: NSE 0.5). The weights' own rounding is
  20-300x larger (README: NSE 0.021 for Q6_K to 0.33 for Q2_K).
- Q4_0 / Q5_0 / Q4_1 / Q5_1: x and h go in 8 bits with a scale per 32 values (rows.py quantize_row32, llama.cpp's Q8_0
  input for these types): 1.1e-4..1.9e-4 measured; the K-quants' bound 1e-3 on the same argument. The
  weights' own rounding is NSE ~1.8e-3 (Q5_0) to ~7e-3 (Q4_0). So do Q8_0's inputs in calls of TILE8_MIN
  tokens or more (its tiles of eight take them so; one at a time it keeps 11 bits): bound 1e-3 there.
- F32 / F16 / BF16 are dotted in float32 with unquantized activations: only the order of the float32 sums
  differs, ~1e-13 measured; bound 1e-10.
- Experts with many tokens on the matrix path (kernels/cpu/gemm.py, tested here whatever the CPU): quantized
  weights and the activations in bf16, five roundings of relative step 2^-8 in series (x, gate, up, h,
  down): 2.6-2.8e-5 measured at T = 200 for every quantized type; bound 1e-4 (the 32-value types' 5e-5
  leaves too little room). Float weights are multiplied in float32 there: the float bound holds.
"""
import numpy as np
import pytest
import torch

from dslocal.kernels import ref
from dslocal.kernels.cpu import gemm
from dslocal.kernels.cpu import moe as cpu
from dslocal.kernels.cpu.rows import TILE8_MIN
from dslocal.kernels.experts import ExpertTensors
from dslocal.quant.ggml import GGMLType
from dslocal.quant.quantize import quantize

T_ = GGMLType
K_QUANTS = [T_.Q4_K, T_.Q5_K, T_.Q6_K, T_.Q2_K, T_.Q3_K]
BLOCK32 = [T_.Q8_0, T_.Q4_0, T_.Q4_1, T_.Q5_0, T_.Q5_1]
FLOAT_DOTTED = [T_.BF16, T_.F16, T_.F32]
BYTES32 = [T_.Q4_0, T_.Q5_0, T_.Q4_1, T_.Q5_1]
NSE_BOUND = {**{t: 1e-3 if cpu.GATE_UP_8BIT or cpu.DOWN_8BIT else 5e-5 for t in K_QUANTS + BYTES32},
             **{t: 5e-5 for t in BLOCK32 if t not in BYTES32}, **{t: 1e-10 for t in FLOAT_DOTTED}}
FAST = [cpu.moe_ffn]
MATRIX_BOUND = 1e-4
TILE_BOUND = 1e-3   # Q8_0 in calls with tiles of eight
E = 12


def nse(y, want) -> float:
    y, want = np.asarray(y, np.float64), np.asarray(want, np.float64)
    return float(((y - want) ** 2).sum() / (want ** 2).sum())


def experts_of(t: GGMLType, D: int, F: int, rng, down: GGMLType | None = None) -> ExpertTensors:
    """Random experts, weights N(0, 1/fan-in) quantized to t (down to `down`, default t)."""
    down = down or t

    def q(rows, cols, tt):
        return quantize(rng.standard_normal((E, rows, cols), dtype=np.float32) / np.float32(cols ** 0.5), tt)
    return ExpertTensors(q(F, D, t), q(F, D, t), q(D, F, down), t, t, down)


def routing(T: int, K: int, rng, used: int = E - 3):
    """Top-k ids drawn from the first `used` experts only (the rest get no tokens), and weights."""
    ids = np.stack([rng.choice(used, K, replace=False) for _ in range(T)]).astype(np.int64)
    return ids.reshape(T, K), rng.random((T, K), dtype=np.float32)


# (T, K): decode, a few tokens, odd counts, a prefill-sized batch; K from 1 to 8
CASES = [(1, 1), (1, 8), (3, 6), (17, 3), (200, 2), (200, 7)]


@pytest.fixture(params=["rows", "matrix"])
def path(request, monkeypatch):
    """Run with the row kernels only, or with experts of enough tokens on the matrix path (GEMM_MIN_TOKENS,
    or GEMM_MIN_TOKENS_TILED for K-quant gate / up)."""
    monkeypatch.setattr(gemm, "ENABLED", request.param == "matrix")
    return request.param


@pytest.mark.parametrize("fast", FAST, ids=lambda f: f.__module__)
@pytest.mark.parametrize("t", K_QUANTS + BLOCK32 + FLOAT_DOTTED, ids=lambda t: t.name)
def test_moe_ffn_matches_reference(fast, t, path):
    rng = np.random.default_rng(int(t))
    # K-quants need rows of whole 256-value super-blocks; the 32-value types get dims that leave a partial
    # 256-value chunk at the end of every row (288 = 256 + 32, 160 = 5 * 32)
    D, F = (512, 256) if t in K_QUANTS else (288, 160)
    ex = experts_of(t, D, F, rng)
    for T, K in CASES:
        x = rng.standard_normal((T, D), dtype=np.float32)
        ids, w = routing(T, K, rng)
        y, want = fast(x, ids, w, ex), ref.moe_ffn(x, ids, w, ex)
        err = nse(y, want)
        least = gemm.GEMM_MIN_TOKENS if t in FLOAT_DOTTED else gemm.GEMM_MIN_TOKENS_TILED   # tiles of eight
        matrix = path == "matrix" and T >= gemm.GEMM_MIN_CALL and np.bincount(ids.ravel()).max() >= least
        bound = TILE_BOUND if t == T_.Q8_0 and T >= TILE8_MIN else NSE_BOUND[t]
        bound = max(bound, MATRIX_BOUND) if matrix and t not in FLOAT_DOTTED else bound
        print(f"{t.name} T={T} K={K} {'matrix' if matrix else 'rows'}: NSE {err:.2e} (bound {bound:.0e})")
        assert y.shape == (T, D) and y.dtype == np.float32
        assert err < bound, f"{t.name} T={T} K={K}: NSE {err:.2e}"


def test_mixed_types_as_in_q4_k_m():
    """A real V2-Lite Q4_K_M layer: gate/up Q4_K, down Q5_0 (rows of 1408 are not whole super-blocks)."""
    rng = np.random.default_rng(1)
    ex = experts_of(T_.Q4_K, 256, 1408 // 4, rng, down=T_.Q5_0)
    x = rng.standard_normal((5, 256), dtype=np.float32)
    ids, w = routing(5, 6, rng)
    assert nse(cpu.moe_ffn(x, ids, w, ex), ref.moe_ffn(x, ids, w, ex)) < NSE_BOUND[T_.Q4_K]


def test_only_the_types_in_use_compile(tmp_path):
    """A fresh process that runs a Q8_0 layer and a Q4_K linear layer gets those types' row kernels only
    (rows.py rows_dot picks them at compile time; compiling all thirteen took ~100 s on two cores), and one
    compiled layer and linear call each, however often it calls them. With an empty Numba cache: a caller
    loaded from the cache does not load its callees' dispatchers, whose signatures then stay empty."""
    import os
    import subprocess
    import sys
    code = """if True:
        import numpy as np
        from dslocal.kernels.cpu import linear, moe, rows
        from dslocal.kernels.experts import ExpertTensors
        from dslocal.quant.ggml import GGMLType
        from dslocal.quant.quantize import quantize
        rng = np.random.default_rng(0)
        w = lambda *shape, t=GGMLType.Q8_0: quantize(rng.standard_normal(shape, dtype=np.float32), t)
        ex = ExpertTensors(w(4, 64, 256), w(4, 64, 256), w(4, 256, 64), *[GGMLType.Q8_0] * 3)
        x = rng.standard_normal((2, 256), dtype=np.float32)
        for _ in range(3):
            moe.moe_ffn(x, np.array([[0, 1], [1, 3]]), np.ones((2, 2), np.float32), ex)
            linear.linear(x, w(32, 256, t=GGMLType.Q4_K), GGMLType.Q4_K)
        print(sorted(k.__name__ for k in rows._KERNELS.values() if k.signatures))
        print(len(moe._moe_layer.signatures), len(linear._linear.signatures))"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["['_rows_q4_k', '_rows_q8_0']", "1 1"]
    assert run.stderr.count("compiling the CPU MoE kernels for Q8_0 / Q8_0 / Q8_0 experts") == 1


def test_32_value_types_take_8_bit_input_in_blocks_of_32():
    """x and h of a Q4_0 / Q5_0 / Q4_1 / Q5_1 layer are quantized in blocks of 32 (one scale each), not in int16."""
    rng = np.random.default_rng(5)
    for t in BYTES32:
        ex = experts_of(t, 288, 160, rng)
        x = rng.standard_normal((3, 288), dtype=np.float32)
        ids, w = routing(3, 4, rng)
        call = cpu.LayerCall(x, ids, w, ex)
        (x8, xd8, xo8), x16, _, _, _, (h8, hd8, ho8), h16 = call._scratch[:7]
        assert x8.shape == (3, 288) and xd8.shape == (3, 9) and xo8.shape == (3, 72) and x16.shape[0] == 0
        assert h8.shape == (12, 160) and hd8.shape == (12, 5) and ho8.shape == (12, 40) and h16.shape[0] == 0
        assert nse(call(), ref.moe_ffn(x, ids, w, ex)) < NSE_BOUND[t]


def test_q8_0_tiles_take_8_bit_input_beside_its_rows_11():
    """A Q8_0 layer takes x and h in 11 bits (its rows) and, in calls of TILE8_MIN tokens or more, in 8 bits per
    32 values too (its tiles of eight), each expert with TILE8_MIN tokens or more taking the tiles."""
    rng = np.random.default_rng(6)
    ex = experts_of(T_.Q8_0, 288, 160, rng)
    for T in (TILE8_MIN - 1, 20):
        x = rng.standard_normal((T, 288), dtype=np.float32)
        ids, w = routing(T, 2, rng, used=4)
        call = cpu.LayerCall(x, ids, w, ex)
        (x8, xd8, _), x16, _, _, _, (h8, hd8, _), h16, _, _, _, (xt, _, _), (ht, _, _) = call._scratch
        tiled = T >= TILE8_MIN
        assert x16.shape == (T, 288) and h16.shape == (2 * T, 160)
        assert x8.shape[0] == h8.shape[0] == 0 or (x8.shape, xd8.shape, h8.shape, hd8.shape) == (
            (T, 288), (T, 9), (2 * T, 160), (2 * T, 5))                  # in blocks of 32
        assert (x8.shape[0] > 0) == tiled and (h8.shape[0] > 0) == tiled
        assert (xt.shape[0] > 0) == tiled and (ht.shape[0] > 0) == tiled
        assert nse(call(), ref.moe_ffn(x, ids, w, ex)) < (TILE_BOUND if tiled else NSE_BOUND[T_.Q8_0])


def test_torch_in_torch_out_and_out_buffer():
    rng = np.random.default_rng(2)
    ex = experts_of(T_.Q8_0, 64, 96, rng)
    x = torch.randn(4, 64)
    ids, w = routing(4, 2, rng)
    y = cpu.moe_ffn(x, torch.from_numpy(ids), torch.from_numpy(w), ex)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    out = torch.full((4, 64), float("nan"))
    assert cpu.moe_ffn(x, ids, w, ex, out=out) is out
    assert torch.equal(out, y)
    want = ref.moe_ffn(x, ids, w, ex)
    assert isinstance(want, torch.Tensor) and nse(y, want) < NSE_BOUND[T_.Q8_0]


def test_duplicate_ids_add_up_and_no_tokens():
    rng = np.random.default_rng(3)
    ex = experts_of(T_.Q4_K, 256, 256, rng)
    x = rng.standard_normal((2, 256), dtype=np.float32)
    ids = np.array([[3, 3], [5, 3]])
    w = np.array([[0.25, 0.5], [1.0, 2.0]], np.float32)
    assert nse(cpu.moe_ffn(x, ids, w, ex), ref.moe_ffn(x, ids, w, ex)) < NSE_BOUND[T_.Q4_K]
    empty = cpu.moe_ffn(np.zeros((0, 256), np.float32), np.zeros((0, 2), np.int64), np.zeros((0, 2), np.float32), ex)
    assert empty.shape == (0, 256)


def test_non_finite_input_reaches_the_output():
    rng = np.random.default_rng(4)
    ex = experts_of(T_.Q6_K, 256, 256, rng)
    x = rng.standard_normal((3, 256), dtype=np.float32)
    x[1, 7] = np.inf
    ids, w = routing(3, 2, rng)
    y = cpu.moe_ffn(x, ids, w, ex)
    assert not np.isfinite(y[1]).any() and np.isfinite(y[[0, 2]]).all()


def test_bad_arguments_are_clear_errors():
    rng = np.random.default_rng(5)
    ex = experts_of(T_.Q8_0, 64, 32, rng)
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 12\)"):
        cpu.moe_ffn(x, np.array([[0], [12]]), np.ones((2, 1), np.float32), ex)
    with pytest.raises(ValueError, match="x \\(T, 64\\)"):
        cpu.moe_ffn(np.zeros((2, 32), np.float32), np.zeros((2, 1), np.int64), np.ones((2, 1), np.float32), ex)
    with pytest.raises(ValueError, match="out must be"):
        cpu.moe_ffn(x, np.zeros((2, 1), np.int64), np.ones((2, 1), np.float32), ex, out=np.zeros((2, 64)))
    with pytest.raises(ValueError, match="do not fit together"):
        ExpertTensors(ex.gate, ex.up, ex.gate, T_.Q8_0, T_.Q8_0, T_.Q8_0)
    with pytest.raises(ValueError, match="IQ2_XXS"):
        ExpertTensors(ex.gate, ex.up, ex.down, T_.IQ2_XXS, T_.Q8_0, T_.Q8_0)


def test_layer_straight_from_a_gguf_file(tiny_gguf):
    """Zero-copy expert views of a Q4_K_M file (read-only memory map), as the runtime will pass them."""
    from dslocal.kernels.experts import from_gguf
    from dslocal.quant.gguf_file import open_gguf

    with open_gguf(tiny_gguf("tiny-v2", "q4_k_m")) as f:
        ex = from_gguf(f, 1)
        assert not ex.gate.flags.writeable and ex.gate_type == T_.Q4_K
        rng = np.random.default_rng(6)
        x = rng.standard_normal((9, ex.hidden), dtype=np.float32)
        ids, w = routing(9, 2, rng, used=ex.n_expert)
        err = nse(cpu.moe_ffn(x, ids, w, ex), ref.moe_ffn(x, ids, w, ex))
        print(f"tiny-v2 Q4_K_M layer 1 ({ex.gate_type.name}/{ex.down_type.name}): NSE {err:.2e}")
        assert err < NSE_BOUND[ex.gate_type]
        with pytest.raises(ValueError, match="no routed experts"):
            from_gguf(f, 0)


def test_pairs_with_id_minus_one_are_skipped():
    """-1 marks a pair computed on the other device (offload/hybrid.py): it adds nothing here."""
    rng = np.random.default_rng(7)
    ex = experts_of(T_.Q4_K, 256, 256, rng)
    x = rng.standard_normal((4, 256), dtype=np.float32)
    ids, w = routing(4, 3, rng)
    ids[0, 1] = ids[2, 0] = ids[3, :] = -1
    y = cpu.moe_ffn(x, ids, w, ex)
    kept = ids >= 0
    want = ref.moe_ffn(x, np.where(kept, ids, 0), np.where(kept, w, 0).astype(np.float32), ex)
    assert nse(y, want) < NSE_BOUND[T_.Q4_K] and not y[3].any()


def test_a_layer_call_reads_its_buffers_anew_each_time():
    """LayerCall: checked and allocated once, then each call sees what the buffers hold at that moment."""
    rng = np.random.default_rng(5)
    ex = experts_of(GGMLType.Q4_K, 256, 256, rng)
    T, K = 3, 4
    x, ids, w, out = np.zeros((T, 256), np.float32), np.zeros((T, K), np.int64), np.zeros((T, K), np.float32), \
        np.zeros((T, 256), np.float32)
    call = cpu.LayerCall(x, ids, w, ex, out)
    for seed in range(3):
        r = np.random.default_rng(seed)
        x[:] = r.standard_normal((T, 256))
        ids[:], w[:] = routing(T, K, r)
        ids[0, 1] = -1                          # a pair computed elsewhere
        assert call() is out
        assert np.array_equal(out, cpu.moe_ffn(x.copy(), ids.copy(), w.copy(), ex))
    with pytest.raises(ValueError, match="out must be"):
        cpu.LayerCall(x, ids, w, ex, np.zeros((T, 255), np.float32))


def test_a_synced_layer_call_waits_for_its_flag_and_sets_its_own(monkeypatch):
    """LayerCall.synced (the decode step's hand-off, offload/graphs.py): runs only once the ready flag holds
    the step's number, then sets the done flag; an abort flag or a timeout ends the wait without running."""
    import threading
    import time
    rng = np.random.default_rng(6)
    ex = experts_of(T_.Q4_K, 256, 96, rng, down=T_.Q5_0)
    x = rng.standard_normal((1, 256), dtype=np.float32)
    ids, w = routing(1, 4, rng)
    call = cpu.LayerCall(x, ids, w, ex)
    want = call().copy()
    call.out[:] = 0
    sync = np.zeros(24, np.int64)             # ready at 0, done at 8, abort at 16, as offload/graphs.py spaces them
    monkeypatch.setattr(cpu, "SPINS", 1000)   # back in Python often: the timeout path is taken too
    writer = threading.Timer(0.2, lambda: sync.__setitem__(0, 5))
    writer.start()
    t0 = time.monotonic()
    assert call.synced(sync, 0, 8, 16, 5)
    writer.join()
    assert time.monotonic() - t0 >= 0.15 and sync[8] == 5 and np.array_equal(call.out, want)
    call.out[:] = 0
    sync[16] = 6                               # given up: no run, done untouched
    assert not call.synced(sync, 0, 8, 16, 6) and sync[8] == 5 and not call.out.any()
    with pytest.raises(TimeoutError, match="did not arrive"):
        call.synced(sync, 0, 8, 16, 7, timeout=0.2)
    assert sync[8] == 5 and not call.out.any()
    ids[:] = -1                                # every expert the GPU's: done at once, out not written
    call.out[:] = np.nan
    sync[0] = 8
    assert call.synced(sync, 0, 8, 16, 8) and sync[8] == 8 and np.isnan(call.out).all()


@pytest.mark.parametrize("share, small", [(0, 1), (50, 64), (100, 4)])
def test_any_cut_into_chunks_gives_the_same_bits(monkeypatch, share, small):
    """Threads claim chunks of weight rows (moe.py FIRST_SHARE / SMALL_CHUNKS); every row's dot is the same
    however the rows are cut, including chunks of no rows (more chunks than rows, or no first share)."""
    rng = np.random.default_rng(11)
    ex = experts_of(T_.Q4_K, 256, 96, rng, down=T_.Q5_0)
    x = rng.standard_normal((9, 256), dtype=np.float32)
    ids, w = routing(9, 3, rng)
    want = cpu.moe_ffn(x, ids, w, ex)
    monkeypatch.setattr(cpu, "FIRST_SHARE", share)
    monkeypatch.setattr(cpu, "SMALL_CHUNKS", small)
    assert np.array_equal(cpu.moe_ffn(x, ids, w, ex), want)


@pytest.mark.parametrize("down, F", [(T_.Q5_0, 352), (T_.Q4_K, 512), (T_.Q8_0, 352), (T_.BF16, 352)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_h_inside_step_2_and_one_region_give_the_same_bits(monkeypatch, down, F):
    """Calls of up to H_IN_STEP2_PAIRS pairs quantize h inside step 2: the thread whose chunk completes a
    unit of h's columns (32 where h goes in 8 bits in blocks of 32: Q5_0; else 256, the last unit partial
    where F = 352: Q8_0's 11 bits) quantizes it for every pair; with ONE_REGION steps 2 and 4 then run in one
    parallel region, whose threads wait for every column of h before step 4. The same bits as steps of their
    own, for chunks that cut across units and for calls with tiles of eight (T = 17: h's tiles keep the
    regions apart)."""
    rng = np.random.default_rng(12)
    ex = experts_of(T_.Q4_K, 256, F, rng, down=down)
    for T, K in [(1, 6), (3, 8), (17, 3)]:
        x = rng.standard_normal((T, 256), dtype=np.float32)
        ids, w = routing(T, K, rng)
        monkeypatch.setattr(cpu, "H_IN_STEP2_PAIRS", 0)
        want = cpu.moe_ffn(x, ids, w, ex)
        monkeypatch.setattr(cpu, "H_IN_STEP2_PAIRS", 64)
        for one_region in (False, True):
            monkeypatch.setattr(cpu, "ONE_REGION", one_region)
            for share, small in [(75, 4), (0, 7), (50, 64)]:
                monkeypatch.setattr(cpu, "FIRST_SHARE", share)
                monkeypatch.setattr(cpu, "SMALL_CHUNKS", small)
                got = cpu.moe_ffn(x, ids, w, ex)
                assert np.array_equal(got, want), (T, K, one_region, share, small)
