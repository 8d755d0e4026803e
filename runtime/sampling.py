"""Choosing the next token from logits: greedy, or llama.cpp's default chain
(repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8         # 0: greedy
    top_k: int = 40                  # 0: off
    top_p: float = 0.95              # 1: off
    min_p: float = 0.05              # 0: off; drop tokens below min_p * p(best)
    repetition_penalty: float = 1.0  # 1: off; as llama.cpp's repeat_penalty over the last repeat_last_n tokens
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()

    def check(self) -> Sampling:
        """Raise ValueError with a sentence for a setting out of range; returns self."""
        if self.temperature < 0:
            raise ValueError("temperature must be 0 (greedy) or more")
        if self.top_k < 0:
            raise ValueError("top_k must be 0 (off) or more")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be above 0 (1 is off)")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        return self


def apply_repetition_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    """llama.cpp's repeat penalty: a seen token's logit is divided by penalty if positive, else multiplied."""
    if penalty == 1.0 or not recent:
        return logits
    ids = torch.tensor(sorted(set(recent)), device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def sample(logits: torch.Tensor, s: Sampling, recent: list[int], generator: torch.Generator | None) -> int:
    """The next token id from logits (V,) fp32."""
    logits = apply_repetition_penalty(logits.float(), recent[-s.repeat_last_n:] if s.repeat_last_n else [],
                                      s.repetition_penalty)
    if s.temperature == 0:
        return int(logits.argmax())
    probs, ids = logits.softmax(-1).sort(descending=True)          # filters see the untempered distribution
    keep = len(ids)
    if s.top_k:
        keep = min(keep, s.top_k)
    if s.top_p < 1.0:
        # the smallest prefix whose mass reaches top_p
        keep = min(keep, int((probs.cumsum(0) < s.top_p).sum()) + 1)
    if s.min_p > 0:
        keep = min(keep, max(1, int((probs >= s.min_p * probs[0]).sum())))
    ids = ids[:keep]
    p = (logits[ids] / s.temperature).softmax(-1)
    return int(ids[torch.multinomial(p.cpu(), 1, generator=generator)])
