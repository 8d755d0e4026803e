"""A share of each decode step's CPU experts read by the GPU straight from host memory (over PCIe).

With every routed expert in host memory, a decode step's MoE layer waits for the CPU threads, which stream
the layer's ~6 experts at 60-70 GB/s on the GPU box, bound by their arithmetic rather than by DRAM; the GPU
meanwhile waits too. The GPU can read host memory itself: the file's memory map, registered with CUDA
(cudaHostRegister, read-only), is addressable from kernels. On the box a kernel reads it at ~50 GB/s over
PCIe with the CPU idle and ~29 GB/s beside the CPU threads, which lose little: the two together then read
~87 GB/s, about the DRAM bandwidth (README, Measured; kernels/cpu/NOTES.md). So, per MoE layer of a decode
step:

    split     of the token's CPU experts, the last n (in routing order) go to the GPU, the rest to the CPU
    gather    the GPU copies those n experts' blocks from host memory into a staging buffer (one kernel)
    moe_ffn   kernels/gpu/moe.py's GEMVs on the staged blocks, while the CPU computes its share

How many to pull (n) is a device scalar (PullCount) that the kernels read, so one captured decode step
serves every n up to the staging buffer's slots: offload/pulltune.py times decode steps at neighbouring n
and keeps the fastest (the best n depends on the machine's CPU, DRAM and PCIe, and on the model's shapes).

The split is one rule written twice: `pulled_slot` (Triton), which the hand-off's send kernel
(kernels/gpu/handoff.py: the CPU's ids with the pulled ones set to -1) and `_gather_kernel` (which experts
it copies) both call, and `cpu_share` (torch: its reference, and the eager first step's split). Weights
stay in host memory; the staging buffer (a slot per expert that n may reach, sized for the largest layer)
is the only GPU memory this takes.
"""
from __future__ import annotations

import mmap
import weakref
from collections.abc import Sequence

import numpy as np
import psutil
import torch
import triton
import triton.language as tl

from dslocal.kernels.experts import ExpertTensors
from dslocal.kernels.gpu.dequant import LAYOUT
from dslocal.kernels.gpu.moe import GPUExperts, _host_tensor, moe_ffn

CHUNK_BYTES = 32768    # bytes one program of the gather copies
MAX_SLOTS = 16         # experts per token the staging buffer may hold
MAX_RAM_SHARE = 0.8    # registered (pinned) pages may take at most this share of the machine's RAM
PULL_TYPES = frozenset(t for t, layout in LAYOUT.items() if layout.plain is None)   # block types the GEMV unpacks
_REGISTER_MAPPED, _REGISTER_READ_ONLY = 2, 8     # cudaHostRegister flags
_live: dict[tuple[int, int], int] = {}    # page range registered here -> HostRegistrations that use it


@triton.jit
def pulled_slot(ids, n_pull):
    """For one token's K expert ids (a block; -1 where the expert is not the CPU's, and as padding): the
    staging slot of each pulled expert (0 for the last CPU expert, 1 for the one before, .. n_pull - 1),
    -1 for the others."""
    on_cpu = (ids >= 0).to(tl.int32)
    after = tl.sum(on_cpu, axis=0) - tl.cumsum(on_cpu, axis=0)      # CPU experts after each position
    return tl.where((on_cpu > 0) & (after < n_pull), after, -1)


def cpu_share(cpu_ids: torch.Tensor, n_pull: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pulled_slot in torch: cpu_ids (T, K) -> (the CPU's ids, pulled ones -1; each pulled expert's slot,
    others -1). The reference of the kernels' rule, and the eager decode step's split."""
    on_cpu = cpu_ids >= 0
    after = on_cpu.sum(-1, keepdim=True) - on_cpu.long().cumsum(-1)
    pulled = on_cpu & (after < n_pull)
    return torch.where(pulled, -1, cpu_ids), torch.where(pulled, after, -1)


class PullCount:
    """How many of each token's CPU experts the GPU pulls in decode steps, shared by the model's layers:
    `on_device` (int64 (1,), read by the send and gather kernels, so a captured graph follows changes) and
    its value on the host, `n`. tune: whether the decode steps may change it (offload/pulltune.py)."""

    def __init__(self, n: int, slots: int, device: torch.device, tune: bool = False):
        if not 0 < slots <= MAX_SLOTS:
            raise ValueError(f"the GPU pulls 1 to {MAX_SLOTS} experts per token, not {slots}")
        self.slots, self.tune = slots, tune
        self.on_device = torch.zeros(1, dtype=torch.int64, device=device)
        self.n = -1
        self.set(n)

    def set(self, n: int) -> None:
        """Pull n from the next step on: the device value is written in stream order (before a graph replay
        launched after this call)."""
        if not 0 <= n <= self.slots:
            raise ValueError(f"a pull count must be 0 to {self.slots} (the staging slots), not {n}")
        if n != self.n:
            self.on_device.fill_(n)
            self.n = n


@triton.jit
def _gather_kernel(p_ids, p_w, K, p_n, p_slot_id, p_slot_w, p_g, p_u, p_d, p_sg, p_su, p_sd, n_g, n_u, n_d,
                   BLOCK_K: tl.constexpr, BLOCK: tl.constexpr, ITER: tl.constexpr):
    """Program (i, c, m): chunk c of matrix m (gate, up, down) of the expert in slot i, host -> staging.
    Programs (i, 0, 0) also write slot i's local id (i, or -1 when fewer than n (p_n[0]) experts are pulled,
    or fewer than n are the CPU's) and weight. ids, w: one token's (K,); matrices (E, n_m) in elements of one
    width."""
    i, c, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_k = tl.arange(0, BLOCK_K)
    ids = tl.load(p_ids + o_k, mask=o_k < K, other=-1)
    here = pulled_slot(ids, tl.load(p_n)) == i
    found = tl.sum(here.to(tl.int32), axis=0) > 0
    e = tl.sum(tl.where(here, ids, 0), axis=0)
    if (c == 0) & (m == 0):
        tl.store(p_slot_id + i, tl.where(found, i, -1).to(tl.int64))
        tl.store(p_slot_w + i, tl.sum(tl.where(here, tl.load(p_w + o_k, mask=o_k < K, other=0.0), 0.0), axis=0))
    if found:
        if m == 0:
            src, dst, n = p_g, p_sg, n_g
        elif m == 1:
            src, dst, n = p_u, p_su, n_u
        else:
            src, dst, n = p_d, p_sd, n_d
        o = tl.arange(0, BLOCK)
        for it in range(ITER):
            at = (c * ITER + it) * BLOCK + o
            keep = at < n
            tl.store(dst + i * n + at, tl.load(src + e * n + at, mask=keep), mask=keep)


class HostRegistration:
    """The pages of some arrays, registered with CUDA (read-only, mapped) while this object lives: kernels
    may then read the arrays through their host addresses. Whole pages are registered, and the GPU may
    not write to them (a copy from the device into them fails): the arrays must be views of a file's
    memory map, or fill their pages alone. The arrays are kept alive with the registration. Registrations
    of the same ranges (a file's experts loaded into a second model) share CUDA's one. Pinned pages cannot
    be swapped out, so more than MAX_RAM_SHARE of the RAM is refused (RuntimeError, before CUDA is asked)."""

    def __init__(self, arrays: Sequence[np.ndarray]):
        page = mmap.PAGESIZE
        spans = sorted((a.ctypes.data // page * page, -(-(a.ctypes.data + a.nbytes) // page) * page)
                       for a in arrays)
        merged: list[list[int]] = []
        for lo, hi in spans:                        # overlapping or touching ranges become one
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        total = sum(hi - lo for lo, hi in merged)
        ram = psutil.virtual_memory().total
        if total > MAX_RAM_SHARE * ram:
            raise RuntimeError(f"registering {total / 2**30:.1f} GiB of expert pages would pin more than "
                               f"{MAX_RAM_SHARE:.0%} of the {ram / 2**30:.1f} GiB of RAM")
        rt = torch.cuda.cudart()
        done: list[tuple[int, int]] = []
        for lo, hi in merged:
            if (lo, hi) not in _live:
                err = rt.cudaHostRegister(lo, hi - lo, _REGISTER_MAPPED | _REGISTER_READ_ONLY)
                if int(err) != 0:
                    _unregister(done, arrays)
                    _clear_last_error()
                    raise RuntimeError(f"CUDA could not register {(hi - lo) / 2**20:.0f} MiB of host memory "
                                       f"for reading ({rt.cudaGetErrorString(err)})")
            _live[lo, hi] = _live.get((lo, hi), 0) + 1
            done.append((lo, hi))
        self.nbytes = total
        self._finalizer = weakref.finalize(self, _unregister, done, list(arrays))

    def close(self) -> None:
        self._finalizer()


def _clear_last_error() -> None:
    """Take a failed runtime call's error off CUDA's last-error slot (torch's binding has no
    cudaGetLastError), where torch's next kernel launch check would otherwise find and raise it."""
    try:
        torch.zeros(1, device="cuda").add_(1)
    except RuntimeError:
        pass


def _unregister(ranges: list[tuple[int, int]], arrays) -> None:
    """The end of a HostRegistration: ranges no other one uses are unregistered (the arrays, kept alive
    until now, may go after it)."""
    for lo, hi in ranges:
        _live[lo, hi] -= 1
        if not _live[lo, hi]:
            del _live[lo, hi]
            torch.cuda.cudart().cudaHostUnregister(lo)


def _width(experts: ExpertTensors) -> torch.dtype:
    """The widest integer dtype that divides every expert matrix's bytes and address."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if all(a.nbytes // a.shape[0] % size == 0 and a.ctypes.data % size == 0
               for a in (experts.gate, experts.up, experts.down)):
            return dtype
    return torch.uint8


class PulledExperts:
    """One MoE layer's pulled share: call it on a decode step's token to get the pulled experts' sum."""

    def __init__(self, experts: ExpertTensors, count: PullCount, staging: torch.Tensor,
                 registration: HostRegistration | None):
        """experts: the layer's host blocks (registered, or on the CPU for the interpreter); count: how many
        to pull (count.slots at most); staging: a uint8 device buffer of at least staging_bytes(experts,
        count.slots), shared by the layers (a step runs them one after another); registration: kept alive
        while this layer may read host memory."""
        for t in (experts.gate_type, experts.up_type, experts.down_type):
            if t not in PULL_TYPES:
                raise ValueError(f"the GPU cannot read {t.name} expert blocks from host memory")
        self.count, self.registration = count, registration
        n_pull = count.slots
        width = _width(experts)
        self._src = [_host_tensor(a).view(a.shape[0], -1).view(width) for a in
                     (experts.gate, experts.up, experts.down)]
        mats, at = [], 0
        for a in (experts.gate, experts.up, experts.down):
            size = n_pull * (a.nbytes // a.shape[0])
            mats.append(staging[at:at + size].view(n_pull, *a.shape[1:]))
            at += size
        self.staged = GPUExperts(*mats, experts.gate_type, experts.up_type, experts.down_type,
                                 experts.hidden, experts.ffn, kept=PULL_TYPES)
        self._dst = [m.view(n_pull, -1).view(width) for m in mats]
        per_program = CHUNK_BYTES // width.itemsize              # elements one gather program copies
        self._block = min(1024, per_program)
        self._grid = (n_pull, triton.cdiv(max(d.shape[1] for d in self._dst), per_program), 3)
        self._iters = per_program // self._block
        device = staging.device
        self.slot_id = torch.full((1, n_pull), -1, dtype=torch.long, device=device)
        self.slot_w = torch.zeros((1, n_pull), dtype=torch.float32, device=device)
        self.out = torch.empty((1, experts.hidden), dtype=torch.float32, device=device)

    @staticmethod
    def staging_bytes(experts: ExpertTensors, n_pull: int) -> int:
        return n_pull * experts.expert_bytes()

    def __call__(self, x: torch.Tensor, cpu_ids: torch.Tensor, w: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """x (1, D) f32 or bf16, cpu_ids (1, K) int64 (-1: not the CPU's), w (1, K) f32 -> (1, D) f32: the
        weighted sum of the count's experts, added to `out` if given, else in a buffer reused by the next
        call. No host synchronisation."""
        K = cpu_ids.shape[-1]
        if cpu_ids.shape[0] != 1 or not cpu_ids.is_contiguous() or not w.is_contiguous():
            raise ValueError("pulled experts serve one token's contiguous (1, K) ids and weights")
        g, u, d = self._src
        sg, su, sd = self._dst
        _gather_kernel[self._grid](
            cpu_ids, w, K, self.count.on_device, self.slot_id, self.slot_w, g, u, d, sg, su, sd, g.shape[1], u.shape[1],
            d.shape[1],
            BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK=self._block, ITER=self._iters, num_warps=4)
        if out is not None:
            return moe_ffn(x, self.slot_id, self.slot_w, self.staged, out=out, accumulate=True)
        return moe_ffn(x, self.slot_id, self.slot_w, self.staged, out=self.out)
