"""kernels/gpu/handoff.py: the decode step's GPU <-> CPU hand-offs through flags in pinned host memory.

CUDA only (the kernels fence and read the GPU's clock in inline PTX, which the Triton interpreter does not
run). The CPU side here is a Python thread that waits for the ready flag, reads the inputs, writes a result
and sets the done flag, as kernels/cpu/moe.py LayerCall.synced does in compiled code. Wanted: exact copies,
exact sums, the flags holding the step's number, and a receive that is never answered giving up.
"""
import threading
import time

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (inline PTX)")

D, K = 2048, 6
READY, DONE, ABORT = 0, 8, 16


def pinned(shape, dtype):
    return torch.zeros(shape, dtype=dtype, pin_memory=True)


def cpu_side(sync, x_host, w_host, out_host, step, errors):
    """Wait for sync[READY] >= step, then out = x * sum(w) and sync[DONE] = step."""
    try:
        flags = sync.numpy()
        deadline = time.monotonic() + 10
        while flags[READY] < step:
            assert time.monotonic() < deadline, "the ready flag never came"
        out_host.copy_(x_host * w_host.sum())
        flags[DONE] = step
    except BaseException as e:
        errors.append(e)


def test_send_then_receive_in_a_replayed_graph():
    from dslocal.kernels.gpu import handoff
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((1, D), device="cuda", generator=g)
    y = torch.randn((1, D), device="cuda", generator=g)
    ids = torch.randint(-1, 64, (1, K), device="cuda", generator=g)
    w = torch.rand((1, K), device="cuda", generator=g)
    x_host, ids_host, w_host, out_host = pinned((1, D), torch.float32), pinned((1, K), torch.int64), \
        pinned((1, K), torch.float32), pinned((1, D), torch.float32)
    sync, step = pinned(24, torch.int64), torch.zeros(1, dtype=torch.int64, device="cuda")

    def layer():
        handoff.send(x, ids, w, x_host, ids_host, w_host, sync, READY, step)
        return handoff.receive(y, out_host, sync, DONE, ABORT, step, torch.bfloat16)

    errors = []
    for n, graphed in ((1, False), (2, True), (3, True)):
        step.fill_(n)
        x.mul_(-1)          # new inputs each step
        if n == 2:          # captured after one eager run (which compiled the kernels)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                z = layer()
        answer = threading.Thread(target=cpu_side, args=(sync, x_host, w_host, out_host, n, errors))
        answer.start()
        if graphed:
            graph.replay()
        else:
            z = layer()
        torch.cuda.synchronize()
        answer.join()
        assert not errors, errors
        assert torch.equal(x_host, x.cpu()) and torch.equal(ids_host, ids.cpu()) and torch.equal(w_host, w.cpu())
        assert int(sync[READY]) == n and int(sync[DONE]) == n and int(sync[ABORT]) == 0
        want = (y.cpu() + x.cpu() * w.cpu().sum()).to(torch.bfloat16)
        assert z.dtype == torch.bfloat16 and torch.equal(z.cpu(), want)


def test_each_replay_adds_its_own_steps_result():
    """A compiled CPU side, as fast as LayerCall.synced (kernels/cpu/moe.py's acquire and release flags), writes
    each layer's result just before its flag, while the receive polls: a receive that read the result before
    it saw the flag would add a previous step's."""
    from numba import njit

    from dslocal.kernels.cpu.moe import _load_acquire, _pause, _store_release
    from dslocal.kernels.gpu import handoff
    L, stride = 4, 16

    @njit(nogil=True)
    def answer(sync, out, step):
        for j in range(out.shape[0]):
            while _load_acquire(sync, stride * j) < step:
                _pause()
            for i in range(out.shape[1]):
                out[j, i] = step * (j + 1)
            _store_release(sync, stride * j + 8, step)

    x, w, y = torch.randn((1, D), device="cuda"), torch.rand((1, K), device="cuda"), torch.zeros((1, D), device="cuda")
    ids = torch.arange(K, device="cuda")[None]
    x_host, ids_host, w_host = pinned((1, D), torch.float32), pinned((1, K), torch.int64), pinned((1, K), torch.float32)
    out_host, sync = pinned((L, D), torch.float32), pinned(stride * L + 8, torch.int64)
    step = torch.ones(1, dtype=torch.int64, device="cuda")

    def layers():
        z = []
        for j in range(L):
            handoff.send(x, ids, w, x_host, ids_host, w_host, sync, stride * j, step)
            z.append(handoff.receive(y, out_host[j:j + 1], sync, stride * j + 8, stride * L, step, torch.float32,
                                     timeout_s=10))
        return z

    flags, out = sync.numpy(), out_host.numpy()
    z = layers()                                     # eager: compiles the kernels
    answer(flags, out, 1)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = layers()
    for n in range(2, 202):
        step.fill_(n)
        graph.replay()
        answer(flags, out, n)
        torch.cuda.synchronize()
        got = torch.cat(z).cpu()
        assert int(sync[stride * L]) == 0, f"step {n} was given up"
        assert torch.equal(got, n * torch.arange(1, L + 1, dtype=torch.float32)[:, None].expand(L, D)), n


def test_a_send_hands_the_cpu_the_experts_the_gpu_does_not_pull():
    """The pull count is read on the device: one captured send follows it from replay to replay."""
    from dslocal.kernels.gpu import handoff
    from dslocal.kernels.gpu.pull import PullCount, cpu_share
    x, w = torch.randn((1, D), device="cuda"), torch.rand((1, K), device="cuda")
    ids = torch.tensor([[5, -1, 2, 7, -1, 3]], device="cuda")
    x_host, ids_host, w_host = pinned((1, D), torch.float32), pinned((1, K), torch.int64), pinned((1, K), torch.float32)
    sync, step = pinned(24, torch.int64), torch.ones(1, dtype=torch.int64, device="cuda")
    count = PullCount(1, 4, torch.device("cuda"))
    handoff.send(x, ids, w, x_host, ids_host, w_host, sync, READY, step, count.on_device)     # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        handoff.send(x, ids, w, x_host, ids_host, w_host, sync, READY, step, count.on_device)
    for n in (1, 3, 0, 4, 2):
        count.set(n)
        graph.replay()
        torch.cuda.synchronize()
        assert ids_host.tolist() == cpu_share(ids.cpu(), n)[0].tolist(), n


def test_a_layer_with_no_cpu_expert_does_not_wait_for_the_cpu():
    """The send marks whether the CPU got any expert; where it got none the receive returns the GPU's share
    at once (no CPU side answers here: a wait would run into the timeout)."""
    from dslocal.kernels.gpu import handoff
    x, y, w = torch.randn((1, D), device="cuda"), torch.randn((1, D), device="cuda"), torch.rand((1, K), device="cuda")
    x_host, ids_host, w_host, out_host = pinned((1, D), torch.float32), pinned((1, K), torch.int64), \
        pinned((1, K), torch.float32), pinned((1, D), torch.float32)
    sync, step = pinned(24, torch.int64), torch.ones(1, dtype=torch.int64, device="cuda")
    busy = torch.full((1,), 7, dtype=torch.int32, device="cuda")
    out_host.fill_(float("nan"))
    for ids, want in (([[3, -1, -1, -1, -1, -1]], 1), ([[-1] * K], 0)):
        handoff.send(x, torch.tensor(ids, device="cuda"), w, x_host, ids_host, w_host, sync, READY, step, busy=busy)
        torch.cuda.synchronize()
        assert int(busy) == want and int(sync[READY]) == int(step)
    t0 = time.monotonic()
    z = handoff.receive(y, out_host, sync, DONE, ABORT, step, torch.float32, timeout_s=2.0, busy=busy)
    torch.cuda.synchronize()
    assert time.monotonic() - t0 < 1.0 and torch.equal(z, y) and int(sync[ABORT]) == 0 and int(sync[DONE]) == 0


def test_a_receive_never_answered_gives_the_step_up():
    from dslocal.kernels.gpu import handoff
    y = torch.ones((1, D), device="cuda")
    out_host, sync = pinned((1, D), torch.float32), pinned(24, torch.int64)
    step = torch.full((1,), 4, dtype=torch.int64, device="cuda")
    t0 = time.monotonic()
    handoff.receive(y, out_host, sync, DONE, ABORT, step, torch.float32, timeout_s=0.2)
    torch.cuda.synchronize()
    assert 0.2 <= time.monotonic() - t0 < 5
    assert int(sync[ABORT]) == 4 and int(sync[DONE]) == 0
    # once given up, later receives of that step do not wait
    t0 = time.monotonic()
    handoff.receive(y, out_host, sync, DONE + 4, ABORT, step, torch.float32, timeout_s=30)
    torch.cuda.synchronize()
    assert time.monotonic() - t0 < 1


def test_host_buffers_must_be_pinned():
    from dslocal.kernels.gpu import handoff
    y = torch.ones((1, D), device="cuda")
    with pytest.raises(ValueError, match="pinned"):
        handoff.receive(y, torch.zeros((1, D)), pinned(24, torch.int64), DONE, ABORT,
                        torch.ones(1, dtype=torch.int64, device="cuda"), torch.float32)
