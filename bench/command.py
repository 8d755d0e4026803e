"""`dslocal bench`: tokens per second of a model, or (--moe-only) of one MoE layer's CPU experts.

The end-to-end benchmark runs the runtime as it stands (today: the reference path); `--moe-only` times the
CPU expert kernels against the machine's DRAM bandwidth. Each forwards its own options, e.g.
`dslocal bench --gguf F --device cuda --prompt-len 512` or `dslocal bench --moe-only --types q4_k`
(`python -m dslocal.bench.reference --help` and `python -m dslocal.bench.moe_layer --help` list them).
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--moe-only", action="store_true",
                   help="time one MoE layer's routed experts on the CPU (python -m dslocal.bench.moe_layer)")
    p.set_defaults(passthrough=True)   # every other option goes to the chosen benchmark


def run(args: argparse.Namespace) -> int:
    if args.moe_only:
        from dslocal.bench import moe_layer
        return moe_layer.main(args.extra)
    from dslocal.bench import reference
    return reference.main(args.extra)
