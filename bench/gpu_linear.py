"""One-token products of a placed model's GPU linear layers on their GGUF blocks: kernels/gpu/gemv.py (Q4_K,
Q6_K), the portable Triton GEMV of kernels/gpu/linear.py, and torch's bf16 product of the dequantized matrix.

    python -m dslocal.bench.gpu_linear [--calls 50] [--json out.json]

Shapes are DeepSeek-V2-Lite's and V3's (HF config.json; merged projections as the model merges them), types
as in a Q4_K_M file. Each time is the median over 20 replays of a CUDA graph of --calls products, divided by
--calls; the products cycle through copies of the weight (at least 256 MiB in all), so each reads its
matrix from memory, not from the L2 cache, as a decode step does. x and y are bf16; the error is the
relative RMS error of y against the float32 product of the dequantized weights.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as Fn

from dslocal.bench.gpu_attention import graph_us
from dslocal.kernels.gpu import gemv
from dslocal.kernels.gpu.dequant import dequantize
from dslocal.kernels.gpu.linear import BlockWeight
from dslocal.quant.ggml import TYPE_INFO, GGMLType

T_ = GGMLType
# name: (type, n_out, n_in)
SHAPES = {
    "V2-Lite q + kv_a": (T_.Q4_K, 3072 + 576, 2048),
    "V2-Lite wo": (T_.Q4_K, 2048, 2048),
    "V2-Lite shared gate + up": (T_.Q4_K, 2 * 2816, 2048),
    "V2-Lite shared down": (T_.Q6_K, 2048, 2816),
    "V2-Lite head": (T_.Q6_K, 102400, 2048),
    "V3 q_a + kv_a": (T_.Q4_K, 1536 + 576, 7168),
    "V3 q_b": (T_.Q4_K, 24576, 1536),
    "V3 wo": (T_.Q4_K, 7168, 16384),
    "V3 shared gate + up": (T_.Q4_K, 4096, 7168),
    "V3 shared down": (T_.Q6_K, 7168, 2048),
    "V3 dense gate + up": (T_.Q4_K, 2 * 18432, 7168),
    "V3 dense down": (T_.Q6_K, 7168, 18432),
    "V3 head": (T_.Q6_K, 129280, 7168),
}
CYCLE_BYTES = 256 << 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dslocal.bench.gpu_linear", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=50, help="products per graph replay")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("dslocal.bench.gpu_linear needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured")
        return 1
    if not gemv.usable(torch.device("cuda")):
        print("this Triton has no Gluon: kernels/gpu/gemv.py does not run here; nothing measured")
        return 1
    print(f"device: {torch.cuda.get_device_name()}; one token, bf16 x; us per product (GB/s of the blocks)")
    print(f"{'matrix':<26} {'type':<5} {'n_out x n_in':>14} {'MB':>6} {'bf16 torch':>11} {'portable':>9} "
          f"{'gemv.py':>16} {'vs port.':>8} {'error':>8}")
    rows = []
    for name, (t, n_out, n_in) in SHAPES.items():
        r = _case(t, n_out, n_in, args.calls)
        rows.append({"matrix": name, "type": t.name, "n_out": n_out, "n_in": n_in, **r})
        print(f"{name:<26} {t.name:<5} {f'{n_out} x {n_in}':>14} {r['bytes'] / 1e6:6.1f} {r['torch_us']:11.1f} "
              f"{r['portable_us']:9.1f} {r['gemv_us']:7.1f} ({r['bytes'] / r['gemv_us'] / 1e3:5.0f}) "
              f"{r['portable_us'] / r['gemv_us']:7.2f}x {r['gemv_error']:8.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as fp:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, fp, indent=2)
    return 0


def _case(t: GGMLType, n_out: int, n_in: int, calls: int) -> dict:
    info = TYPE_INFO[t]
    rows = torch.randint(0, 256, (n_out, n_in // info.block_size * info.type_size), dtype=torch.uint8,
                         device="cuda")
    rows.view(n_out, -1, info.type_size)[..., 1::2] &= 0x9F    # the fp16 fields' high bytes: small scales
    n_copies = max(1, -(-CYCLE_BYTES // rows.numel()))
    x = torch.randn(1, n_in, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ dequantize(rows, t, torch.float32).T
    error = lambda y: float((y.float() - want).norm() / want.norm())

    dense = [dequantize(rows, t, torch.bfloat16) for _ in range(min(n_copies, _fit(2 * n_out * n_in)))]
    torch_us = _time(lambda i: Fn.linear(x, dense[i % len(dense)]), calls)
    dense.clear()
    gemv.ENABLED = False
    portable = [BlockWeight(rows.clone(), t, n_in) for _ in range(n_copies)]
    portable_us = _time(lambda i: portable[i % n_copies](x), calls)
    portable.clear()
    gemv.ENABLED = True
    fast = [BlockWeight(rows.clone(), t, n_in) for _ in range(n_copies)]
    gemv_us = _time(lambda i: fast[i % n_copies](x), calls)
    return {"bytes": rows.numel(), "copies": n_copies, "torch_us": torch_us, "portable_us": portable_us,
            "gemv_us": gemv_us, "gemv_error": error(fast[0](x)), "tiling": gemv.tiling(t, n_out, 1, x.device)}


def _fit(nbytes: int) -> int:
    """How many dense copies of nbytes to cycle through: enough for CYCLE_BYTES, at most 4 GiB in all."""
    return max(1, min(-(-CYCLE_BYTES // nbytes), (4 << 30) // nbytes))


def _time(fn, calls: int) -> float:
    """Median us per call of fn(0), fn(1), ... fn(calls - 1) replayed from one CUDA graph."""
    return graph_us(lambda n: [fn(i) for i in range(n)], calls, replays=20)


if __name__ == "__main__":
    raise SystemExit(main())
