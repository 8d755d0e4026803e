"""`dslocal bench`: a whole model's tokens per second (bench/e2e.py), or with --moe-only one MoE layer's CPU
experts (bench/moe_layer.py).

`dslocal bench --help` lists the model benchmark's options; --moe-only takes its own as well (--shapes,
--types, --tokens, --no-torch: `python -m dslocal.bench.moe_layer --help`), and shares --threads, --json
and --dram-gib with it.
"""
from __future__ import annotations

import argparse

from dslocal.bench import e2e


def add_arguments(p: argparse.ArgumentParser) -> None:
    e2e.add_arguments(p)
    p.add_argument("--moe-only", action="store_true",
                   help="time one MoE layer's routed experts on the CPU (python -m dslocal.bench.moe_layer)")
    p.set_defaults(passthrough=True)   # --moe-only's own options arrive in args.extra


def run(args: argparse.Namespace) -> int:
    if args.moe_only:
        from dslocal.bench import moe_layer
        shared = ["--dram-gib", str(args.dram_gib)]
        shared += ["--threads", str(args.threads)] if args.threads else []
        shared += ["--json", args.json] if args.json else []
        return moe_layer.main(args.extra + shared)
    if args.extra:
        raise ValueError(f"unrecognized arguments: {' '.join(args.extra)} (--shapes, --types, --tokens and "
                         "--no-torch go with --moe-only)")
    return e2e.run(args)
