"""Speed of the reference runtime (every weight dequantized, plain torch): the baseline to beat.

    python -m dslocal.bench.reference [--gguf F | --preset v2-lite --type q4_k_m] [--device cuda]
                                      [--prompt-len 128] [--gen 64] [--json out.json]

Prefill: one forward pass over a prompt of --prompt-len tokens. Decode: --gen greedy tokens, one step each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import psutil
import torch

from dslocal.quant import synthetic
from dslocal.runtime.load import RunConfig, default_model, load
from dslocal.runtime.sampling import Sampling


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dslocal.bench.reference", description=__doc__.split("\n")[0])
    p.add_argument("--gguf", help="a model file (default: the bundled model, or --preset)")
    p.add_argument("--preset", choices=list(synthetic.PRESETS), help="write and measure a synthetic model")
    p.add_argument("--type", default="q8_0")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    path = args.gguf or (default_model() if args.preset is None else None)
    if path is None:
        path = os.path.join(tempfile.gettempdir(), f"bench-ref-{args.preset}-{args.type}.gguf")
        if not os.path.exists(path):
            synthetic.build(path, synthetic.preset(args.preset), args.type)
    ctx = args.prompt_len + args.gen + 8
    loaded = load(path, RunConfig(args.device, args.dtype, ctx, args.threads))
    e = loaded.engine
    vocab = e.cfg.vocab_size
    prompt = [(7 + 31 * i) % vocab for i in range(args.prompt_len)]
    greedy = Sampling(temperature=0.0, max_tokens=args.gen)

    prefill, decode = [], []
    for _ in range(args.repeat):
        e.reset()
        _sync(args.device)
        t0 = time.perf_counter()
        e._forward(prompt, 0)
        _sync(args.device)
        prefill.append(time.perf_counter() - t0)
        e.reset()
        last = None
        for piece in e.generate(prompt[:8], greedy):
            last = piece
        decode.append(last.stats)
    best_prefill = min(prefill)
    best_decode = max(s.decode_tps for s in decode)
    result = {
        "file": path, "device": args.device, "dtype": str(e.model.embed.weight.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "load_seconds": loaded.load_seconds,
        "prompt_len": args.prompt_len, "prefill_tokens_per_s": args.prompt_len / best_prefill,
        "gen": args.gen, "decode_tokens_per_s": best_decode,
        "peak_rss_gib": psutil.Process().memory_info().rss / 2**30,
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0,
    }
    print(f"{'device':<8} {'dtype':<9} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'RSS GiB':>8} "
          f"{'GPU GiB':>8}", file=sys.stdout)
    print(f"{result['device']:<8} {result['dtype']:<9} {result['load_seconds']:>7.1f} "
          f"{result['prefill_tokens_per_s']:>14.1f} {result['decode_tokens_per_s']:>13.1f} "
          f"{result['peak_rss_gib']:>8.2f} {result['gpu_peak_gib']:>8.2f}")
    if args.json:
        with open(args.json, "w") as fp:
            json.dump(result, fp, indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
