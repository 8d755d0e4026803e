"""Shared fixtures: small synthetic deepseek2 GGUF files, built once per test session."""
import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on the CPU; the variable must be set before the
# first kernel module is imported (ECOSYSTEM.md).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dslocal.quant import synthetic


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """Path builder: tiny_gguf(preset, type) writes (once) and returns a synthetic model file."""
    cache = {}
    root = tmp_path_factory.mktemp("models")

    def make(preset: str = "tiny-v2", ftype: str = "q8_0", **kw) -> str:
        key = (preset, ftype, tuple(sorted(kw.items())))
        if key not in cache:
            path = str(root / f"{preset}-{ftype}-{len(cache)}.gguf")
            synthetic.build(path, synthetic.preset(preset), ftype, **kw)
            cache[key] = path
        return cache[key]
    return make


class Greedy:
    """Argmax continuations, written once: from dslocal's model over its latent cache, and from llama.cpp."""

    @staticmethod
    def dslocal(model, cfg, prompt: list[int], n: int, device: str = "cpu") -> list[int]:
        from dslocal.runtime.model import LatentCache
        cache, seq = LatentCache(cfg, 1, len(prompt) + n, torch.float32, device), list(prompt)
        with torch.no_grad():
            logits = model(torch.tensor([seq], device=device), cache, 0)[0, -1]
            for _ in range(n):
                seq.append(int(logits.argmax()))
                if len(seq) < len(prompt) + n:
                    logits = model(torch.tensor([[seq[-1]]], device=device), cache, len(seq) - 1)[0, -1]
        return seq[len(prompt):]

    @staticmethod
    def llama(ref, prompt: list[int], n: int):
        """llama.cpp's continuation, and its logits (n, V) at each step that chose a token."""
        import numpy as np
        ref.reset()
        seq = list(prompt)
        ref.eval(seq)
        for _ in range(n):
            seq.append(int(np.argmax(ref.scores[ref.n_tokens - 1])))
            ref.eval([seq[-1]])
        return seq[len(prompt):], np.array(ref.scores[len(prompt) - 1:len(seq) - 1])


@pytest.fixture(scope="session")
def greedy():
    return Greedy


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Expert hotness and other per-model caches go to a temporary folder, not the user's cache."""
    os.environ["DSLOCAL_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
