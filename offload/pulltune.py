"""The pull count that decodes fastest on this machine, found by timing decode steps.

In a decode step each MoE layer's CPU experts are split: the CPU threads compute most of them while the GPU
reads n of them from host memory over PCIe (kernels/gpu/pull.py). Both sides read the same DRAM, and the
layer waits for the slower one, so the best n depends on the CPU's cores, the DRAM, the PCIe link and the
model's shapes: on the GPU box 2 of 6 experts decoded fastest for V2-Lite's shapes and 4 of 8 for V3's
(README, Measured), and a desktop with fewer cores or a slower link will differ. Rather than a rule fitted
to two shapes, the replayed decode steps (offload/graphs.py) measure it: the count is a device scalar
that the captured graph reads, so trying another n costs nothing but the step itself.

A round times SAMPLES steps at each of the current count and its two neighbours, interleaved (n-1, n, n+1,
n-1, ...: a shared machine's speed drifts, so the candidates are compared over the same seconds). A
neighbour whose median step is more than MARGIN faster wins, and the next round centres on it; once the
centre stays (or after MAX_ROUNDS) the count is kept for the rest of the process. A round takes ~24 steps,
about a third of a second for V2-Lite's shapes with every expert in host memory. Counts a few per cent
apart can swap places from one round to the next on a shared machine (V3 shapes on the GPU box: 3 and 4
of 8 within 4 %, each chosen once in two runs); counts further off lose every time.
"""
from __future__ import annotations

import statistics
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dslocal.kernels.gpu.pull import PullCount

WARMUP_STEPS = 4   # replays after a capture that are not timed (first touches of the staging buffer)
SAMPLES = 8        # timed steps per candidate in a round
MARGIN = 0.02      # how much faster (median step) a neighbour must be to move there
MAX_ROUNDS = 6


class PullTuner:
    """Call before_step() before each replayed decode step and after_step(seconds) after it."""

    def __init__(self, count: PullCount, log=sys.stderr):
        self.count, self.log = count, log
        self.center = count.n
        self.done = False
        self.rounds: list[dict[int, float]] = []      # each round's median seconds per candidate
        self._skip = WARMUP_STEPS
        self._start_round()

    def _start_round(self) -> None:
        self.candidates = [n for n in (self.center - 1, self.center, self.center + 1) if 0 <= n <= self.count.slots]
        self.times: dict[int, list[float]] = {n: [] for n in self.candidates}
        self._next = 0

    def before_step(self) -> None:
        """Set the count the next step runs with."""
        if not self.done and not self._skip:
            self.count.set(self.candidates[self._next % len(self.candidates)])

    def after_step(self, seconds: float) -> None:
        """The step just run took `seconds` (from its launch to its last CPU layer's answer)."""
        if self.done:
            return
        if self._skip:
            self._skip -= 1
            return
        self.times[self.count.n].append(seconds)
        self._next += 1
        if self._next < SAMPLES * len(self.candidates):
            return
        medians = {n: statistics.median(t) for n, t in self.times.items()}
        self.rounds.append(medians)
        best = min(medians, key=medians.get)
        if medians[best] > (1 - MARGIN) * medians[self.center]:
            best = self.center
        if best != self.center and len(self.rounds) < MAX_ROUNDS:
            self.center = best
            self._start_round()
            return
        self.done = True
        self.count.set(best)
        tried = ", ".join(f"{n}: {1e3 * s:.2f}" for n, s in sorted(medians.items()))
        print(f"pull     decode steps: the GPU reads {best} of each token's CPU experts from host memory (ms per "
              f"step, median of {SAMPLES}: {tried})", file=self.log, flush=True)

    def summary(self) -> dict:
        return {"pulled": self.count.n, "done": self.done,
                "rounds_ms": [{n: round(1e3 * s, 3) for n, s in r.items()} for r in self.rounds]}
