"""The CPU expert worker: runs one MoE layer's routed experts on CPU threads while the caller goes on.

    worker = ExpertWorker()                  # threads: the physical cores; pinned buffers if CUDA is there
    worker.submit(x, topk_ids, topk_weights, experts)   # returns at once
    ...                                      # GPU work: attention of the next micro-batch, shared experts
    y = worker.wait()                        # (T, D) float32 on the CPU, pinned; re-raises worker errors
    worker.submit_call(layer_call, ready)    # a prepared kernels.cpu.moe.LayerCall on fixed buffers, or a
                                             # callable that runs such calls itself (offload/graphs.py)
    worker.close()                           # or `with ExpertWorker() as worker:`

One job at a time, in order: submit, then wait, then the next submit. The kernels (kernels/cpu/moe.py) run
compiled and without the GIL, so the caller's Python thread keeps running during the layer. Inputs on a
CUDA device are copied into pinned host buffers without blocking the caller (the worker waits for the
copy's event); the result lands in a pinned buffer that is reused by the next job, so copy it to the GPU
(non_blocking=True is fine) before the next submit.

OpenMP (Numba's kernels and torch's CPU operators share one libgomp) gives each thread that runs a parallel
region a team of its own, kept until that thread ends; once the process has more team threads than cores,
every team stops spinning between parallel steps and sleeps (an empty layer job on the GPU box: ~35 us
alone, 150-190 us beside a second team). So while this worker exists it is the one thread that runs
parallel CPU code for long: other heavy CPU work goes through `in_passing_thread` (the model's loading, the
DRAM probe), and the prefill copy thread ends with each prefill (offload/prefill.py).
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numba
import numpy as np
import psutil
import torch

from dslocal.kernels.cpu.moe import LayerCall, moe_ffn
from dslocal.kernels.experts import ExpertTensors

Result = TypeVar("Result")


def default_threads() -> int:
    """The physical core count (hyper-threads share a core's vector units and memory bandwidth), capped
    at the threads Numba was started with (NUMBA_NUM_THREADS)."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, min(cores, numba.config.NUMBA_NUM_THREADS))


def in_passing_thread(fn: Callable[..., Result], *args, **kwargs) -> Result:
    """fn(*args, **kwargs) in a thread that ends with it, so the OpenMP team its parallel CPU code (torch's
    operators, Numba's kernels) makes goes with the thread instead of staying beside the expert worker's.
    Returns fn's result; raises what fn raised."""
    result: list = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as e:      # raised again in the caller
            errors.append(e)
    # a daemon: after Ctrl-C in the caller the process can exit without waiting for fn to finish
    t = threading.Thread(target=run, name="dslocal-passing", daemon=True)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


@dataclass
class _Job:
    run: Callable[[], object]          # the layer; its return value is what wait() gives back
    ready: torch.cuda.Event | None     # set when the device-to-host copies have landed


class ExpertWorker:
    """A thread that computes MoE layers' routed experts with the CPU kernels, one job at a time."""

    def __init__(self, threads: int | None = None, pin_memory: bool | None = None):
        self.threads = default_threads() if threads is None else int(threads)
        if not 1 <= self.threads <= numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS),"
                             f" got {threads}")
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._buffers: dict[str, torch.Tensor] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._pending = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dslocal-cpu-experts", daemon=True)
        self._thread.start()

    # -- caller side ------------------------------------------------------------------------------------
    def submit(self, x, topk_ids, topk_weights, experts: ExpertTensors, ready: torch.cuda.Event | None = None,
               out: torch.Tensor | None = None) -> None:
        """Start the layer: x (T, D), topk_ids (T, K), topk_weights (T, K), on the CPU or a CUDA device.
        Returns at once; CPU inputs are used in place, so leave them unchanged until wait() returns.
        ready: for CPU inputs that a CUDA stream is still writing (a replayed graph's copies), the event
        after those copies; out: a float32 (T, D) host buffer for the result instead of the reused one."""
        self._check_free()
        x = torch.as_tensor(x)
        T, D = x.shape[0], experts.hidden
        if x.device.type == "cuda" or torch.as_tensor(topk_ids).device.type == "cuda":
            x = self._stage("x", x, torch.float32)
            topk_ids = self._stage("ids", torch.as_tensor(topk_ids), torch.int64)
            topk_weights = self._stage("weights", torch.as_tensor(topk_weights), torch.float32)
            ready = torch.cuda.Event()
            ready.record()
        if out is None:
            out = self._buffer("out", (T, D), torch.float32)
        ids, weights = torch.as_tensor(topk_ids), torch.as_tensor(topk_weights)
        self._put(_Job(lambda: moe_ffn(x, ids, weights, experts, out=out), ready))

    def submit_call(self, call: LayerCall | Callable[[], object], ready: torch.cuda.Event | None = None) -> None:
        """Start a prepared layer (its buffers checked and scratch allocated once; kernels/cpu/moe.py), or
        any callable that runs layers on this thread (a replayed decode step, offload/graphs.py); ready: the
        event after the copies into its input buffers. wait() returns what the call returns."""
        self._check_free()
        self._put(_Job(call, ready))

    def _check_free(self) -> None:
        if self._closed:
            raise RuntimeError("the CPU expert worker is closed")
        if self._pending:
            raise RuntimeError("submit() called twice without wait(): the worker runs one layer at a time")

    def _put(self, job: _Job) -> None:
        self._pending = True
        self._jobs.put(job)

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """The result of the last submit(): (T, D) float32 on the CPU, in a buffer the next job reuses.
        An exception raised in the worker is raised here, unchanged."""
        if not self._pending:
            raise RuntimeError("wait() without submit()")
        try:
            result, error = self._results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the CPU expert worker did not finish within {timeout} s") from None
        except BaseException:      # Ctrl-C: let the layer finish (about a millisecond) so the next submit works
            self._results.get()
            self._pending = False
            raise
        self._pending = False
        if error is not None:
            raise error
        return result

    @property
    def pending(self) -> bool:
        """A job was submitted and not yet collected with wait()."""
        return self._pending

    def close(self) -> None:
        """Stop the thread after the job in hand, if any; idempotent."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
            self._thread.join()

    def __enter__(self) -> ExpertWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reused host buffer of at least shape (grown as needed), pinned when pin_memory; a view of it."""
        n = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(max(n, 1), dtype=dtype, pin_memory=self.pin_memory)
            self._buffers[name] = buf
        return buf[:n].view(shape)

    def _stage(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t copied into a reused (pinned) host buffer without waiting: the job's event marks its arrival."""
        host = self._buffer(name, tuple(t.shape), dtype)
        host.copy_(t, non_blocking=True)
        return host

    # -- worker side ------------------------------------------------------------------------------------
    def _run(self) -> None:
        numba.set_num_threads(self.threads)     # Numba's thread count is per calling thread
        warned = False
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                self._results.put((job.run(), None))
            except BaseException as e:           # handed to the caller by wait()
                self._results.put((None, e))
            if not warned:
                warned = True
                if numba.threading_layer() == "workqueue":
                    print("dslocal: Numba fell back to its workqueue threading layer (no OpenMP or TBB found); "
                          "each of the 4 parallel steps of a layer then costs ~50 us more. Install libgomp "
                          "or `pip install tbb` to use OpenMP or TBB.", file=sys.stderr)
