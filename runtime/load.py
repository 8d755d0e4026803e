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
from dslocal.runtime.config import GATING_SIGMOID, ModelConfig, read_config
from dslocal.runtime.generate import Engine
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
    device: str = "cpu"
    dtype: str = "auto"        # f32 | bf16 | f16 | auto (f32 on the CPU, bf16 on a GPU)
    context: int = 4096        # tokens the cache holds (at most the model's context_length)
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    like_llama_cpp: bool = True  # round activations as llama.cpp's CPU backend does (runtime.model)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
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


def load(path: str, run: RunConfig, log=sys.stderr) -> Loaded:
    """Open, check and load a deepseek2 GGUF for the reference runtime; a bad file or setting raises with
    a sentence for the user (GGUFError, ValueError)."""
    if run.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but torch sees no CUDA GPU (is this a CPU build of torch?)")
    if run.context < 16:
        raise ValueError("--ctx must be at least 16 tokens")
    if run.threads:
        torch.set_num_threads(run.threads)
    t0 = time.perf_counter()
    with open_gguf(path) as f:
        try:
            cfg = read_config(f)
            tokenizer = Tokenizer.from_gguf(f)
            template = ChatTemplate.from_gguf(f)
            model = load_model(f, cfg, run.torch_dtype(), run.device, run.like_llama_cpp)
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from None
    context = min(run.context, cfg.context_length)
    engine = Engine(model, cfg, tokenizer, context, run.device,
                    torch.float32 if run.torch_dtype() == torch.float32 else run.torch_dtype())
    loaded = Loaded(engine, cfg, template, cfg.name or os.path.basename(path), time.perf_counter() - t0)
    print(describe(loaded, run), file=log)
    return loaded


def describe(loaded: Loaded, run: RunConfig) -> str:
    """The resolved configuration and where each part runs, in a few lines."""
    cfg, e = loaded.cfg, loaded.engine
    n_params = sum(p.numel() for p in e.model.parameters())
    gating = "sigmoid" if cfg.gating == GATING_SIGMOID else "softmax"
    where = f"{run.device} ({str(run.torch_dtype()).removeprefix('torch.')})"
    return "\n".join([
        f"model    {loaded.name}: {cfg.n_layer} layers ({cfg.n_layer - cfg.n_layer_moe} dense, {cfg.n_layer_moe} MoE), "
        f"hidden {cfg.hidden}, {cfg.n_expert} experts ({cfg.n_expert_used} active, {cfg.n_expert_shared} shared, "
        f"{gating}), {_count(n_params)} parameters, loaded in {loaded.load_seconds:.1f} s",
        f"context  {e.context_length} tokens (model: {cfg.context_length}); latent cache "
        f"{e.cache.nbytes() / 2**20:.1f} MiB",
        f"runs on  attention, shared and routed experts, head: all on {where}, reference path",
    ])


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
