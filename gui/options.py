"""The model options `dslocal chat` and `dslocal serve` share, and loading the model they name."""
from __future__ import annotations

import argparse

from dslocal.runtime.load import Loaded, RunConfig, default_model, load
from dslocal.runtime.sampling import Sampling


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gguf", default=default_model(), metavar="FILE",
                   help="a deepseek2 GGUF model (default: the small model bundled with dslocal)")
    p.add_argument("--ctx", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="f32, bf16 or f16 (default: f32 on cpu, bf16 on cuda)")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--temperature", type=float, default=Sampling.temperature,
                   help=f"default temperature (0 for greedy; default {Sampling.temperature})")
    p.add_argument("--top-p", type=float, default=Sampling.top_p, help=f"default top-p ({Sampling.top_p})")


def load_model(args: argparse.Namespace) -> Loaded:
    return load(args.gguf, RunConfig(args.device, args.dtype, args.ctx, args.threads))


def default_sampling(args: argparse.Namespace, max_tokens: int) -> Sampling:
    return Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=max_tokens).check()
