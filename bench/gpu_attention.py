"""MLA decode attention and RMSNorm on the GPU: the Triton kernels against the torch path of runtime/model.py.

    python -m dslocal.bench.gpu_attention [--models v2-lite,v3] [--lengths 512,4096,16384] [--json out.json]

Attention: B = 1, T = 1, a bf16 latent cache of C = 512 and R = 64 per position, the heads and scale of each
model (V2-Lite 16 heads, V3 128). A decode step visits every layer once, so no layer finds its cache in L2:
one CUDA graph runs the op over as many layer caches as fill four times the L2, and the time per layer is
the graph's time over the layers. The Triton kernel takes the length as a device tensor, as a captured
decode step does; the torch path (kernels/ref.py::mla_decode, the lines of MLA.forward) takes an int.
GB/s counts the cache read once, S (C + R) 2 bytes, against the device's measured copy bandwidth. "call us"
is one call from Python (launches included, back to back, cache hot). "err" is the Triton output's relative
RMS distance from the torch path's. RMSNorm: bf16 rows with the residual add, 100 calls in one graph.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import triton

from dslocal.kernels import ref
from dslocal.kernels.gpu import mla, norm
from dslocal.quant.synthetic import PRESETS

NORM_SHAPES = [(1, 2048), (1, 7168), (512, 2048), (512, 7168)]   # (rows M, width D): decode and prefill
NORM_CALLS = 100


def graph_us(fn, n_inner: int, replays: int = 5) -> float:
    """Median microseconds per op call in a CUDA graph of fn(n_inner), which issues n_inner calls of the op."""
    fn(n_inner)                                    # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(n_inner)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_inner)
    del graph
    return sorted(times)[len(times) // 2]


def call_us(fn, n: int = 200) -> float:
    """Wall-clock microseconds per call of fn() issued back to back from Python."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / n


def copy_bandwidth(gib: float = 2.0) -> float:
    """Best of 5 device-to-device copies of a gib GiB buffer, in GB/s of bytes read plus written."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * gib * 2**30 / best / 1e9


def bench_mla(model: str, S: int, peak: float, l2_bytes: int) -> list[dict]:
    """Triton and torch rows for one model's heads at S cached positions."""
    cfg = PRESETS[model]
    H, C, R, scale = cfg.n_head, cfg.kv_lora_rank, cfg.qk_rope_dim, cfg.kq_scale
    layer_bytes = S * (C + R) * 2
    L = max(2, math.ceil(4 * l2_bytes / layer_bytes))
    kv = torch.randn(L, 1, S, C, device="cuda", dtype=torch.bfloat16)              # (L, B, S, C)
    pe = torch.randn(L, 1, S, R, device="cuda", dtype=torch.bfloat16)              # (L, B, S, R)
    q_lat = torch.randn(1, 1, H, C, device="cuda") * 0.05                          # (B, T, H, C)
    q_pe = torch.randn(1, 1, H, R, device="cuda") * 0.05                           # (B, T, H, R)
    length = torch.tensor(S, dtype=torch.int32, device="cuda")

    want = ref.mla_decode(q_lat, q_pe, kv[0], pe[0], S, scale)
    got = mla.mla_decode(q_lat, q_pe, kv[0], pe[0], length, scale)
    err = ((got - want).norm() / want.norm()).item()
    rows = []
    # the Triton kernel in the graph reads the length from the device; one call from Python passes the int
    for impl, op, graph_len in (("triton", mla.mla_decode, length), ("torch", ref.mla_decode, S)):
        def layers(n, op=op, graph_len=graph_len):
            for i in range(n):
                op(q_lat, q_pe, kv[i], pe[i], graph_len, scale)
        us = graph_us(layers, L)
        one = call_us(lambda op=op: op(q_lat, q_pe, kv[0], pe[0], S, scale))
        rows.append({"op": "mla_decode", "model": model, "H": H, "S": S, "impl": impl, "layers_in_graph": L,
                     "us": us, "call_us": one, "GB_per_s": layer_bytes / us / 1e3,
                     "frac_peak": layer_bytes / us / 1e3 / peak, "rel_rms_err": err if impl == "triton" else None})
        _print_mla(rows[-1])
    return rows


def bench_norm(M: int, D: int, peak: float) -> list[dict]:
    """Triton and torch rows for RMSNorm with the residual add over (M, D) bf16."""
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(D, device="cuda")
    nbytes = 4 * M * D * 2 + D * 4                 # read x and the residual, write y and the new residual
    want, _ = ref.rms_norm(x, w, 1e-6, res)
    got, _ = norm.rms_norm(x, w, 1e-6, res)
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    rows = []
    for impl, op in (("triton", norm.rms_norm), ("torch", ref.rms_norm)):
        def calls(n, op=op):
            for _ in range(n):
                op(x, w, 1e-6, res)
        us = graph_us(calls, NORM_CALLS)
        rows.append({"op": "rms_norm", "M": M, "D": D, "impl": impl, "us": us,
                     "call_us": call_us(lambda op=op: op(x, w, 1e-6, res)), "GB_per_s": nbytes / us / 1e3,
                     "frac_peak": nbytes / us / 1e3 / peak, "rel_rms_err": err if impl == "triton" else None})
        _print_norm(rows[-1])
    return rows


def _tail(r: dict) -> str:
    err = f"{r['rel_rms_err']:.1e}" if r["rel_rms_err"] is not None else ""
    return (f"{r['impl']:<7} {r['us']:>9.2f} {r['call_us']:>8.1f} {r['GB_per_s']:>7.0f} "
            f"{100 * r['frac_peak']:>5.1f}% {err:>8}")


MLA_HEADER = f"{'mla_decode':<10} {'H':>4} {'S':>6} {'impl':<7} {'us/layer':>9} {'call us':>8} {'GB/s':>7} " \
             f"{'%peak':>6} {'err':>8}"
NORM_HEADER = f"{'rms_norm':<10} {'M':>4} {'D':>6} {'impl':<7} {'us/call':>9} {'call us':>8} {'GB/s':>7} " \
              f"{'%peak':>6} {'err':>8}"


def _print_mla(r: dict) -> None:
    print(f"{r['model']:<10} {r['H']:>4} {r['S']:>6} {_tail(r)}", flush=True)


def _print_norm(r: dict) -> None:
    print(f"{'':<10} {r['M']:>4} {r['D']:>6} {_tail(r)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dslocal.bench.gpu_attention",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--models", default="v2-lite,v3", help="shapes from quant/synthetic.py presets")
    p.add_argument("--lengths", default="512,4096,16384", help="cached positions S (default 512,4096,16384)")
    p.add_argument("--no-norm", action="store_true", help="skip the RMSNorm rows")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(m not in ("v2-lite", "v3") for m in models):
        p.error("--models: choose from v2-lite, v3")
    lengths = [int(s) for s in args.lengths.split(",")]
    if not torch.cuda.is_available():
        print("This benchmark needs a CUDA GPU; none is visible to torch.")
        return 1

    props = torch.cuda.get_device_properties(0)
    peak = copy_bandwidth()
    info = {"gpu": props.name, "sms": props.multi_processor_count, "l2_MB": props.L2_cache_size / 1e6,
            "memory_GiB": props.total_memory / 2**30, "torch": torch.__version__,
            "triton": triton.__version__, "copy_GB_per_s": peak}
    print(f"{info['gpu']}: {info['sms']} SMs, L2 {info['l2_MB']:.0f} MB, {info['memory_GiB']:.0f} GiB; "
          f"torch {info['torch']}, triton {info['triton']}")
    print(f"device copy bandwidth (read + write): {peak:.0f} GB/s, best of 5\n")
    print(MLA_HEADER, flush=True)
    rows = []
    for model in models:
        for S in lengths:
            rows += bench_mla(model, S, peak, props.L2_cache_size)
    if not args.no_norm:
        print("\n" + NORM_HEADER, flush=True)
        for M, D in NORM_SHAPES:
            rows += bench_norm(M, D, peak)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30
    print(f"\npeak GPU memory allocated: {peak_mem:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": info, "peak_memory_GiB": peak_mem, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
