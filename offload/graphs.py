"""Decode steps as CUDA graphs: the GPU work of one token, cut where the CPU experts take over.

A decode step launches a few hundred small kernels, and launching them from Python costs more than
running them (README, Measured: 28 tokens/s with every expert on the GPU). DecodeGraphs captures the step
once, as a chain of CUDA graphs cut at each MoE layer's hand-offs (offload/hybrid.py,
OffloadedMoE._forward_in_graph_step):

    graph 0    embedding .. first MoE layer: attention, router, CPU experts' inputs -> pinned memory
    host       event after the copies
    graph 1    the layer's shared experts and GPU experts, launched; the host waits for the event and
               computes the layer's CPU experts while the GPU runs graph 1
    graph 2    CPU result <- pinned memory, sum, residual .. the next MoE layer's hand-off copies
    ...        and last: final norm and head -> logits

A replayed step runs whole on the CPU expert worker's thread, which launches the graphs and runs the layer
jobs itself: the caller hands over once per token, not twice per layer. Each hand-over between threads
is a sleep and a wake-up (26 us per layer measured for the result's way back alone, GPU box).

The token id and the position are fixed device tensors, the latent cache is written at the device-side
position (runtime/model.py) and MLA decode reads a device-side length (kernels/gpu/mla.py), so one capture
serves every position. The first step runs eagerly through the same code (it compiles the Triton kernels
and gives that step's logits), then the capture follows.
"""
from __future__ import annotations

import sys

import torch

from dslocal.kernels.cpu.moe import LayerCall
from dslocal.offload.cpu_worker import ExpertWorker
from dslocal.offload.hybrid import OffloadedMoE
from dslocal.runtime.model import DeepSeek, LatentCache


class DecodeGraphs:
    """One token's forward pass over the latent cache, captured as CUDA graphs and replayed per step."""

    def __init__(self, model: DeepSeek, cache: LatentCache, worker: ExpertWorker | None, device):
        self.model, self.cache, self.worker = model, cache, worker
        self.device = torch.device(device)
        self.moes = [b.ffn for b in model.layers if isinstance(b.ffn, OffloadedMoE)]
        self.token = torch.zeros((1, 1), dtype=torch.long, device=self.device)   # the step's inputs
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.after: list[tuple[str, OffloadedMoE] | None] = []   # what the host does after each graph
        self.logits: torch.Tensor | None = None                  # the last graph's output (V,)
        self._buffers: dict[int, tuple[torch.Tensor, ...]] = {}
        self._calls: dict[int, LayerCall] = {}      # each layer's CPU experts on its fixed buffers
        self._ready: dict[int, torch.cuda.Event] = {}   # each layer's event after its hand-off copies
        self._capturing = False
        self._graph: torch.cuda.CUDAGraph | None = None
        self._pool = None

    # -- called by OffloadedMoE while a step runs or is captured ----------------------------------------
    def buffers(self, moe: OffloadedMoE, T: int, K: int) -> tuple[torch.Tensor, ...]:
        """The layer's fixed pinned hand-off buffers: x (T, D), ids (T, K), weights (T, K), result (T, D)."""
        if id(moe) not in self._buffers:
            D = moe.experts.hidden
            buffers = tuple(torch.empty(shape, dtype=dtype, pin_memory=True) for shape, dtype in (
                ((T, D), torch.float32), ((T, K), torch.long), ((T, K), torch.float32), ((T, D), torch.float32)))
            self._buffers[id(moe)] = buffers
            self._calls[id(moe)] = LayerCall(*buffers[:3], moe.experts, out=buffers[3])
            self._ready[id(moe)] = torch.cuda.Event()
        return self._buffers[id(moe)]

    def cut(self, action: tuple[str, OffloadedMoE]) -> None:
        """A hand-off point: do it now (eager step), or end the graph being captured and start the next."""
        if self._capturing:
            self._graph.capture_end()
            self.graphs.append(self._graph)
            self.after.append(action)
            self._graph = torch.cuda.CUDAGraph()
            self._graph.capture_begin(pool=self._pool)
        else:
            self._host(action)

    def _host(self, action: tuple[str, OffloadedMoE]) -> None:
        kind, moe = action
        if kind == "submit":
            ready = torch.cuda.Event()
            ready.record()
            self.worker.submit_call(self._calls[id(moe)], ready)
        else:
            self.worker.wait()

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
        if not self.graphs:
            logits = self._forward().clone()       # eager: compiles the kernels, and is this step's answer
            self._capture()
            return logits
        if not self.after:                  # no CPU experts in the step: one graph
            self.graphs[0].replay()
        else:
            stream = torch.cuda.current_stream(self.device)
            self.worker.submit_call(lambda: self._replay(stream))
            self.worker.wait()            # after Ctrl-C it lets the step finish (~15 ms), then raises
        return self.logits.clone()

    def _replay(self, stream: torch.cuda.Stream) -> None:
        """The captured step, run on the worker's thread: each layer's CPU job right after the launch of
        the graph that computes the GPU's share of the layer, so both sides work at once."""
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            job = None
            for graph, action in zip(self.graphs, self.after + [None]):
                graph.replay()
                if job is not None:
                    ready, call = job
                    ready.synchronize()    # the inputs' copies have landed
                    call()
                    job = None
                if action is not None and action[0] == "submit":    # "wait": the job ran above
                    ready = self._ready[id(action[1])]
                    ready.record(stream)
                    job = ready, self._calls[id(action[1])]

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)          # graphs are captured on a stream of their own
        side.wait_stream(torch.cuda.current_stream(self.device))
        self._capturing = True
        try:
            with torch.cuda.stream(side):
                self._graph = torch.cuda.CUDAGraph()
                self._graph.capture_begin(pool=self._pool)
                self.logits = self._forward()
                self._graph.capture_end()
                self.graphs.append(self._graph)
        except BaseException:
            self.graphs, self.after = [], []
            try:
                self._graph.capture_end()      # leave the stream out of capture mode
            except RuntimeError:
                pass                           # the runtime already ended the failed capture
            raise
        finally:
            self._capturing = False
        torch.cuda.current_stream(self.device).wait_stream(side)


class GraphedDecoder:
    """Engine.decode_step: DecodeGraphs when the capture works, else the eager step, said once on stderr."""

    def __init__(self, model: DeepSeek, cache: LatentCache, worker: ExpertWorker | None, device, log=sys.stderr):
        self.graphs: DecodeGraphs | None = DecodeGraphs(model, cache, worker, device)
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
