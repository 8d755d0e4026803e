"""offload/pulltune.py: the pull count chosen by timing decode steps at neighbouring counts.

Step times here come from a made-up cost curve with noise (what replayed decode steps would give on a
machine whose best count is known), so the search itself is checked without a GPU.
"""
import numpy as np
import pytest
import torch

from dslocal.kernels.gpu.pull import PullCount
from dslocal.offload import pulltune
from dslocal.offload.pulltune import PullTuner


def tune(start: int, slots: int, best: int, rng, noise=0.02, steps=1000) -> tuple[PullTuner, list[int]]:
    """Run steps until the tuner is done; a step at count n takes 10 ms + 1 ms per count away from best."""
    count = PullCount(start, slots, torch.device("cpu"))
    tuner = PullTuner(count, log=open("/dev/null", "w"))
    seen = []
    for _ in range(steps):
        tuner.before_step()
        seen.append(count.n)
        tuner.after_step(1e-3 * (10 + abs(count.n - best)) * (1 + noise * rng.standard_normal()))
        if tuner.done:
            break
    return tuner, seen


@pytest.mark.parametrize("start, slots, best", [(2, 6, 2), (3, 8, 4), (3, 8, 6), (2, 6, 0), (1, 6, 6)])
def test_the_tuner_settles_on_the_fastest_count(start, slots, best):
    tuner, seen = tune(start, slots, best, np.random.default_rng(start * 10 + best))
    assert tuner.done and tuner.count.n == best
    assert int(tuner.count.on_device) == best                  # what the kernels read
    assert set(seen) <= set(range(slots + 1))              # never past the staging slots
    # one round per count moved, and a last one that confirms; each round SAMPLES steps per candidate
    assert len(tuner.rounds) == abs(best - start) + 1
    assert len(seen) == pulltune.WARMUP_STEPS + sum(pulltune.SAMPLES * len(r) for r in tuner.rounds)


def test_untimed_warmup_steps_and_interleaved_candidates():
    count = PullCount(3, 8, torch.device("cpu"))
    tuner = PullTuner(count, log=open("/dev/null", "w"))
    order = []
    for _ in range(pulltune.WARMUP_STEPS + 6):
        tuner.before_step()
        order.append(count.n)
        tuner.after_step(0.01)
    assert order[:pulltune.WARMUP_STEPS] == [3] * pulltune.WARMUP_STEPS     # not moved while warming up
    assert order[pulltune.WARMUP_STEPS:] == [2, 3, 4, 2, 3, 4]


def test_rounds_are_capped(monkeypatch):
    monkeypatch.setattr(pulltune, "MAX_ROUNDS", 2)
    tuner, _ = tune(1, 16, 12, np.random.default_rng(0), noise=0)
    assert tuner.done and len(tuner.rounds) == 2 and tuner.count.n == 3
