"""Decode steps as one CUDA graph, with the CPU experts' hand-offs inside it.

A decode step launches a few hundred small kernels, and launching them from Python costs more than
running them (README, Measured: 28 tokens/s with every expert on the GPU). DecodeGraphs captures the step
once and replays it per token. The CPU experts of each MoE layer are handed over inside the graph, through
flags in pinned host memory (kernels/gpu/handoff.py; offload/hybrid.py, OffloadedMoE._forward_in_graph_step):

    GPU  embedding .. first MoE layer: attention, router; send: x, ids, weights -> pinned memory, flag
    CPU                                 (the worker, spinning on the flag) the layer's CPU experts -> pinned
    GPU  the layer's shared and GPU experts meanwhile, and the CPU experts it pulls from host memory
         (kernels/gpu/pull.py: with --pull-experts the send hands the CPU the rest); receive: waits for
         the CPU's flag, adds its result
    GPU  residual .. the next MoE layer's send ...                   and last: final norm, head -> logits

A layer whose token has no expert left for the CPU (all its experts on the GPU or pulled) does not wait:
the send marks it idle and the receive goes on with the GPU's share (kernels/gpu/handoff.py).
The worker's thread launches the graph and then runs the layers one after another, each a compiled call
that waits for its inputs' flag without returning to Python (kernels/cpu/moe.py LayerCall.synced): no
launch, event or thread wake-up sits between the two sides. Each layer's flags are its own (one cache
line each); their value is the step's number, which the host writes to a device tensor before the replay.
(Before: a chain of graphs cut at each hand-off, the host waiting for an event and launching the next
graph: decode 1.10-1.11x slower on the GPU box; README, Measured.)

The token id and the position are fixed device tensors, the latent cache is written at the device-side
position (runtime/model.py) and MLA decode reads a device-side length (kernels/gpu/mla.py), so one capture
serves every position. The first step runs eagerly through the same code (it compiles the Triton kernels
and gives that step's logits; its hand-offs are host copies and the worker's submit / wait), then the
capture follows.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from dslocal.kernels.cpu.moe import LayerCall
from dslocal.offload.cpu_worker import ExpertWorker
from dslocal.offload.hybrid import OffloadedMoE
from dslocal.offload.pulltune import PullTuner
from dslocal.runtime.model import DeepSeek, LatentCache

FLAG_STRIDE = 8      # int64s between flags: each in a 64-byte cache line of its own
SKIP_IDLE = True     # a layer whose token left the CPU no expert does not wait for the CPU (handoff.py)


class DecodeGraphs:
    """One token's forward pass over the latent cache, captured as a CUDA graph and replayed per step."""

    def __init__(self, model: DeepSeek, cache: LatentCache, worker: ExpertWorker | None, device, log=sys.stderr):
        self.model, self.cache, self.worker = model, cache, worker
        self.device = torch.device(device)
        self.moes = [b.ffn for b in model.layers if isinstance(b.ffn, OffloadedMoE)]
        self.token = torch.zeros((1, 1), dtype=torch.long, device=self.device)   # the step's inputs
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None                  # the graph's output (V,)
        self.handoffs: list[OffloadedMoE] = []   # the layers that hand experts to the CPU, in step order
        self.steps = 0                           # replays so far: the flags' value in the last one
        self._step = torch.zeros(1, dtype=torch.long, device=self.device)
        # flags: ready (GPU -> CPU) and done (CPU -> GPU) per hand-off, then abort
        self._sync = torch.zeros(FLAG_STRIDE * (2 * len(self.moes) + 1), dtype=torch.long,
                                 pin_memory=worker is not None)
        # per hand-off: whether the CPU got any expert this step (written by the send, read by the receive)
        self._busy = torch.zeros(max(len(self.moes), 1), dtype=torch.int32, device=self.device)
        self._buffers: dict[int, tuple[torch.Tensor, ...]] = {}
        self._calls: dict[int, LayerCall] = {}      # each layer's CPU experts on its fixed buffers
        self._capturing = False
        # how many CPU experts per token the GPU pulls (one count shared by the layers), and what tunes it
        self.pull = next((m.pull for m in self.moes if m.pull is not None), None)
        self.tuner = PullTuner(self.pull, log) if self.pull is not None and self.pull.tune else None

    # -- called by OffloadedMoE while a step runs or is captured ----------------------------------------
    def send(self, moe: OffloadedMoE, x: torch.Tensor, cpu_ids: torch.Tensor, w: torch.Tensor) -> None:
        """Hand the layer's CPU experts their inputs: x (T, D) (float32 on the host side), cpu_ids and w (T, K)."""
        x_host, ids_host, w_host, _ = self._layer_buffers(moe, *cpu_ids.shape)
        if self._capturing:
            from dslocal.kernels.gpu import handoff
            j = self.handoffs.index(moe)
            handoff.send(x, cpu_ids, w, x_host, ids_host, w_host, self._sync, self._flag(j, "ready"), self._step,
                         None if moe.pull is None else moe.pull.on_device, self._busy[j:j + 1] if SKIP_IDLE else None)
            return
        if moe in self.handoffs:
            raise RuntimeError("a decode step handed the same layer to the CPU twice")
        self.handoffs.append(moe)
        x_host.copy_(x, non_blocking=True)
        if moe.pull is not None:
            from dslocal.kernels.gpu.pull import cpu_share
            cpu_ids = cpu_share(cpu_ids, moe.pull.n)[0]
        ids_host.copy_(cpu_ids, non_blocking=True)
        w_host.copy_(w, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self.worker.submit_call(self._calls[id(moe)], ready)

    def receive(self, moe: OffloadedMoE, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y (T, D) f32, the GPU's share of the layer, plus the CPU experts' result, as dtype."""
        out_host = self._buffers[id(moe)][3]
        if self._capturing:
            from dslocal.kernels.gpu import handoff
            j = self.handoffs.index(moe)
            return handoff.receive(y, out_host, self._sync, self._flag(j, "done"), self._flag(0, "abort"),
                                   self._step, dtype, busy=self._busy[j:j + 1] if SKIP_IDLE else None)
        self.worker.wait()
        y += out_host.to(y.device, non_blocking=True)
        return y.to(dtype)

    def _layer_buffers(self, moe: OffloadedMoE, T: int, K: int) -> tuple[torch.Tensor, ...]:
        """The layer's fixed pinned hand-off buffers: x (T, D), ids (T, K), weights (T, K), result (T, D)."""
        if id(moe) not in self._buffers:
            D = moe.experts.hidden
            buffers = tuple(torch.empty(shape, dtype=dtype, pin_memory=True) for shape, dtype in (
                ((T, D), torch.float32), ((T, K), torch.long), ((T, K), torch.float32), ((T, D), torch.float32)))
            self._buffers[id(moe)] = buffers
            self._calls[id(moe)] = LayerCall(*buffers[:3], moe.experts, out=buffers[3])
        return self._buffers[id(moe)]

    def _flag(self, j: int, kind: str) -> int:
        """Index in the flags of hand-off j's "ready" or "done" flag, or of the one "abort" flag."""
        if kind == "abort":
            return FLAG_STRIDE * 2 * len(self.moes)
        return FLAG_STRIDE * (2 * j + (kind == "done"))

    def timeline(self) -> list[tuple[float, float, float]]:
        """For the last replayed step, per hand-off j: (us the GPU worked since the previous hand-off's
        answer (since hand-off 0's own send for j = 0), us from the send to the answer seen: the CPU
        layer plus both flags' way, us of that the receive waited: 0 where the GPU's own share of the
        layer took longer than the CPU's), from the GPU clock the hand-off kernels leave beside their flags."""
        sync = self._sync.numpy()
        send = [int(sync[self._flag(j, "ready") + 1]) for j in range(len(self.handoffs))]
        seen = [int(sync[self._flag(j, "done") + 1]) for j in range(len(self.handoffs))]
        wait = [int(sync[self._flag(j, "done") + 2]) for j in range(len(self.handoffs))]
        return [((send[j] - seen[j - 1]) / 1e3 if j else 0.0, (seen[j] - send[j]) / 1e3, (seen[j] - wait[j]) / 1e3)
                for j in range(len(send))]

    # -- the step ---------------------------------------------------------------------------------------
    def _forward(self) -> torch.Tensor:
        for moe in self.moes:
            moe.graph_step = self
        try:
            return self.model.next_logits(self.token, self.cache, self.pos)
        except BaseException:
            self._collect()
            raise
        finally:
            for moe in self.moes:
                moe.graph_step = None

    def _collect(self) -> None:
        """After an interruption: wait for a CPU job under way, so the next step can start."""
        if self.worker is not None and self.worker.pending:
            self.worker.wait()

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits (V,) of `token` at position `pos`, its latent appended to the cache."""
        self.token.fill_(token)
        self.pos.fill_(pos)
        if self.graph is None:
            self.handoffs = []
            logits = self._forward().clone()       # eager: compiles the kernels, and is this step's answer
            self._capture()
            return logits
        if not self.handoffs:                      # no CPU experts in the step
            self.graph.replay()
            return self.logits.clone()
        self.steps += 1
        self._step.fill_(self.steps)
        if self.tuner is not None:
            self.tuner.before_step()               # the pull count, written in stream order like the step
        stream = torch.cuda.current_stream(self.device)
        t0 = time.perf_counter()
        self.worker.submit_call(lambda: self._replay(stream, self.steps))
        self.worker.wait()            # after Ctrl-C it lets the step finish (~15 ms), then raises
        if self.tuner is not None:
            self.tuner.after_step(time.perf_counter() - t0)
        if int(self._sync[self._flag(0, "abort")]) >= self.steps:
            torch.cuda.synchronize(self.device)
            raise RuntimeError("a decode step's hand-off between the GPU and the CPU experts timed out")
        return self.logits.clone()

    def _replay(self, stream: torch.cuda.Stream, n: int) -> None:
        """Step n, run on the worker's thread: launch the graph, then each layer's CPU experts as their
        inputs arrive. If a layer fails, the abort flag lets the GPU finish the step without them."""
        sync = self._sync.numpy()
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            self.graph.replay()
        try:
            for j, moe in enumerate(self.handoffs):
                if not self._calls[id(moe)].synced(sync, self._flag(j, "ready"), self._flag(j, "done"),
                                                   self._flag(0, "abort"), n):
                    return                 # the GPU gave the step up (a receive timed out)
        except BaseException:
            sync[self._flag(0, "abort")] = n
            raise

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        if self.handoffs:      # compile (or load) the synced layer now: a first replay must not wait for it
            self._calls[id(self.handoffs[0])].synced(np.array([0, 1], np.int64), 0, 0, 1, 1)
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)          # graphs are captured on a stream of their own
        side.wait_stream(torch.cuda.current_stream(self.device))
        self._capturing = True
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(pool=pool)
                self.logits = self._forward()
                graph.capture_end()
        except BaseException:
            try:
                graph.capture_end()      # leave the stream out of capture mode
            except RuntimeError:
                pass                     # the runtime already ended the failed capture
            raise
        finally:
            self._capturing = False
        self.graph = graph
        torch.cuda.current_stream(self.device).wait_stream(side)


class GraphedDecoder:
    """Engine.decode_step: DecodeGraphs when the capture works, else the eager step, said once on stderr."""

    def __init__(self, model: DeepSeek, cache: LatentCache, worker: ExpertWorker | None, device, log=sys.stderr):
        self.graphs: DecodeGraphs | None = DecodeGraphs(model, cache, worker, device, log)
        self.model, self.cache, self.device, self.log = model, cache, torch.device(device), log

    def __call__(self, token: int, pos: int) -> torch.Tensor:
        if self.graphs is not None:
            try:
                return self.graphs.step(token, pos)
            except RuntimeError as e:    # a capture the CUDA runtime refused: run eagerly from now on
                print(f"dslocal: decode steps run without CUDA graphs ({str(e).splitlines()[0]})", file=self.log)
                self.graphs = None
                torch.cuda.synchronize(self.device)
        return self.model.next_logits(torch.tensor([[token]], device=self.device), self.cache, pos)
