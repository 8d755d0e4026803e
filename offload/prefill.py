"""Long prompts: stream the CPU-resident experts to the GPU instead of computing them on the CPU.

A prefill of T tokens routes T*K pairs to most experts of every layer, and the CPU kernels become
compute-bound (kernels/cpu/NOTES.md); the GPU computes them far faster if the weights get there. So for a
chunk of at least STREAM_MIN_TOKENS tokens each MoE layer's CPU experts are copied to the GPU in units of
at most `unit_bytes` (GPU size) and computed there (kernels/gpu/moe.py), while a copy thread already
brings the next unit: the copy of layer i+1 overlaps the compute of layer i (DESIGN.md, "Prefill").
At most two units are on the GPU at a time, so streaming needs 2 * unit_bytes of GPU memory. Experts whose
pages are registered with CUDA (OffloadedMoE.registration, made with --pull-experts) are copied by DMA
straight from the file's memory map; others go through two pinned host buffers of a unit's file bytes
(allocated at the first long prompt), which a CPU thread fills first.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor

import torch

# Below this the CPU experts compute the chunk in place. Not tuned yet: on the GPU box a V2-Lite-shaped
# Q4_K_M layer takes ~1 ms on the CPU at T = 1 and ~320 ms at T = 512, while a streamed prefill costs at
# most ~30 ms per layer there (the whole 2048-token prompt in 0.5-1.0 s), so the crossover is at a few
# tens of tokens.
STREAM_MIN_TOKENS = 64
UNIT_BYTES = 512 * 2**20     # GPU bytes of one streamed unit of experts


@dataclasses.dataclass
class _Unit:
    layer: int                  # index into the streamer's MoE layers
    expert_ids: list[int]       # the experts this unit brings (ids of the layer)


class ExpertStreamer:
    """Copies units of CPU experts to the GPU one ahead of their use, on a side stream and thread."""

    def __init__(self, layers: list, device: torch.device, unit_bytes: int = UNIT_BYTES):
        """layers: the model's OffloadedMoE modules in order; each unit holds experts of one layer only."""
        self.layers, self.device = layers, device
        self.units: list[_Unit] = []
        for i, moe in enumerate(layers):
            cpu_ids = [e for e in range(moe.experts.n_expert) if e not in moe.gpu_ids]
            per_expert = max(moe.expert_gpu_bytes, 1)
            step = max(1, unit_bytes // per_expert)
            self.units += [_Unit(i, cpu_ids[j:j + step]) for j in range(0, len(cpu_ids), step)]
        self.first_unit = {}                     # layer -> index of its first unit
        for k, u in enumerate(self.units):
            self.first_unit.setdefault(u.layer, k)
        self._pool: ThreadPoolExecutor | None = None   # the copy thread: made per prefill, none at load
        self._stream: torch.cuda.Stream | None = None
        self._next: tuple[int, Future] | None = None   # the unit being copied ahead

    def _copy(self, k: int):
        """Runs on the copy thread: unit k's experts on the GPU, and the event that marks their arrival.
        The blocks go through one of two pinned buffers (a DMA at full bus speed); a buffer is refilled
        only after the copies of the unit before last have left it."""
        from dslocal.kernels.gpu.moe import GPUExperts
        u = self.units[k]
        moe = self.layers[u.layer]
        registered = moe.registration is not None
        staging, last = self._staging[k % 2] if not registered else (None, None)
        if last is not None:
            last.synchronize()
        # the caller's inference mode does not reach this thread, and the buffers were made inside it
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            gpu = GPUExperts.from_experts(moe.experts, u.expert_ids, self.device, staging=staging,
                                          registered=registered)
            done = torch.cuda.Event()
            done.record(self._stream)
        if not registered:
            self._staging[k % 2] = (staging, done)
        return gpu, done

    def _start(self, k: int) -> None:
        if self._stream is None:
            from dslocal.kernels.gpu.moe import GPUExperts
            self._stream = torch.cuda.Stream(self.device)
            staged = [u for u in self.units if self.layers[u.layer].registration is None]
            most = max((GPUExperts.staging_bytes(self.layers[u.layer].experts, len(u.expert_ids))
                        for u in staged), default=0)
            self._staging = [(torch.empty(most, dtype=torch.uint8, pin_memory=bool(most)), None) for _ in range(2)]
        if k >= len(self.units):
            # the prompt's last unit has been copied: the copy thread ends, and with it the OpenMP team of
            # its parallel copies, which would slow the CPU expert worker (offload/cpu_worker.py)
            self._next = None
            self.close()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dslocal-expert-stream")
        self._next = (k, self._pool.submit(self._copy, k))

    def _take(self, k: int):
        """Unit k on the GPU (waiting for its copy); the copy of unit k + 1 starts at once."""
        if self._next is None or self._next[0] != k:
            if self._next is not None:
                self._next[1].result()           # a copy for an unfinished earlier prefill: let it end, drop it
            self._start(k)
        gpu, done = self._next[1].result()
        self._start(k + 1)                       # the next unit crosses the bus while this one computes
        return gpu, done

    def layer_experts(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum over the layer's CPU experts of w * expert(x), computed on the GPU. x (T, D), ids (T, K) expert
        ids of the layer (-1: not a CPU expert), w (T, K) -> (T, D) float32."""
        from dslocal.kernels.gpu.moe import moe_ffn
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        main = torch.cuda.current_stream(self.device)
        k = self.first_unit.get(layer, len(self.units))
        while k < len(self.units) and self.units[k].layer == layer:
            gpu, done = self._take(k)
            main.wait_event(done)
            for f in dataclasses.fields(gpu):    # freed tensors must wait for the main stream's use of them
                t = getattr(gpu, f.name)
                if isinstance(t, torch.Tensor):
                    t.record_stream(main)
            unit = self.units[k].expert_ids
            slot = torch.full((self.layers[layer].experts.n_expert + 1,), -1, dtype=torch.long)
            slot[unit] = torch.arange(len(unit))
            # ids of -1 index slot's last entry, which stays -1
            y += moe_ffn(x, slot.to(x.device, non_blocking=True)[ids], w, gpu)
            k += 1
        return y

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
