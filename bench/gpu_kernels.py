"""Throughput of the GPU kernels for GGUF blocks: dequantize per type, and the decode-shaped routed-expert FFN
(kernels/gpu/moe.py::moe_ffn) against torch bf16 matmuls on the same weights dequantized.

    python -m dslocal.bench.gpu_kernels [--mib 256] [--tokens 1] [--iters 50] [--json out.json]

Each time is the median of --iters runs, each run timed with CUDA events after a 256 MiB write that evicts
the L2 cache (a real decode step reads every layer's experts once, never from cache). GB/s counts the bytes a
kernel must move: dequantize reads blocks and writes bf16 values; moe_ffn reads each selected expert's three
matrices once (activations are a few KB). "peak" is a measured device-to-device copy (read + write bytes).
moe_ffn is timed as called from Python ("eager": three launches and Python overhead) and replayed from a
CUDA graph ("graph", as the decode loop runs it; GB/s is of the graph, or of eager when T * K is more than
DECODE_PAIRS, the prefill path, which cannot be captured); the torch column is a graph of one bf16 GEMV per matrix
and pair. Weights are random blocks with small fp16 scales; the V2-Lite down projection uses llama-quantize's
fallback types (rows of 1408 are not whole 256-value super-blocks): Q8_0 stays blocks, Q5_0 goes dense bf16.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from dslocal.kernels.gpu.dequant import LAYOUT, dequantize
from dslocal.kernels.gpu.moe import DECODE_PAIRS, KEEP_BLOCKS, GPUExperts, moe_ffn
from dslocal.quant.ggml import TYPE_INFO, GGMLType

T_ = GGMLType
# name: hidden D, expert ffn F, top-k K (HF config.json), and the gate / up / down types
MOE_CASES = {
    "V2-Lite Q4_K/Q8_0": (2048, 1408, 6, T_.Q4_K, T_.Q4_K, T_.Q8_0),
    "V2-Lite Q4_K/Q5_0": (2048, 1408, 6, T_.Q4_K, T_.Q4_K, T_.Q5_0),
    "V3 Q4_K/Q6_K": (7168, 2048, 8, T_.Q4_K, T_.Q4_K, T_.Q6_K),
    "V3 Q8_0": (7168, 2048, 8, T_.Q8_0, T_.Q8_0, T_.Q8_0),
}
FLUSH_BYTES = 256 << 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dslocal.bench.gpu_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=256, help="MiB of bf16 output per dequantize call")
    p.add_argument("--tokens", type=int, default=1, help="tokens per moe_ffn call (decode: 1)")
    p.add_argument("--iters", type=int, default=50, help="timed runs per measurement (the median is shown)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("dslocal.bench.gpu_kernels needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured")
        return 1

    timer = _Timer(args.iters)
    peak = _copy_bandwidth(timer)
    print(f"device: {torch.cuda.get_device_name()}; measured peak (device copy, read + write): {peak:.0f} GB/s")
    result = {"device": torch.cuda.get_device_name(), "peak_GB_per_s": peak,
              "dequantize": _bench_dequantize(timer, args.mib, peak),
              "moe_ffn": _bench_moe(timer, args.tokens, peak)}
    result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    print(f"peak GPU memory allocated: {result['peak_memory_bytes'] / 2**30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as fp:
            json.dump(result, fp, indent=2)
    return 0


class _Timer:
    """Median milliseconds of fn() over `iters` runs, L2 evicted before each (CUDA events)."""

    def __init__(self, iters: int):
        self.iters = max(1, iters)
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        fn()                                               # warm-up: compiles, allocates
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _copy_bandwidth(timer: _Timer) -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = timer(lambda: b.copy_(a))
    return 2 * (1 << 30) / ms / 1e6


def _random_blocks(shape, t: GGMLType) -> torch.Tensor:
    """uint8 (*shape, type_size) random bytes on the GPU; odd bytes (the high byte of every fp16 field) keep
    exponents below 8, so scales are below 2^-7 and nothing overflows."""
    raw = torch.randint(0, 256, (*shape, TYPE_INFO[t].type_size), dtype=torch.uint8, device="cuda")
    raw[..., 1::2] &= 0x9F
    return raw


def _bench_dequantize(timer: _Timer, mib: int, peak: float) -> list[dict]:
    rows = []
    print(f"\ndequantize -> bf16, {mib} MiB of output per call")
    print(f"{'type':<6} {'in MB':>8} {'out MB':>8} {'us':>9} {'GB/s':>8} {'% peak':>7}")
    for t, layout in LAYOUT.items():
        if layout.plain is not None:
            continue
        info = TYPE_INFO[t]
        n_blocks = (mib << 20) // 2 // info.block_size
        try:
            raw = _random_blocks((n_blocks,), t)
            ms = timer(lambda: dequantize(raw, t, torch.bfloat16))
        except Exception as err:                           # one broken type must not hide the others
            print(f"{t.name:<6} failed: {type(err).__name__}: {err}")
            rows.append({"type": t.name, "error": repr(err)})
            continue
        in_b, out_b = raw.numel(), n_blocks * info.block_size * 2
        gbs = (in_b + out_b) / ms / 1e6
        rows.append({"type": t.name, "in_bytes": in_b, "out_bytes": out_b, "ms": ms, "GB_per_s": gbs,
                     "fraction_of_peak": gbs / peak})
        print(f"{t.name:<6} {in_b / 1e6:>8.1f} {out_b / 1e6:>8.1f} {ms * 1e3:>9.1f} {gbs:>8.0f} {gbs / peak:>7.0%}")
    return rows


def _bench_moe(timer: _Timer, tokens: int, peak: float) -> list[dict]:
    rows = []
    print(f"\nmoe_ffn decode, T={tokens}: us per call and GB/s of expert weights read")
    print(f"{'case':<20} {'K':>2} {'MB read':>8} {'eager us':>9} {'graph us':>9} {'GB/s':>7} {'% peak':>7} "
          f"{'torch us':>9} {'torch GB/s':>10} {'NSE vs torch':>12}")
    for name, (D, F, K, gt, ut, dt) in MOE_CASES.items():
        try:
            row = _moe_case(timer, tokens, D, F, K, gt, ut, dt)
        except Exception as err:
            print(f"{name:<20} failed: {type(err).__name__}: {err}")
            rows.append({"case": name, "error": repr(err)})
            continue
        gbs, t_gbs = row["bytes"] / row["graph_ms"] / 1e6, row["torch_bytes"] / row["torch_ms"] / 1e6
        row.update(case=name, D=D, F=F, K=K, T=tokens, GB_per_s=gbs, fraction_of_peak=gbs / peak,
                   torch_GB_per_s=t_gbs)
        rows.append(row)
        print(f"{name:<20} {K:>2} {row['bytes'] / 1e6:>8.1f} {row['eager_ms'] * 1e3:>9.1f} "
              f"{row['graph_ms'] * 1e3:>9.1f} {gbs:>7.0f} {gbs / peak:>7.0%} {row['torch_ms'] * 1e3:>9.1f} "
              f"{t_gbs:>10.0f} {row['nse_vs_torch']:>12.1e}")
    return rows


def _moe_case(timer: _Timer, T: int, D: int, F: int, K: int, gt, ut, dt) -> dict:
    """One shape: K experts on the GPU, every token routed to all of them in a shuffled order."""
    mats = []
    for t, rows, cols in ((gt, F, D), (ut, F, D), (dt, D, F)):
        raw = _random_blocks((K, rows, cols // TYPE_INFO[t].block_size), t).view(K, rows, -1)
        mats.append(raw if t in KEEP_BLOCKS else dequantize(raw, t, torch.bfloat16))
    ex = GPUExperts(*mats, gt, ut, dt, hidden=D, ffn=F, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(K, device="cuda") for _ in range(T)])        # (T, K) int64
    wts = torch.rand(T, K, device="cuda")
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(T, D, device="cuda")

    eager_ms = timer(lambda: moe_ffn(x, ids, wts, ex, out=out))
    # more pairs than DECODE_PAIRS take the prefill path, which synchronises and cannot be captured
    graph_ms = timer(_graph(lambda: moe_ffn(x, ids, wts, ex, out=out))) if T * K <= DECODE_PAIRS else eager_ms

    dense = [ex.matrix(n, e, torch.bfloat16) for n in ("gate", "up", "down") for e in range(K)]
    gate, up, down = dense[:K], dense[K:2 * K], dense[2 * K:]
    pairs = [(t, k, int(ids[t, k])) for t in range(T) for k in range(K)]
    y_torch = torch.empty(T, D, device="cuda")

    def torch_moe():
        y_torch.zero_()
        for t, k, e in pairs:
            xt = x[t:t + 1]
            h = torch.nn.functional.silu(xt @ gate[e].T) * (xt @ up[e].T)       # (1, F) bf16
            y_torch[t:t + 1] += wts[t, k] * (h @ down[e].T).float()

    torch_ms = timer(_graph(torch_moe))
    moe_ffn(x, ids, wts, ex, out=out)
    torch_moe()
    nse = float(((out - y_torch) ** 2).sum() / (y_torch ** 2).sum())
    return {"bytes": ex.nbytes(), "eager_ms": eager_ms, "graph_ms": graph_ms, "torch_ms": torch_ms,
            "torch_bytes": 3 * K * D * F * 2, "nse_vs_torch": nse}


def _graph(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first, as torch.cuda.graphs asks): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


if __name__ == "__main__":
    raise SystemExit(main())
