"""The decode step's hand-offs between the GPU and the CPU expert worker, through flags in pinned host memory.

A CUDA graph cannot wait for the host, and a host that waits for an event, runs the CPU experts and then
launches the next graph puts a launch and a wake-up on the critical path of every MoE layer (~30 us per
layer on the GPU box). Instead the whole decode step is one graph (offload/graphs.py), and the two sides
meet at int64 flags in pinned host memory, which the GPU reads and writes directly (pinned memory is mapped
into the device's address space):

    send     GPU: x, ids, weights -> pinned buffers; fence; sync[ready] = step
    CPU      waits for sync[ready] >= step, runs the layer (kernels/cpu/moe.py LayerCall.synced),
             result -> pinned buffer, sync[done] = step
    receive  GPU: waits for sync[done] >= step, fence, z = y + result (the GPU's own share plus the CPU's)

`step` is a device int64 that the host sets before each replay, so one graph serves every step and no flag
is ever reset. Beside each flag (index + 1) the GPU leaves its clock (%globaltimer, ns) at the moment it
set the ready flag or saw the done flag, and beside the done flag (index + 2) when the receive began to
wait: offload/graphs.py reads them for `DecodeGraphs.timeline()`.
A token whose experts in a layer are all the GPU's (its own, or pulled) leaves the CPU nothing to do: the
send then marks the layer idle in device memory (`busy`), the receive does not wait for the CPU's answer,
and the CPU side, finding only -1 ids, sets its done flag without running the layer. With the hottest
experts on the GPU most of a decode step's layers are so (README, Measured).
sync[abort] >= step gives the step up: the CPU side sets it when its layer fails, a receive sets it after
TIMEOUT_S without an answer, so a failure ends the step (with a wrong result, which the host then
refuses) instead of hanging the GPU. One program of four warps per call: a decode step hands over one
token's D values, and the spinning takes one SM while the GPU's own experts run beside it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dslocal.kernels.gpu.pull import pulled_slot

TIMEOUT_S = 60.0    # a receive that waits longer sets the abort flag and goes on
BLOCK = 1024


@triton.jit
def _fence_sys():
    """fence.sc.sys: this thread's memory operations before it are seen by the host before those after
    it. Returns 0, to be added to a value stored after it (which keeps the compiler from moving the fence)."""
    return tl.inline_asm_elementwise("fence.sc.sys;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def _now_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _send_kernel(p_x, p_ids, p_w, p_xh, p_idsh, p_wh, p_sync, p_step, i_ready, N, NK, p_n, p_busy,
                 PULL: tl.constexpr, MARK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x (N,) as f32, ids (NK,) int64, w (NK,) f32 copied to their host buffers, then sync[i_ready] = step.
    With PULL (one token: NK = K) the p_n[0] ids the GPU pulls (kernels/gpu/pull.py) arrive as -1. With
    MARK, busy[0] = 1 if any id the CPU gets is >= 0, else 0."""
    o = tl.arange(0, BLOCK_N)
    for start in range(0, N, BLOCK_N):
        m = start + o < N
        tl.store(p_xh + start + o, tl.load(p_x + start + o, mask=m).to(tl.float32), mask=m)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < NK
    ids = tl.load(p_ids + o_k, mask=m_k, other=-1)
    if PULL:
        ids = tl.where(pulled_slot(ids, tl.load(p_n)) >= 0, -1, ids)
    if MARK:
        tl.store(p_busy, (tl.max(tl.where(m_k, ids, -1), axis=0) >= 0).to(tl.int32))
    tl.store(p_idsh + o_k, ids, mask=m_k)
    tl.store(p_wh + o_k, tl.load(p_w + o_k, mask=m_k), mask=m_k)
    tl.store(p_sync + i_ready + 1, _now_ns())     # when, for profiles (the flag's cache line has room)
    zero = _fence_sys()          # each thread's stores reach the host before ...
    tl.debug_barrier()           # ... every thread has fenced before ...
    tl.store(p_sync + i_ready, tl.load(p_step) + zero)     # ... the flag


@triton.jit
def _receive_kernel(p_y, p_outh, p_z, p_sync, p_step, i_done, i_abort, N, timeout_ns, p_busy,
                    CHECK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Once sync[i_done] >= step (or sync[i_abort] >= step): z = y + out (N,), out read from host memory.
    With CHECK and busy[0] == 0 (the CPU had nothing to do): z = y at once."""
    if CHECK:
        if tl.load(p_busy) == 0:
            t = _now_ns()
            tl.store(p_sync + i_done + 1, t)     # for profiles: answered at once
            tl.store(p_sync + i_done + 2, t)
            o = tl.arange(0, BLOCK_N)
            for start in range(0, N, BLOCK_N):
                m = start + o < N
                tl.store(p_z + start + o, tl.load(p_y + start + o, mask=m).to(p_z.dtype.element_ty), mask=m)
            return
    step = tl.load(p_step)
    done = tl.load(p_sync + i_done, volatile=True)
    abort = tl.load(p_sync + i_abort, volatile=True)
    t0 = _now_ns()
    t = t0
    while (done < step) & (abort < step) & (t - t0 < timeout_ns):
        done = tl.load(p_sync + i_done, volatile=True)
        abort = tl.load(p_sync + i_abort, volatile=True)
        t = _now_ns()
    if (done < step) & (abort < step):
        tl.store(p_sync + i_abort, step)         # timed out: later receives of this step do not wait
    tl.store(p_sync + i_done + 1, t)             # when the answer was seen, for profiles
    tl.store(p_sync + i_done + 2, t0)            # and when the wait for it began
    # The flag's load and this fence acquire what the CPU wrote before its flag (PTX memory model), so the
    # result takes plain loads, 16 bytes at a time; volatile ones were 32-bit reads over PCIe, 2048 of them.
    # Their addresses depend on the fence's output, so the compiler cannot move them above it.
    zero = _fence_sys()
    p_res = tl.multiple_of(p_outh + zero, 16)    # still the buffer's start (pinned buffers are aligned)
    o = tl.arange(0, BLOCK_N)
    for start in range(0, N, BLOCK_N):
        m = start + o < N
        b_out = tl.load(p_res + start + o, mask=m)
        b_y = tl.load(p_y + start + o, mask=m)
        tl.store(p_z + start + o, (b_y + b_out).to(p_z.dtype.element_ty), mask=m)


def _check_host(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cpu" or not t.is_pinned() or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor in pinned host memory")


def send(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, x_host: torch.Tensor, ids_host: torch.Tensor,
         w_host: torch.Tensor, sync: torch.Tensor, i_ready: int, step: torch.Tensor,
         n_pull: torch.Tensor | None = None, busy: torch.Tensor | None = None) -> None:
    """Copy x (M, D), ids (M, K) int64 and w (M, K) f32 from the GPU into their pinned host buffers (same
    shapes; x_host f32, x f32 or half precision, converted on the way), then set sync[i_ready] = step[0]
    (sync: pinned int64, step: int64 on x's device).
    n_pull (M = 1 only; int64 (1,) on the device, read when the kernel runs): the last n_pull[0] CPU experts
    are the GPU's (kernels/gpu/pull.py) and reach the host as -1. busy (int32 (1,) on the device): set to
    whether any id the host gets is >= 0, for the receive."""
    for t, host, dtypes, name in ((x, x_host, (torch.float32, torch.bfloat16, torch.float16), "x"),
                                  (ids, ids_host, (torch.int64,), "ids"), (w, w_host, (torch.float32,), "w")):
        if t.dtype not in dtypes or host.dtype != dtypes[0] or t.shape != host.shape or not t.is_contiguous():
            raise ValueError(f"send needs {name} as contiguous {' or '.join(map(str, dtypes))} and its host buffer "
                             f"as {dtypes[0]} of the same shape")
        _check_host(host, f"the host buffer of {name}")
    _check_host(sync, "sync")
    if n_pull is not None and ids.shape[0] != 1:
        raise ValueError("experts are pulled by the GPU for one token at a time")
    K = ids.numel()
    _send_kernel[(1,)](x, ids, w, x_host, ids_host, w_host, sync, step, i_ready, x.numel(), K,
                       step if n_pull is None else n_pull, step if busy is None else busy,
                       PULL=n_pull is not None, MARK=busy is not None, BLOCK_N=BLOCK,
                       BLOCK_K=max(16, triton.next_power_of_2(K)), num_warps=4)


def receive(y: torch.Tensor, out_host: torch.Tensor, sync: torch.Tensor, i_done: int, i_abort: int,
            step: torch.Tensor, dtype: torch.dtype, timeout_s: float = TIMEOUT_S,
            busy: torch.Tensor | None = None) -> torch.Tensor:
    """Wait on the GPU for sync[i_done] >= step[0], then return y + out_host as dtype: y (M, D) f32 on the
    GPU, out_host (M, D) f32 pinned. Gives up after timeout_s (sets sync[i_abort]; the sum is then wrong).
    busy: the send's mark; where it is 0 the CPU had nothing to add, and y is returned without waiting."""
    if y.dtype != torch.float32 or out_host.dtype != torch.float32 or y.shape != out_host.shape \
            or not y.is_contiguous():
        raise ValueError("receive needs y and its host result as contiguous float32 of one shape")
    _check_host(out_host, "the host result")
    if out_host.data_ptr() % 16:
        raise ValueError("the host result must start on a 16-byte boundary (the receive reads it 16 bytes at a time)")
    _check_host(sync, "sync")
    z = torch.empty(y.shape, dtype=dtype, device=y.device)
    _receive_kernel[(1,)](y, out_host, z, sync, step, i_done, i_abort, y.numel(), int(timeout_s * 1e9),
                          step if busy is None else busy, CHECK=busy is not None, BLOCK_N=BLOCK, num_warps=4)
    return z
