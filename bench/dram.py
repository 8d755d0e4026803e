"""DRAM read bandwidth: a multithreaded sum over a buffer far larger than the caches.

    python -m dslocal.bench.dram [--gib 4] [--threads N]

The CPU MoE kernels are judged against this number (DESIGN.md, "The performance model").
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit, prange

from dslocal.offload.cpu_worker import in_passing_thread


@njit(cache=True, nogil=True, parallel=True)
def _read_all(a, n_parts):
    """Sum of a uint64 (N,) in n_parts contiguous ranges, one per thread; every byte is loaded once."""
    n = a.shape[0]
    part = np.empty(n_parts, np.uint64)
    for p in prange(n_parts):
        s = np.uint64(0)
        # an unsigned index: with a signed one Numba keeps the negative-index wrap check in the loop and
        # it does not vectorise (one core then sums ~4 GB/s, which a 16-core probe would report as "DRAM")
        for i in range(np.uint64(p * n // n_parts), np.uint64((p + 1) * n // n_parts)):
            s += a[i]
        part[p] = s
    total = np.uint64(0)
    for p in range(n_parts):
        total += part[p]
    return total


def read_bandwidth(gib: float = 4.0, repeat: int = 5, threads: int | None = None) -> dict:
    """Best-of-repeat read bandwidth in GB/s (1e9 bytes/s) of a gib GiB buffer on `threads` threads
    (default: as many as the calling thread's numba.get_num_threads()).

    Probed from a thread that ends with the probe: its OpenMP team goes with it, and does not stay beside
    the CPU expert worker's (offload/cpu_worker.py says why that would slow the worker down)."""
    threads = threads or numba.get_num_threads()
    return in_passing_thread(lambda: Probe(gib, threads).read(repeat))


class Probe:
    """A buffer of gib GiB, its pages touched, for reads of it on `threads` threads from the calling thread
    (one that runs no other team of parallel code beside it): on a shared machine the bandwidth moves by tens
    of percent within minutes, so a benchmark probes again next to each thing it judges against it."""

    def __init__(self, gib: float = 4.0, threads: int | None = None):
        self.threads = threads or numba.get_num_threads()
        self.a = np.empty(int(gib * 2**30) // 8, np.uint64)
        self.a[:] = 1                           # touch every page before timing
        _read_all(self.a[: 1 << 16], self.threads)  # compile (or load) outside the timing

    def read(self, repeat: int = 5) -> dict:
        numba.set_num_threads(self.threads)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            _read_all(self.a, self.threads)
            times.append(time.perf_counter() - t0)
        best = min(times)
        n = self.a.nbytes
        return {"bytes": n, "threads": self.threads, "seconds": best, "GB_per_s": n / best / 1e9,
                "median_GB_per_s": n / float(np.median(times)) / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dslocal.bench.dram", description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=4.0, help="buffer size in GiB (default 4)")
    p.add_argument("--threads", type=int, help="threads (default: numba's default)")
    args = p.parse_args(argv)
    r = read_bandwidth(args.gib, threads=args.threads)
    print(f"DRAM read: {r['GB_per_s']:.1f} GB/s best, {r['median_GB_per_s']:.1f} median "
          f"({r['bytes'] / 2**30:.1f} GiB, {r['threads']} threads, {numba.threading_layer()} layer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
