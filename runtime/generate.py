"""Generation: prefill, then incremental decode over the latent cache, streamed as text pieces.

`Engine.generate` is the one generator the REPL, the chat window, the server and the benchmark consume.
The engine remembers which tokens its cache holds, so a follow-up prompt that starts with the previous
conversation only prefills what is new.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from dslocal.runtime.config import ModelConfig
from dslocal.runtime.model import DeepSeek, LatentCache
from dslocal.runtime.sampling import Sampling, sample
from dslocal.runtime.tokenizer import IncrementalDecoder


# Prompt tokens per forward pass: a longer prompt is prefilled in pieces, so its activations (and a placed
# model's streamed experts' inputs, offload/prefill.py) stay within the working memory the plan leaves
# (offload/place.py WORKSPACE). Each piece after the first streams the CPU experts to the GPU again: on the
# GPU box 0.18 s for a V2-Lite-shaped file, where its 8192-token prompt took 0.20-0.25 s in one pass.
PREFILL_CHUNK = 4096


class OutOfMemory(ValueError):
    """The device had no room for a step's activations (a long prompt, or other programs on the GPU)."""


class ContextFull(ValueError):
    """A prompt that does not fit the context; the message says by how much and what to do."""


@dataclass
class Stats:
    prompt_tokens: int = 0       # tokens in the prompt
    prefilled_tokens: int = 0    # of them, those computed (the rest came from the cache)
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes out of the prefill; the others each cost one decode step
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Piece:
    """One step of a generation: new text (may be empty while bytes of a character are pending)."""
    text: str
    token: int | None = None
    finish: str | None = None    # set on the last piece: "eos", "stop", "length" or "context"
    stats: Stats = field(default_factory=Stats)


class Engine:
    """A loaded model ready to generate: model, tokenizer and a latent cache of context_length tokens."""

    def __init__(self, model: DeepSeek, cfg: ModelConfig, tokenizer, context_length: int,
                 device: str | torch.device = "cpu", cache_dtype: torch.dtype = torch.float32):
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.context_length = context_length
        self.device = torch.device(device)
        self.cache = LatentCache(cfg, 1, context_length, cache_dtype, self.device)
        self.cached: list[int] = []   # the tokens whose latents the cache holds, in order
        # a faster one-token step over self.cache (token, position) -> logits (V,), e.g. CUDA graphs
        # (offload/graphs.py); None: every step is a plain forward pass
        self.decode_step = None

    def reset(self) -> None:
        self.cached = []

    def check_prompt(self, n_tokens: int, max_tokens: int = 1) -> None:
        if n_tokens >= self.context_length:
            raise ContextFull(f"the prompt has {n_tokens} tokens but the context holds {self.context_length}; "
                              "shorten it, reset the conversation, or start with a larger --ctx")

    @torch.inference_mode()
    def _forward(self, tokens: list[int], start: int) -> torch.Tensor:
        if len(tokens) == 1 and self.decode_step is not None:
            return self.decode_step(tokens[0], start)
        return self.model.next_logits(torch.tensor([tokens], dtype=torch.long, device=self.device), self.cache, start)

    @torch.inference_mode()
    def _prefill(self, tokens: list[int], start: int) -> torch.Tensor:
        """tokens into the cache from position start, and the logits of the last: the ones before it in
        one pass, the last as a one-token step. So the first sampled token's logits come from the same
        computation whether or not the prompt's start was cached: a placed model's one-token step may
        round differently from its batched pass (CPU linear layers on GGUF blocks, CUDA graphs), and a
        seed must give the same text on a reused conversation as on a fresh one."""
        try:
            for i in range(0, len(tokens) - 1, PREFILL_CHUNK):
                piece = tokens[i:min(i + PREFILL_CHUNK, len(tokens) - 1)]
                self.model.hidden(torch.tensor([piece], dtype=torch.long, device=self.device), self.cache, start + i)
            return self._forward(tokens[-1:], start + len(tokens) - 1)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise OutOfMemory(f"the GPU ran out of memory for a prompt of {len(tokens)} new tokens; give the run less "
                              "--gpu-memory (the rest is working memory), close other programs on the GPU, or "
                              "shorten the prompt") from None

    @torch.inference_mode()
    def generate(self, prompt: list[int], s: Sampling) -> Iterator[Piece]:
        """Stream the continuation of prompt (token ids) as text pieces; the last piece has `finish` set."""
        s.check()
        self.check_prompt(len(prompt))
        stats = Stats(prompt_tokens=len(prompt))
        gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None

        # Reuse the longest cached prefix; at least the last prompt token is recomputed for its logits.
        keep = 0
        while keep < min(len(self.cached), len(prompt) - 1) and self.cached[keep] == prompt[keep]:
            keep += 1
        t0 = time.perf_counter()
        self.cached = self.cached[:keep]
        logits = self._prefill(prompt[keep:], keep)
        self.cached = list(prompt)
        stats.prefilled_tokens = len(prompt) - keep
        stats.prefill_seconds = time.perf_counter() - t0

        out: list[int] = []
        text = text_sent = ""
        decoder = IncrementalDecoder(self.tokenizer)   # complete characters only, O(1) per token
        longest_stop = max((len(x) for x in s.stop), default=0)
        stop_at = self.tokenizer.eot_ids
        t0 = time.perf_counter()
        finish = None
        while finish is None:
            recent = (prompt + out)[-s.repeat_last_n:] if s.repetition_penalty != 1.0 else []
            token = sample(logits, s, recent, gen)
            if token in stop_at:
                finish = "eos"
                break
            out.append(token)
            stats.generated_tokens = len(out)
            new = decoder.push(token)
            # a stop string can only have been completed by the new text
            cut = _first_stop(text + new, s.stop, max(0, len(text) - longest_stop + 1))
            text += new
            if cut is not None:
                text, finish = text[:cut], "stop"
            elif len(out) >= s.max_tokens:
                finish = "length"
            elif len(self.cached) >= self.context_length:
                finish = "context"
            # hold back an incomplete UTF-8 character and anything that may begin a stop string
            safe = text if finish else text[:_safe_end(text, s.stop)]
            if len(safe) > len(text_sent):
                piece, text_sent = safe[len(text_sent):], safe
                stats.decode_seconds = time.perf_counter() - t0
                yield Piece(piece, token, stats=stats)
            if finish is None:
                logits = self._forward([token], len(self.cached))
                self.cached.append(token)
        if finish != "stop":
            text += decoder.flush()                   # bytes of a character that never completed
        stats.decode_seconds = time.perf_counter() - t0
        yield Piece(text[len(text_sent):], None, finish, stats)   # what was held back, if anything


def _first_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    hits = [i for i in (text.find(x, start) for x in stops if x) if i >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of text can be shown: not a tail that could grow into a stop string."""
    end = len(text)
    for x in stops:
        for k in range(min(len(x) - 1, end), 0, -1):
            if text[:end].endswith(x[:k]):
                end -= k
                break
    return end
