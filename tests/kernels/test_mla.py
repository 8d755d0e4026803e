"""kernels/cpu/mla.py, as offload/hybrid.py BlockAttention runs it in a decode step of a model on the CPU: the
logits of runtime/model.py's torch code with the same weights, one new token at a time and a few at once,
with the per-head products on float32 copies (files with attn_kv_b) and on GGUF blocks.

With blocks the products' inputs are rounded as linear.heads rounds them (11 bits for Q8_0, 8 bits per 256
values for Q4_K, which the torch code can round the same way: tests/kernels/test_linear.py), so the logits
move by that much; a head, position or rope pair mixed up moves them by their own size."""
import dataclasses

import numpy as np
import pytest
import torch

from dslocal.kernels.cpu import mla
from dslocal.offload import hybrid
from dslocal.offload.hybrid import BlockAttention
from dslocal.quant.dequant import dequantize
from dslocal.quant.ggml import GGMLType
from dslocal.quant.quantize import quantize
from dslocal.quant.synthetic import PRESETS
from dslocal.runtime.model import DeepSeek, LatentCache, RMSNorm, init_weights

# max |cpu - torch| / max |torch| of the decode steps' logits (the prefill runs the torch code: 1e-5);
# measured (tiny-v2 / tiny-v3): float 1.2e-6 / 1.7e-6, q8_0 1.4e-3 / 1.8e-3, q4_k 7.0e-3 / 9.3e-3 (with the
# torch code rounding v_b's input as llama.cpp does for K-quants; without, 6.3e-2 / 1.9e-2)
TOL = {"float": 1e-5, "q8_0": 5e-3, "q4_k": 3e-2}


def blocks_of(w: torch.Tensor, t: GGMLType) -> tuple[np.ndarray, torch.Tensor]:
    """w (H, rows, cols) float -> its GGUF blocks (H, rows, row bytes) of type t and their values."""
    H, rows, cols = w.shape
    b = quantize(w.reshape(H * rows, cols).numpy(), t)
    return b.reshape(H, rows, -1), torch.from_numpy(dequantize(b, t).reshape(H, rows, cols).astype(np.float32))


@pytest.mark.parametrize("over", ["items", "chunks"])
@pytest.mark.parametrize("kind", ["float", "q8_0", "q4_k"])
@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_cpu_decode_attention_gives_the_torch_logits(preset, kind, over, monkeypatch):
    """over: the softmax by (head, token) items (mla.attend) or over chunks of positions (mla.attend_chunks,
    here from the first position on, chunks of 2)."""
    if over == "chunks":
        monkeypatch.setattr(hybrid, "ATTEND_CHUNKS_MIN", 1)
        monkeypatch.setattr(hybrid, "ATTEND_CHUNK", 2)
    torch.manual_seed(0)
    m = DeepSeek(dataclasses.replace(PRESETS[preset], vocab_size=256))
    init_weights(m, std=0.05)
    m.eval()
    for module in m.modules():          # the decode steps' norms compiled too, as offload/hybrid.py use_blocks
        if isinstance(module, RMSNorm):
            module.cpu_kernel = True
    calls = []
    for block in m.layers:
        a = block.attn
        if kind == "float":
            attention = BlockAttention(a, None, None)
        else:     # k_b's rows are qk_nope_dim = 32 long: Q8_0 whatever the kind, as llama.cpp falls back
            k_b, wk = blocks_of(a.wk_b.detach().transpose(1, 2).contiguous(), GGMLType.Q8_0)     # (H, C, N)
            v_b, wv = blocks_of(a.wv_b.detach(), GGMLType[kind.upper()])                         # (H, Vh, C)
            a.wk_b.data, a.wv_b.data = wk.transpose(1, 2).contiguous(), wv   # the torch code: the same values
            a.act_v_b = "q8_k" if kind == "q4_k" else None     # x in 8 bits per 256, as linear.heads
            attention = BlockAttention(a, (k_b, GGMLType.Q8_0), (v_b, GGMLType[kind.upper()]))
        a.cpu_decode = lambda *args, attention=attention: calls.append(1) or attention(*args)
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        want = m(tokens)                                            # no cache: the torch code
        cache = LatentCache(m.cfg, 1, 16, torch.float32, "cpu")
        assert len(calls) == 0
        first = m(tokens[:, :5], cache, 0)                          # 5 > DECODE_TOKENS: the torch code
        steps = [m(tokens[:, s:e], cache, s) for s, e in [(5, 6), (6, 9), (9, 10), (10, 12)]]
    assert len(calls) == 4 * m.cfg.n_layer
    for name, out, ref in [("prefill", first, want[:, :5]), ("decode", torch.cat(steps, 1), want[:, 5:])]:
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        print(f"{preset} {kind} {name}: max rel error {err:.2e} (tol {TOL[kind]:.0e})")
        assert err < (1e-5 if name == "prefill" else TOL[kind])


@pytest.mark.parametrize("chunks", [0, 1, 4, 7, 1000])
@pytest.mark.parametrize("start", [0, 200])
def test_attend_is_the_softmax_over_the_cache(start, chunks):
    """attend against the softmax of all scores at once in float64, three new tokens at start.. (each sees
    its own positions), scores spread wide; the cache's rows past the new tokens hold NaN and are not read.
    attend_chunks: the same from chunks of positions (0: attend itself), down to chunks of one position."""
    rng = np.random.default_rng(start)
    H, T, C, R = 5, 3, 64, 16
    q_lat = rng.standard_normal((H, T, C), dtype=np.float32)
    q_pe = rng.standard_normal((T, H, R), dtype=np.float32)
    kv = rng.standard_normal((start + T + 4, C), dtype=np.float32)
    pe = rng.standard_normal((start + T + 4, R), dtype=np.float32)
    kv[start + T:], pe[start + T:] = np.nan, np.nan
    out = np.empty((H, T, C), np.float32)
    if chunks:
        n = min(chunks, start + T)
        parts = np.empty((n, H * T), np.float32), np.empty((n, H * T), np.float32), np.empty((n, H * T, C), np.float32)
        mla.attend_chunks(q_lat, q_pe, kv, pe, start, 0.3, *parts, out)
    else:
        mla.attend(q_lat, q_pe, kv, pe, start, 0.3, out)
    for i in range(T):
        S = start + i + 1
        scores = 0.3 * (q_lat[:, i].astype(np.float64) @ kv[:S].T + q_pe[i].astype(np.float64) @ pe[:S].T)   # (H, S)
        p = np.exp(scores - scores.max(1, keepdims=True))
        want = (p / p.sum(1, keepdims=True)) @ kv[:S].astype(np.float64)
        assert np.abs(out[:, i] - want).max() < 1e-5 * np.abs(want).max()
