"""Throughput of the reference (numpy) dequantizers per GGML type: GB/s of float32 output.

    python -m dslocal.bench.dequant_speed [--mib 64] [--json out.json]

This is the slow path (used to build the reference model); the CPU kernels read blocks directly.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from dslocal.quant.dequant import dequantize
from dslocal.quant.ggml import SUPPORTED, TYPE_INFO


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dslocal.bench.dequant_speed", description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=64, help="MiB of float32 output per call")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    n_values = args.mib * 2**20 // 4
    rows = []
    print(f"{'type':<6} {'in MB':>8} {'out MB':>8} {'best s':>8} {'out GB/s':>9} {'in GB/s':>8}")
    for t in sorted(SUPPORTED, key=int):
        info = TYPE_INFO[t]
        n_blocks = n_values // info.block_size
        raw = rng.integers(0, 256, (n_blocks, info.type_size), dtype=np.uint8)
        # finite fp16 scales: clear the top exponent bit of every 2-byte field that could hold one
        if info.block_size > 1:
            raw[:, 1::2] &= 0xBF
        elif t.name != "F32":
            raw[:, 1::2] &= 0xBF if t.name == "F16" else 0x7F
        best = min(_timed(dequantize, raw, t) for _ in range(args.repeat))
        out_bytes = n_blocks * info.block_size * 4
        rows.append({"type": t.name, "in_bytes": raw.nbytes, "out_bytes": out_bytes, "seconds": best,
                     "out_GB_per_s": out_bytes / best / 1e9, "in_GB_per_s": raw.nbytes / best / 1e9})
        r = rows[-1]
        print(f"{t.name:<6} {raw.nbytes / 1e6:>8.1f} {out_bytes / 1e6:>8.1f} {best:>8.3f} "
              f"{r['out_GB_per_s']:>9.2f} {r['in_GB_per_s']:>8.2f}")
    if args.json:
        with open(args.json, "w") as fp:
            json.dump(rows, fp, indent=2)
    return 0


def _timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


if __name__ == "__main__":
    raise SystemExit(main())
