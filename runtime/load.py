"""From a GGUF path and the user's run settings to an Engine, and the few lines printed before the first token."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from importlib.resources import files

import torch

from dslocal.quant.gguf_file import GGUFError, open_gguf
from dslocal.runtime.chat import ChatTemplate
from dslocal.offload.planner import Placement
from dslocal.runtime.config import GATING_SIGMOID, ModelConfig, read_config
from dslocal.runtime.generate import Engine
from dslocal.runtime.model import Linear
from dslocal.runtime.tokenizer import Tokenizer
from dslocal.runtime.weights import load_model

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def default_model() -> str:
    """The small model that ships inside the package, used when no --gguf is given (trained by dslocal's own
    training path; README, "The bundled model", has the command that reproduces it)."""
    return str(files("dslocal.runtime") / "default" / "dslocal-nano-q8_0.gguf")


@dataclass(frozen=True)
class RunConfig:
    """User settings for running a model (the model's own settings are in ModelConfig)."""
    device: str = "auto"       # cpu | cuda | cuda:N | auto (cuda when torch sees a GPU)
    dtype: str = "auto"        # f32 | bf16 | f16 | auto (f32 on the CPU, bf16 on a GPU)
    context: int = 4096        # tokens the cache holds (at most the model's context_length)
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    gpu_memory: str | None = None   # GPU budget, e.g. "12GiB" (default: free GPU memory minus a margin)
    cpu_only: bool = False          # everything on the CPU even with a GPU
    gpu_experts: int | None = None  # exactly N routed experts per MoE layer on the GPU
    expert_threads: int | None = None   # CPU expert threads (default: the physical cores)
    reference: bool = False    # the reference path: every weight dequantized, plain torch (runtime/model.py)
    cuda_graphs: bool = True   # placed runtime on a GPU: decode steps replayed as CUDA graphs
    pull_experts: int | None = None  # of each token's CPU experts, N read by the GPU (default: a third)
    like_llama_cpp: bool = True  # reference path: round activations as llama.cpp's CPU backend does

    def torch_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() and not self.cpu_only else "cpu"
        return self.device

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.torch_device() == "cpu" else torch.bfloat16
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}")
        return DTYPES[self.dtype]


@dataclass
class Loaded:
    engine: Engine
    cfg: ModelConfig
    template: ChatTemplate
    name: str
    load_seconds: float
    placement: Placement | None = None   # None on the reference path


def load(path: str, run: RunConfig, log=sys.stderr) -> Loaded:
    """Open, check, place and load a deepseek2 GGUF; a bad file or setting raises with a sentence for the
    user (GGUFError, ValueError and its subclass PlanError) before anything large is loaded."""
    device = run.torch_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but torch sees no CUDA GPU (is this a CPU build of torch?)")
    if device.startswith("cuda") and run.cpu_only:
        raise ValueError("--cpu-only and --device cuda contradict each other; give one of them")
    if run.context < 16:
        raise ValueError("--ctx must be at least 16 tokens")
    if run.threads:
        torch.set_num_threads(run.threads)
    t0 = time.perf_counter()
    placement = None
    with open_gguf(path) as f:     # closing keeps the memory map alive while the CPU experts view it
        try:
            cfg = read_config(f)
            tokenizer = Tokenizer.from_gguf(f)
            template = ChatTemplate.from_gguf(f)
            context = min(run.context, cfg.context_length)
            if run.reference:
                model = load_model(f, cfg, run.torch_dtype(), device, run.like_llama_cpp)
            else:
                from dslocal.offload.place import Placing, load_placed
                n_pull, tune = pull_experts(run, cfg, device)
                placing = Placing(device, run.torch_dtype(), context, run.gpu_memory, run.cpu_only,
                                  run.gpu_experts, run.expert_threads, pull_experts=n_pull, pull_tune=tune)
                model, placement = load_placed(path, f, cfg, placing, log)
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from None
    engine = Engine(model, cfg, tokenizer, context, device,
                    torch.float32 if run.torch_dtype() == torch.float32 else run.torch_dtype())
    if placement is not None and device.startswith("cuda") and run.cuda_graphs:
        from dslocal.offload.place import decode_graphs
        engine.decode_step = decode_graphs(model, engine.cache, device, log)
    elif placement is not None and device == "cpu":
        from dslocal.offload.cpu_step import cpu_step
        engine.decode_step = cpu_step(model, engine.cache)
    loaded = Loaded(engine, cfg, template, cfg.name or os.path.basename(path), time.perf_counter() - t0,
                    placement)
    print(describe(loaded, run), file=log)
    return loaded


def pull_experts(run: RunConfig, cfg, device: str) -> tuple[int, bool]:
    """--pull-experts resolved to (count, tuned): by default, where decode steps run as CUDA graphs on a GPU
    (the only steps that pull), a third of a token's experts to start with and then the count that decodes
    fastest; else none. A number the run cannot use raises ValueError; a given one is kept."""
    from dslocal.offload.place import default_pull
    n = run.pull_experts
    graphs = device.startswith("cuda") and run.cuda_graphs and not run.cpu_only
    if n is None:
        return (default_pull(cfg.n_expert_used), cfg.n_expert_used > 1) if graphs else (0, False)
    if not 0 <= n <= cfg.n_expert_used:
        raise ValueError(f"--pull-experts must be 0 to {cfg.n_expert_used} (the experts a token uses)")
    if n and not graphs:
        raise ValueError("--pull-experts needs a GPU and CUDA graphs (decode steps replayed on the GPU)")
    return n, False


def describe(loaded: Loaded, run: RunConfig) -> str:
    """The resolved configuration and where each part runs, in a few lines."""
    cfg, e = loaded.cfg, loaded.engine
    n_params = sum(p.numel() for p in e.model.parameters())
    n_params += sum(m.in_features * m.out_features for m in e.model.modules()     # linear layers kept in blocks
                    if isinstance(m, Linear) and not isinstance(m.weight, torch.Tensor))
    if loaded.placement is not None:     # routed experts are blocks of the file, not parameters
        n_params += cfg.n_layer_moe * cfg.n_expert * 3 * cfg.hidden * cfg.expert_ffn
    gating = "sigmoid" if cfg.gating == GATING_SIGMOID else "softmax"
    where = f"{run.torch_device()} ({str(run.torch_dtype()).removeprefix('torch.')})"
    if loaded.placement is None:
        runs_on = f"attention, shared and routed experts, head: all on {where}, reference path"
    elif loaded.placement.budget_bytes == 0:
        runs_on = f"attention on {where}, routed experts on CPU threads from the file's blocks"
    else:
        p = loaded.placement
        n_gpu = sum(len(lp.gpu_experts) for lp in p.layers)
        n_all = sum(lp.n_expert for lp in p.layers)
        runs_on = (f"attention and shared experts on {where}; routed experts: {n_gpu} of {n_all} on the GPU, "
                   f"the rest on CPU threads (~{p.cpu_expert_bytes_per_token / 1e9:.2f} GB read per token)")
    return "\n".join([
        f"model    {loaded.name}: {cfg.n_layer} layers ({cfg.n_layer - cfg.n_layer_moe} dense, {cfg.n_layer_moe} MoE), "
        f"hidden {cfg.hidden}, {cfg.n_expert} experts ({cfg.n_expert_used} active, {cfg.n_expert_shared} shared, "
        f"{gating}), {_count(n_params)} parameters, loaded in {loaded.load_seconds:.1f} s",
        f"context  {e.context_length} tokens (model: {cfg.context_length}); latent cache "
        f"{e.cache.nbytes() / 2**20:.1f} MiB",
        f"runs on  {runs_on}",
    ])


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
