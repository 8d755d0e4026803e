"""One MoE layer's routed experts on the CPU: time, tokens/s and GB/s of expert weights read, against the
machine's measured DRAM read bandwidth, with the same layer in torch on bf16 weights beside it.

    python -m dslocal.bench.moe_layer [--shapes v2-lite,v3] [--types q4_k,q6_k,q8_0,q2_k]
                                      [--tokens 1,8,64,512] [--threads N] [--json out.json] [--no-torch]

Weights are random blocks held in memory (not a file): a tile of quantized Gaussian rows repeated over
every expert. A real model has tens of MoE layers, so no decode step finds experts in the last-level
cache; here a layer smaller than 1.2 GB (three times the largest LLC seen, 300 MB on the GPU box) gets
copies, and calls take the copies in turn.

Every call runs on one offload/cpu_worker.py ExpertWorker thread, as the model's layers do (a second thread
running parallel code would bring a second OpenMP team, and two teams make both sleep between steps), on a
moe.py LayerCall per layer copy built once on fixed input buffers, the router's choices written into them
before the clock starts. T = 1 is timed three ways, taking turns: as the decode step runs it (the worker
waits inside the compiled layer for its inputs' flag, LayerCall.synced, and the time runs from the flag to
the layer's end: offload/graphs.py), as a Python call of the LayerCall ("call ms"), and through moe_ffn,
which also checks its inputs and allocates its scratch per call. Routing is uniform; decode (T = 1) walks
the experts in a fixed random order. "GB read" counts each distinct expert of a call once (the bytes the
kernel must stream); the V2-Lite down projection takes llama-quantize's fallback type, since rows of 1408
are not whole 256-value super-blocks. For T = 512 the table also gives the time of the same 512 tokens as
64 separate T = 8 calls, and how many times faster per token the single call is.

The DRAM read bandwidth of a shared machine moves by tens of percent within minutes, so each row's "% of
DRAM" is against the probe read on the same thread right before and right after that row's calls (the
mean of the two, each the best of three reads); the run also probes at its start (best of five).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import threading
import time

import numba
import numpy as np
import psutil
import torch

from dslocal.bench.dram import Probe
from dslocal.kernels.cpu import gemm
from dslocal.kernels.cpu.moe import LayerCall, moe_ffn
from dslocal.kernels.experts import ExpertTensors
from dslocal.offload.cpu_worker import ExpertWorker
from dslocal.quant.ggml import TYPE_INFO, GGMLType, parse_type
from dslocal.quant.quantize import quantize

T_ = GGMLType
SHAPES = {   # hidden D, expert ffn F, experts E, top-k K (HF config.json of each model)
    "v2-lite": dict(D=2048, F=1408, E=64, K=6),
    "v3": dict(D=7168, F=2048, E=256, K=8),
}
# llama-quantize's type for a row that is not whole super-blocks (llama-quant.cpp)
FALLBACK = {T_.Q4_K: T_.Q5_0, T_.Q5_K: T_.Q5_1, T_.Q6_K: T_.Q8_0, T_.Q2_K: T_.Q4_0, T_.Q3_K: T_.Q4_0}
TILE_ROWS = 64
CACHE_DEFEAT_BYTES = 1.2e9   # calls cycle through layer copies of at least this many bytes together


def expert_stack(E: int, rows: int, cols: int, t: GGMLType, rng) -> np.ndarray:
    """uint8 (E, rows, row_bytes): TILE_ROWS quantized N(0, 1/cols) rows repeated over every expert."""
    if cols % TYPE_INFO[t].block_size:
        t = FALLBACK[t]
    tile = quantize(rng.standard_normal((TILE_ROWS, cols), dtype=np.float32) / np.float32(cols ** 0.5), t)
    out = np.empty((E * rows // TILE_ROWS, TILE_ROWS, tile.shape[1]), np.uint8)
    out[:] = tile
    return out.reshape(E, rows, -1), t


def layer(shape: dict, t: GGMLType, rng) -> ExpertTensors:
    E, D, F = shape["E"], shape["D"], shape["F"]
    gate, tg = expert_stack(E, F, D, t, rng)
    up, tu = expert_stack(E, F, D, t, rng)
    down, td = expert_stack(E, D, F, t, rng)
    return ExpertTensors(gate, up, down, tg, tu, td)


def routes(T: int, shape: dict, n_calls: int, rng) -> list[np.ndarray]:
    """Top-k expert ids (T, K) for n_calls calls; T = 1 walks a random permutation of the experts."""
    E, K = shape["E"], shape["K"]
    if T == 1:
        order = rng.permutation(E)
        return [order[(np.arange(K) + K * i) % E][None, :] for i in range(n_calls)]
    return [rng.random((T, E)).argsort(axis=1)[:, :K] for _ in range(n_calls)]


def on_worker(worker: ExpertWorker, fn):
    """fn() run on the worker's thread; what it returns."""
    worker.submit_call(fn)
    return worker.wait()


def timed(fn):
    """A function that runs fn() and returns the seconds it took."""
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


class FixedCalls:
    """A LayerCall per layer copy on shared input buffers of T tokens, the copies called in turn on the worker:
    inputs are copied into the buffers first (x only when it is another array than the buffer it was built on).
    A call returns the seconds the layer took."""

    def __init__(self, worker: ExpertWorker, layers: list[ExpertTensors], x: np.ndarray, K: int):
        self.worker = worker
        self.x, self.ids, self.w = x, np.zeros((x.shape[0], K), np.int64), np.zeros((x.shape[0], K), np.float32)
        self.calls = [LayerCall(self.x, self.ids, self.w, ex) for ex in layers]
        self.n = 0

    def next_call(self, x, ids, w) -> LayerCall:
        if x is not self.x:
            self.x[:] = x
        self.ids[:], self.w[:] = ids, w
        self.n += 1
        return self.calls[self.n % len(self.calls)]

    def __call__(self, x, ids, w) -> float:
        return on_worker(self.worker, timed(self.next_call(x, ids, w)))


class FlaggedCalls(FixedCalls):
    """The calls as the decode step makes them: the worker enters LayerCall.synced, which waits in compiled
    code for a flag; PAUSE after the worker set out to call it (Python's call into the layer takes tens of us
    at most), the clock starts and the flag is set; it stops when the worker is back from the layer. So the
    time is the layer's from its inputs' arrival, as a decode step waits for it, plus the return to Python."""
    PAUSE = 2e-4

    def __init__(self, worker: ExpertWorker, layers: list[ExpertTensors], x: np.ndarray, K: int):
        super().__init__(worker, layers, x, K)
        self.sync = np.zeros(3, np.int64)     # ready, done, abort

    def __call__(self, x, ids, w) -> float:
        call, step, entered = self.next_call(x, ids, w), self.n, threading.Event()

        def run() -> float:
            entered.set()
            if not call.synced(self.sync, 0, 1, 2, step):
                raise RuntimeError("the layer was given up")
            return time.perf_counter()
        self.worker.submit_call(run)
        entered.wait()
        time.sleep(self.PAUSE)
        t0 = time.perf_counter()
        self.sync[0] = step
        return self.worker.wait() - t0


def time_calls(runs, ids_list, x, w) -> tuple[list[float], float]:
    """Median seconds per call of each of the runs (callables that return the seconds their call took), which
    take the calls in turn (each its own routes, so none finds another's experts in the cache, and a slow
    spell of a shared machine falls on all), and mean distinct experts per call; the first two calls only
    warm up."""
    runs[0](x, ids_list[0], w)
    runs[-1](x, ids_list[1], w)
    times = [[] for _ in runs]
    for i, ids in enumerate(ids_list[2:]):
        times[i % len(runs)].append(runs[i % len(runs)](x, ids, w))
    return [float(np.median(t)) for t in times], float(np.mean([len(np.unique(i)) for i in ids_list[2:]]))


def n_calls_for(T: int) -> int:
    return {1: 42, 8: 22, 64: 8, 512: 4}.get(T, 6)


def bench_quant(worker: ExpertWorker, shape_name: str, t: GGMLType, tokens: list[int], probe: Probe,
                rng) -> list[dict]:
    shape = SHAPES[shape_name]
    layers = [layer(shape, t, rng)]
    n_copies = int(np.ceil(CACHE_DEFEAT_BYTES / (layers[0].expert_bytes() * shape["E"])))
    layers += [layer(shape, t, rng) for _ in range(n_copies - 1)]
    ex = layers[0]
    types = f"{ex.gate_type.name}/{ex.down_type.name}" if ex.down_type != ex.gate_type else ex.gate_type.name
    calls = iter(range(1 << 60))
    rows = []
    for T in tokens:
        x = rng.standard_normal((T, shape["D"]), dtype=np.float32)
        w = rng.random((T, shape["K"]), dtype=np.float32)
        if T == 1:
            runs = [FlaggedCalls(worker, layers, x, shape["K"]), FixedCalls(worker, layers, x, shape["K"]),
                    lambda x, ids, w: on_worker(worker, timed(
                        lambda: moe_ffn(x, ids, w, layers[next(calls) % n_copies])))]
        else:
            runs = [FixedCalls(worker, layers, x, shape["K"])]
        ids_list = routes(T, shape, n_calls_for(T) * len(runs), rng)
        (sec, n_exp), dram = around(worker, probe, lambda: time_calls(runs, ids_list, x, w))
        row = _row(shape_name, "dslocal", types, T, sec[0], n_exp * ex.expert_bytes(), dram)
        row["layer_copies"] = n_copies
        if T == 1:
            row["call_ms"], row["moe_ffn_ms"] = 1e3 * sec[1], 1e3 * sec[2]
        if T == 512:
            # the same tokens as 64 calls of 8 (their times added up)
            ids, run = ids_list[-1], FixedCalls(worker, layers, np.empty((8, shape["D"]), np.float32), shape["K"])
            run(x[:8], ids[:8], w[:8])
            per = [run(x[i:i + 8], ids[i:i + 8], w[i:i + 8]) for i in range(0, T, 8)]
            row["t8x64_ms"] = 1e3 * sum(per)
            row["speedup_vs_t8x64"] = sum(per) / sec[0]
        rows.append(row)
        _print_row(row)
    return rows


def bench_torch(worker: ExpertWorker, shape_name: str, tokens: list[int], probe: Probe, rng) -> list[dict]:
    """The same layer in torch, bf16 weights and activations, experts looped as in kernels/ref.py."""
    shape = SHAPES[shape_name]
    E, D, F = shape["E"], shape["D"], shape["F"]
    tile = torch.randn(TILE_ROWS, max(D, F), dtype=torch.bfloat16) * (1 / D ** 0.5)
    gate = tile[:, :D].repeat(E * F // TILE_ROWS, 1).view(E, F, D)
    up = gate.clone()
    down = tile[:, :F].repeat(E * D // TILE_ROWS, 1).view(E, D, F)
    expert_bytes = 3 * D * F * 2

    @torch.inference_mode()
    def layer_bf16(x, ids, w):
        x, ids, w = torch.from_numpy(x).bfloat16(), torch.from_numpy(ids), torch.from_numpy(w).bfloat16()
        y = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            t, k = torch.where(ids == e)
            h = torch.nn.functional.silu(x[t] @ gate[e].T) * (x[t] @ up[e].T)
            y.index_add_(0, t, (h @ down[e].T) * w[t, k, None])
        return y

    def run(x, ids, w) -> float:
        return on_worker(worker, timed(lambda: layer_bf16(x, ids, w)))

    rows = []
    for T in tokens:
        x = rng.standard_normal((T, D), dtype=np.float32)
        w = rng.random((T, shape["K"]), dtype=np.float32)
        ids_list = routes(T, shape, max(4, n_calls_for(T) // 2), rng)
        ((sec,), n_exp), dram = around(worker, probe, lambda: time_calls([run], ids_list, x, w))
        rows.append(_row(shape_name, "torch", "BF16", T, sec, n_exp * expert_bytes, dram))
        _print_row(rows[-1])
    return rows


def around(worker: ExpertWorker, probe: Probe, fn):
    """(fn(), the DRAM read GB/s around it): the mean of the probe's best of three right before and after."""
    before = on_worker(worker, lambda: probe.read(3))["GB_per_s"]
    result = fn()
    after = on_worker(worker, lambda: probe.read(3))["GB_per_s"]
    return result, (before + after) / 2


def _row(shape, impl, types, T, sec, nbytes, dram) -> dict:
    return {"shape": shape, "impl": impl, "types": types, "T": T, "ms": 1e3 * sec, "tokens_per_s": T / sec,
            "GB_read": nbytes / 1e9, "GB_per_s": nbytes / sec / 1e9, "dram_GB_per_s": dram,
            "frac_dram": nbytes / sec / 1e9 / dram}


HEADER = (f"{'shape':<8} {'impl':<8} {'types':<10} {'T':>4} {'ms':>9} {'tok/s':>9} {'GB read':>8} {'GB/s':>7} "
          f"{'DRAM':>6} {'%DRAM':>6}  {'64xT=8 ms':>10} {'speedup':>7}  {'call ms':>8} {'moe_ffn ms':>10}")


def _print_row(r: dict) -> None:
    extra = f"  {r['t8x64_ms']:>10.1f} {r['speedup_vs_t8x64']:>6.2f}x" if "t8x64_ms" in r else ""
    if "moe_ffn_ms" in r:
        extra = f"  {'':>10} {'':>7}  {r['call_ms']:>8.3f} {r['moe_ffn_ms']:>10.3f}"
    print(f"{r['shape']:<8} {r['impl']:<8} {r['types']:<10} {r['T']:>4} {r['ms']:>9.3f} {r['tokens_per_s']:>9.1f} "
          f"{r['GB_read']:>8.3f} {r['GB_per_s']:>7.1f} {r['dram_GB_per_s']:>6.1f} {100 * r['frac_dram']:>5.1f}%"
          f"{extra}", flush=True)


def machine(threads: int) -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "physical_cores": psutil.cpu_count(logical=False),
            "logical_cpus": psutil.cpu_count(), "threads": threads, "numba": numba.__version__,
            "torch": torch.__version__, "memory_GiB": psutil.virtual_memory().total / 2**30}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dslocal.bench.moe_layer",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--shapes", default="v2-lite,v3", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--types", default="q4_k,q6_k,q8_0,q2_k", help="weight types (default q4_k,q6_k,q8_0,q2_k)")
    p.add_argument("--tokens", default="1,8,64,512", help="tokens per call (default 1,8,64,512)")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--dram-gib", type=float, default=4.0, help="buffer of the bandwidth probe (default 4 GiB)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch bf16 comparison")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if any(s not in SHAPES for s in shapes):
        p.error(f"--shapes: choose from {', '.join(SHAPES)}")
    types = [parse_type(t) for t in args.types.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]

    threads = args.threads or psutil.cpu_count(logical=False) or 1
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)
    info = machine(numba.get_num_threads())
    rows = []
    with ExpertWorker(numba.get_num_threads(), pin_memory=False) as worker:
        probe = on_worker(worker, lambda: Probe(args.dram_gib))
        dram = on_worker(worker, probe.read)
        info["threading_layer"] = numba.threading_layer()
        print(f"{info['cpu']}: {info['physical_cores']} cores, {info['logical_cpus']} CPUs, "
              f"{info['memory_GiB']:.0f} GiB; {info['threads']} threads ({info['threading_layer']} layer), "
              f"numba {info['numba']}, torch {info['torch']}")
        info["matrix_path"] = gemm.enabled()
        print(f"experts with {gemm.GEMM_MIN_TOKENS}+ tokens ({gemm.GEMM_MIN_TOKENS_TILED}+ with K-quant gate / up) "
              f"in calls of {gemm.GEMM_MIN_CALL}+: "
              + ("matrix products (kernels/cpu/gemm.py)" if info["matrix_path"] else
                 "row kernels (the matrix path is off: no AMX, or DSLOCAL_CPU_GEMM=0)"))
        print(f"DRAM read bandwidth at the start: {dram['GB_per_s']:.1f} GB/s ({dram['bytes'] / 2**30:.0f} GiB, "
              f"best of 5); DRAM below: the probe right before and after each row\n")
        print("T = 1: ms from the inputs' flag to the layer's end, as the decode step waits for it; call ms: a "
              "Python call of the layer; moe_ffn ms: with moe_ffn's checks and allocations\n")
        print(HEADER, flush=True)
        rng = np.random.default_rng(0)
        for s in shapes:
            for t in types:
                rows += bench_quant(worker, s, t, tokens, probe, rng)
            if not args.no_torch:
                rows += bench_torch(worker, s, tokens, probe, rng)
        dram_after = on_worker(worker, probe.read)
    print(f"\nDRAM read bandwidth at the end: {dram_after['GB_per_s']:.1f} GB/s (best of 5)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak memory (RSS): {peak:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "dram": dram, "dram_after": dram_after, "peak_rss_GiB": peak, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
