"""`python -m dslocal.bench.reference`: the same as `dslocal bench --reference`, the speed of the all-torch
reference path (every weight dequantized), the baseline the placed runtime must beat.

    python -m dslocal.bench.reference [--gguf F | --preset v2-lite --type q4_k_m] [--device cuda]
                                      [--prompt-lengths 128] [--gen 64] [--json out.json]

It takes every option of `dslocal bench` (bench/e2e.py).
"""
from __future__ import annotations

import sys

from dslocal.gui import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main(["bench", "--reference", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
