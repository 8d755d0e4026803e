"""offload/cpu_worker.py: results equal to the kernel's, the caller's thread free during a job, errors
forwarded with their message, clean shutdown."""
import os
import threading
import time

import numpy as np
import pytest
import torch

from dslocal.kernels.cpu.moe import LayerCall, moe_ffn
from dslocal.kernels.experts import ExpertTensors
from dslocal.offload.cpu_worker import ExpertWorker, default_threads, in_passing_thread
from dslocal.quant.ggml import GGMLType
from dslocal.quant.quantize import quantize

T_ = GGMLType


def layer(rng, E=8, D=256, F=256, t=T_.Q4_K):
    def q(rows, cols):
        return quantize(rng.standard_normal((E, rows, cols), dtype=np.float32) / np.float32(cols ** 0.5), t)
    return ExpertTensors(q(F, D), q(F, D), q(D, F), t, t, t)


def test_results_equal_the_kernel_and_buffers_are_reused():
    rng = np.random.default_rng(0)
    ex = layer(rng)
    with ExpertWorker(threads=1) as worker:
        assert not worker.pin_memory or torch.cuda.is_available()
        for T in (1, 7, 3):
            x = torch.randn(T, 256)
            ids = torch.from_numpy(np.stack([rng.choice(8, 4, replace=False) for _ in range(T)]))
            w = torch.rand(T, 4)
            worker.submit(x, ids, w, ex)
            y = worker.wait()
            assert y.shape == (T, 256) and y.dtype == torch.float32
            assert torch.equal(y, moe_ffn(x, ids, w, ex))   # same kernel, same per-row summation order


def test_a_prepared_layer_call_runs_on_the_worker():
    rng = np.random.default_rng(1)
    ex = layer(rng)
    x, ids, w = torch.randn(2, 256), torch.tensor([[0, 3, -1, 5], [7, 1, 2, 3]]), torch.rand(2, 4)
    out = torch.empty(2, 256)
    call = LayerCall(x, ids, w, ex, out)
    with ExpertWorker(threads=1) as worker:
        for _ in range(2):
            x.copy_(torch.randn(2, 256))        # the call reads its buffers when it runs
            worker.submit_call(call)
            with pytest.raises(RuntimeError, match="twice"):
                worker.submit_call(call)
            y = worker.wait()
            assert np.shares_memory(y, out.numpy()) and torch.equal(out, moe_ffn(x, ids, w, ex))


def test_caller_thread_runs_while_the_layer_computes():
    """If the kernel held the GIL, the caller's Python loop could not finish long before the job does."""
    rng = np.random.default_rng(1)
    ex = layer(rng, E=16, D=1024, F=1024, t=T_.Q8_0)
    x = torch.randn(200, 1024)
    ids = torch.from_numpy(np.stack([rng.choice(16, 8, replace=False) for _ in range(200)]))
    w = torch.rand(200, 8)
    with ExpertWorker(threads=1) as worker:
        worker.submit(x[:1], ids[:1], w[:1], ex)     # compile (or load) outside the measurement
        worker.wait()
        t0 = time.perf_counter()
        worker.submit(x, ids, w, ex)
        submit_s = time.perf_counter() - t0
        n = 0
        for _ in range(20_000):                       # a few ms of pure Python
            n += 1
        python_done = time.perf_counter()
        worker.wait()
        job_done = time.perf_counter()
    print(f"submit {submit_s * 1e3:.2f} ms, caller's loop done at {(python_done - t0) * 1e3:.1f} ms, "
          f"job at {(job_done - t0) * 1e3:.1f} ms")
    assert submit_s < 0.05
    assert python_done < job_done - 0.2 * (job_done - t0)


def test_worker_errors_reach_the_caller():
    rng = np.random.default_rng(2)
    ex = layer(rng)
    with ExpertWorker(threads=1) as worker:
        worker.submit(torch.zeros(2, 256), torch.tensor([[0], [99]]), torch.ones(2, 1), ex)
        with pytest.raises(ValueError, match=r"expert ids must be in \[0, 8\)"):
            worker.wait()
        worker.submit(torch.zeros(1, 256), torch.tensor([[1]]), torch.ones(1, 1), ex)   # still usable
        assert worker.wait().shape == (1, 256)


def test_one_job_at_a_time_and_clean_shutdown():
    rng = np.random.default_rng(3)
    ex = layer(rng)
    before = threading.active_count()
    worker = ExpertWorker(threads=1)
    assert threading.active_count() == before + 1
    with pytest.raises(RuntimeError, match="without submit"):
        worker.wait()
    worker.submit(torch.zeros(1, 256), torch.tensor([[1]]), torch.ones(1, 1), ex)
    with pytest.raises(RuntimeError, match="twice"):
        worker.submit(torch.zeros(1, 256), torch.tensor([[1]]), torch.ones(1, 1), ex)
    worker.wait()
    worker.close()
    worker.close()
    assert threading.active_count() == before
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(torch.zeros(1, 256), torch.tensor([[1]]), torch.ones(1, 1), ex)


def test_thread_count():
    assert 1 <= default_threads()
    with pytest.raises(ValueError, match="threads must be"):
        ExpertWorker(threads=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_go_through_pinned_buffers():
    rng = np.random.default_rng(4)
    ex = layer(rng)
    x = torch.randn(3, 256, device="cuda")
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]], device="cuda")
    w = torch.rand(3, 2, device="cuda")
    with ExpertWorker(threads=2) as worker:
        assert worker.pin_memory
        worker.submit(x, ids, w, ex)
        y = worker.wait()
        assert y.is_pinned()
        assert torch.equal(y, moe_ffn(x.cpu(), ids.cpu(), w.cpu(), ex))


def test_in_passing_thread_returns_and_raises():
    assert in_passing_thread(lambda a, b=0: a + b, 2, b=3) == 5
    main = threading.get_ident()
    assert in_passing_thread(threading.get_ident) != main
    with pytest.raises(ZeroDivisionError):
        in_passing_thread(lambda: 1 / 0)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                    reason="counts the threads of a Linux process with a parallel torch")
def test_in_passing_thread_leaves_no_openmp_team_behind():
    """torch's parallel operators make an OpenMP team for the thread that runs them, kept until that thread
    ends; beside the expert worker's team it makes both sleep between parallel steps (cpu_worker.py)."""
    def threads() -> int:
        return len(os.listdir("/proc/self/task"))
    x = torch.randn(4_000_000)
    before = threads()
    in_passing_thread(lambda: float((x * 2).sum()))
    deadline = time.monotonic() + 5
    while threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads() <= before
