"""How long opening a big GGUF and building its index takes, and how much memory it costs.

    python -m dslocal.bench.gguf_open [--file F | --preset v2-lite --type q4_k_m] [--json out.json]

Without --file it first writes a synthetic file (random blocks) and reports that speed too. Nothing of the
tensor data is read: the numbers show that opening is independent of the file's size.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import psutil

from dslocal.gui.info import describe
from dslocal.quant import synthetic
from dslocal.quant.gguf_file import open_gguf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dslocal.bench.gguf_open", description=__doc__.split("\n")[0])
    p.add_argument("--file", help="an existing GGUF (default: write a synthetic one)")
    p.add_argument("--preset", default="v2-lite", choices=list(synthetic.PRESETS))
    p.add_argument("--type", default="q4_k_m")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the synthetic file")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    result: dict = {}
    path = args.file
    if path is None:
        path = os.path.join(args.dir, f"bench-{args.preset}-{args.type}.gguf")
        t0 = time.perf_counter()
        synthetic.build(path, synthetic.preset(args.preset), args.type, method="blocks")
        dt = time.perf_counter() - t0
        size = os.path.getsize(path)
        result["write"] = {"seconds": dt, "bytes": size, "GB_per_s": size / dt / 1e9}
        print(f"wrote {path}: {size / 1e9:.2f} GB in {dt:.1f} s ({size / dt / 1e9:.2f} GB/s)")

    proc = psutil.Process()
    times, rss_growth = [], []
    for _ in range(args.repeat):
        rss0 = proc.memory_info().rss
        t0 = time.perf_counter()
        with open_gguf(path) as f:
            n_tensors = len(f.tensors)
            t_index = time.perf_counter() - t0
            summary = describe(f)
            t_describe = time.perf_counter() - t0
            rss_growth.append(proc.memory_info().rss - rss0)
        times.append((t_index, t_describe))
    best_index = min(t for t, _ in times)
    best_describe = min(t for _, t in times)
    result["open"] = {"file": path, "file_bytes": os.path.getsize(path), "tensors": n_tensors,
                      "index_seconds_best": best_index, "index_and_check_seconds_best": best_describe,
                      "rss_growth_bytes_first": rss_growth[0], "rss_growth_bytes_max": max(rss_growth),
                      "decode_bytes_per_token": summary["decode_bytes_per_token"]}
    print(f"{'file GB':>8} {'tensors':>8} {'open+index s':>13} {'+config check s':>16} {'RSS growth MB':>14}")
    print(f"{os.path.getsize(path) / 1e9:>8.2f} {n_tensors:>8} {best_index:>13.3f} {best_describe:>16.3f} "
          f"{rss_growth[0] / 2**20:>14.1f}")
    if args.json:
        with open(args.json, "w") as fp:
            json.dump(result, fp, indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
