"""The model options every command that runs a model shares (run, chat, serve), and loading that model."""
from __future__ import annotations

import argparse

from dslocal.runtime.load import Loaded, RunConfig, default_model, load
from dslocal.runtime.sampling import Sampling


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--gguf, the context, and where the model runs (placement flags: offload/planner.py)."""
    p.add_argument("--gguf", default=default_model(), metavar="FILE",
                   help="a deepseek2 GGUF model (default: the small model bundled with dslocal)")
    p.add_argument("--ctx", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cuda, cuda:N or cpu")
    p.add_argument("--gpu-memory", metavar="SIZE",
                   help="GPU memory to use, e.g. 12GiB or 12G (2^30 bytes), 12GB (10^9); default: what is free "
                        "minus a margin. Routed experts fill what attention and shared experts leave")
    p.add_argument("--cpu-only", action="store_true", help="run everything on the CPU even with a GPU")
    p.add_argument("--gpu-experts", type=int, metavar="N", help="exactly N routed experts per MoE layer on the GPU")
    p.add_argument("--pull-experts", type=int, metavar="N",
                   help="of each token's CPU experts, N are read by the GPU from host memory during decode steps "
                        "(default with a GPU: the count that decodes fastest, measured in the first decode steps; "
                        "0 without)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--expert-threads", type=int, metavar="N",
                   help="CPU threads for the routed experts (default: the physical cores)")
    p.add_argument("--dtype", default="auto", help="f32, bf16 or f16 (default: f32 on cpu, bf16 on cuda)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="launch every decode step's GPU kernels from Python (slower; for comparison)")
    p.add_argument("--reference", action="store_true",
                   help="the reference path: every weight dequantized, plain torch on --device (slow)")


def add_sampling_defaults(p: argparse.ArgumentParser) -> None:
    """The default sampling of a chat window or server (each request may override it)."""
    p.add_argument("--temperature", type=float, default=Sampling.temperature,
                   help=f"default temperature (0 for greedy; default {Sampling.temperature})")
    p.add_argument("--top-p", type=float, default=Sampling.top_p, help=f"default top-p ({Sampling.top_p})")


def run_config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(device=args.device, dtype=args.dtype, context=args.ctx, threads=args.threads,
                     gpu_memory=args.gpu_memory, cpu_only=args.cpu_only, gpu_experts=args.gpu_experts,
                     expert_threads=args.expert_threads, reference=args.reference,
                     cuda_graphs=not args.no_cuda_graphs, pull_experts=args.pull_experts)


def load_model(args: argparse.Namespace) -> Loaded:
    return load(args.gguf, run_config(args))


def default_sampling(args: argparse.Namespace, max_tokens: int) -> Sampling:
    return Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=max_tokens).check()
