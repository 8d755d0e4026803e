"""`dslocal bench`: a whole model's prefill and decode tokens/s, time to first token, load time, peak memory,
and the decode's GB/s of routed experts read from host memory against the DRAM read bandwidth measured in
the same run.

    dslocal bench [--gguf FILE | --preset v2-lite --type q4_k_m] [--gpu-memory 12GiB] [--cpu-only]
                  [--gpu-experts N] [--prompt-lengths 128,2048] [--gen 128] [--threads N] [--device cuda]
                  [--repeat 3] [--json out.json] [--chart out.png] [--reference]

Every run of a prompt length starts from an empty cache (Engine.reset), so no prompt token is served from
the prefix cache; the table gives the median of --repeat runs. One short generation before the first run
pays for compilation and warm-up and is not counted, nor are the generations after it while the pull count
is being tuned (offload/pulltune.py; not with --pull-experts given). Decode tokens/s is tokens over seconds where every
token costs one single-token forward (one_run). Decode GB/s counts the routed-expert bytes the placement
leaves in host memory for each token (Placement.cpu_expert_bytes_per_token, DESIGN.md "The performance
model"), read by the CPU threads and, with --pull-experts, partly by the GPU over PCIe ("pulled": experts
per token);
the DRAM probe runs last, after the peak memory is read, so its buffer is not counted.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time

import numba
import psutil
import torch

from dslocal.bench.chart import write_chart
from dslocal.bench.dram import read_bandwidth
from dslocal.bench.moe_layer import machine
from dslocal.quant import synthetic
from dslocal.quant.gguf_file import GGUFError, open_gguf
from dslocal.runtime.config import read_config
from dslocal.runtime.load import RunConfig, default_model, load
from dslocal.runtime.sampling import Sampling

DEFAULT_LENGTHS = (128, 2048)
TUNE_GEN, TUNE_RUNS = 64, 8     # warm-up decode runs while the pull count is tuned (offload/pulltune.py)
# Plain prose repeated to any length: greedy decoding of a natural-looking prompt rarely stops at once.
PROMPT_TEXT = ("The river ran past the old mill and under the stone bridge, where the children of the "
               "village came every summer evening to watch the boats go by and to count the lights that "
               "came on, one after another, in the windows of the houses along the bank. ")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gguf", metavar="FILE", help="a deepseek2 GGUF (default: the bundled model, or --preset)")
    p.add_argument("--preset", choices=list(synthetic.PRESETS),
                   help="write a random-weight model of this shape once (in the temp folder) and measure it")
    p.add_argument("--type", default="q4_k_m", help="weight type of --preset (default q4_k_m)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="GPU budget, e.g. 12GiB (default: free memory less a margin)")
    p.add_argument("--cpu-only", action="store_true", help="everything on the CPU")
    p.add_argument("--gpu-experts", type=int, metavar="N", help="exactly N routed experts per MoE layer on the GPU")
    p.add_argument("--pull-experts", type=int, metavar="N",
                   help="of each token's CPU experts, N read by the GPU from host memory (default: tuned "
                        "while decoding)")
    p.add_argument("--prompt-lengths", metavar="N,N",
                   help="prompt lengths in tokens (default 128,2048, those that fit the model's context)")
    p.add_argument("--gen", type=int, default=128, help="greedy tokens to decode per run (default 128)")
    p.add_argument("--repeat", type=int, default=3, help="runs per prompt length; the median is reported (default 3)")
    p.add_argument("--threads", type=int, help="CPU threads for torch, the expert workers and the DRAM probe "
                                               "(default: torch's choice; the physical cores for the others)")
    p.add_argument("--device", default="auto",
                   help="cuda, cpu or auto (default: cuda when torch sees a GPU and --cpu-only is not given)")
    p.add_argument("--dtype", default="auto", help="f32, bf16 or f16 (default: f32 on cpu, bf16 on cuda)")
    p.add_argument("--reference", action="store_true", help="the all-torch reference path (every weight dequantized)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode steps launched from Python, not replayed")
    p.add_argument("--dram-gib", type=float, default=4.0, help="buffer of the DRAM probe in GiB (default 4)")
    p.add_argument("--json", metavar="FILE", help="results file (default: a new file in the temp folder)")
    p.add_argument("--chart", metavar="FILE", help="PNG chart (default: the --json path with .png)")


def model_path(args: argparse.Namespace) -> str:
    """The file to measure: --gguf, a synthetic --preset model (written once), or the bundled model."""
    if args.gguf and args.preset:
        raise ValueError("give --gguf or --preset, not both")
    if args.gguf:
        return args.gguf
    if args.preset is None:
        return default_model()
    path = os.path.join(tempfile.gettempdir(), f"dslocal-bench-{args.preset}-{args.type}.gguf")
    if not os.path.exists(path):
        # written under another name first, so an interrupted build is never taken for a finished file
        synthetic.build(path + ".part", synthetic.preset(args.preset), args.type)
        os.replace(path + ".part", path)
    return path


def prompt_lengths(text: str | None, gen: int, context: int, log=sys.stderr) -> list[int]:
    """The lengths to run: those asked for (each must fit the context with gen), or the defaults that fit."""
    if text is None:
        fits = [n for n in DEFAULT_LENGTHS if n + gen <= context]
        for n in DEFAULT_LENGTHS:
            if n not in fits:
                print(f"bench: leaving out the default {n}-token prompt: with --gen {gen} it needs {n + gen} "
                      f"tokens of context and the model holds {context}", file=log)
        if fits:
            return fits
        lengths = [max(1, context - gen)]
        print(f"bench: using a {lengths[0]}-token prompt instead, the longest that fits", file=log)
    else:
        try:
            lengths = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--prompt-lengths must be whole numbers separated by commas, not {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError("--prompt-lengths must list at least one length of 1 token or more")
    for n in lengths:
        if n + gen > context:
            raise ValueError(f"a {n}-token prompt with --gen {gen} needs {n + gen} tokens of context but the model "
                             f"holds {context}; choose shorter --prompt-lengths or a smaller --gen")
    return lengths


def model_context(path: str) -> int:
    """The model's context length (llama.context_length), read before the slow load."""
    with open_gguf(path) as f:
        try:
            return read_config(f).context_length
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from None


def prompt_ids(tokenizer, n: int) -> list[int]:
    """n token ids: BOS if the model wants one, then PROMPT_TEXT's tokens repeated."""
    body = tokenizer.encode(PROMPT_TEXT, add_bos=False)
    ids = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    while len(ids) < n:
        ids += body
    return ids[:n]


def _generate(engine, prompt: list[int], max_tokens: int):
    """Run Engine.generate greedily to the end; its last piece (finish and stats)."""
    for piece in engine.generate(prompt, Sampling(temperature=0.0, max_tokens=max_tokens)):
        last = piece
    return last


def one_run(engine, prompt: list[int], gen: int) -> dict:
    """Prefill prompt from an empty cache up to its first token, then decode gen greedy tokens.

    The first call stops at the first token: its wall time is the time to first token, whatever the
    tokenizer holds back. Decoding then asks again for the same prompt: the prefix cache holds all of it but
    the last token, so every token sampled costs one single-token forward. As in llama-bench, an end-of-text
    token does not end the run: it is fed back as the next token and decoding goes on.
    """
    engine.reset()
    t0 = time.perf_counter()
    first = _generate(engine, prompt, 1).stats
    ttft = time.perf_counter() - t0
    tok = engine.tokenizer
    sampled, eots, seq, steps_recomputed = 0, 0, list(prompt), []
    t0 = time.perf_counter()
    while sampled < gen:
        last = _generate(engine, seq, gen - sampled)
        steps_recomputed.append(last.stats.prefilled_tokens)
        sampled += last.stats.generated_tokens + (last.finish == "eos")
        if last.finish != "eos":
            break
        eots += 1
        seq = engine.cached + [tok.eos_id if tok.eos_id in tok.eot_ids else min(tok.eot_ids)]
    decode_s = time.perf_counter() - t0
    return {"ttft_s": ttft, "prefill_s": first.prefill_seconds, "prefilled_tokens": first.prefilled_tokens,
            "prefill_tokens_per_s": first.prefill_tps, "decode_tokens": sampled, "decode_s": decode_s,
            "decode_tokens_per_s": sampled / decode_s, "end_of_text_fed_back": eots,
            "decode_prefilled_tokens": steps_recomputed}


def summarize(n: int, runs: list[dict]) -> dict:
    """Medians over the runs of one prompt length."""
    med = lambda key: statistics.median(r[key] for r in runs)   # noqa: E731
    return {"prompt_tokens": n, "ttft_s": med("ttft_s"), "prefill_s": med("prefill_s"),
            "prefill_tokens_per_s": n / med("prefill_s"), "decode_tokens": min(r["decode_tokens"] for r in runs),
            "decode_tokens_per_s": med("decode_tokens_per_s"), "runs": runs}


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark in bytes."""
    if sys.platform == "win32":
        return psutil.Process().memory_info().peak_wset
    import resource
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else 1024 * maxrss   # getrusage(2): KiB on Linux, bytes on macOS


def measure(path: str, run: RunConfig, lengths: list[int], gen: int, repeat: int, log=sys.stderr) -> dict:
    """Load the model, warm up, time every prompt length; the model is freed when this returns."""
    loaded = load(path, run, log=log)
    engine = loaded.engine
    warm_t0 = time.perf_counter()
    one_run(engine, prompt_ids(engine.tokenizer, min(lengths)), min(2, gen))
    tuner = getattr(getattr(engine.decode_step, "graphs", None), "tuner", None)
    for _ in range(TUNE_RUNS):     # the pull count is tuned while decoding: settled before the timed runs
        if tuner is None or tuner.done:
            break
        one_run(engine, prompt_ids(engine.tokenizer, min(lengths)), TUNE_GEN)
    warmup_s = time.perf_counter() - warm_t0
    rows = []
    for n in lengths:
        prompt = prompt_ids(engine.tokenizer, n)
        runs = []
        for i in range(repeat):
            runs.append(one_run(engine, prompt, gen))
            print(f"bench: {n}-token prompt, run {i + 1}/{repeat}: prefill {runs[-1]['prefill_tokens_per_s']:.1f} "
                  f"tok/s, decode {runs[-1]['decode_tokens_per_s']:.1f} tok/s", file=log, flush=True)
        rows.append(summarize(n, runs))
    p = loaded.placement
    cuda = run.torch_device().startswith("cuda")
    pull = next((b.ffn.pull for b in engine.model.layers if getattr(b.ffn, "pull", None) is not None), None)
    pulled = 0 if pull is None else pull.n
    return {
        "model": {"file": os.path.abspath(path), "name": loaded.name, "layers": loaded.cfg.n_layer,
                  "experts": loaded.cfg.n_expert, "experts_used": loaded.cfg.n_expert_used,
                  "context": engine.context_length},
        "load_s": loaded.load_seconds, "warmup_s": warmup_s,
        "placement": None if p is None else {
            "gpu_bytes": p.gpu_bytes, "cpu_bytes": p.cpu_bytes, "budget_bytes": p.budget_bytes,
            "cpu_expert_bytes_per_token": p.cpu_expert_bytes_per_token, "note": p.note,
            "pulled_experts_per_token": pulled, "pull_tuning": None if tuner is None else tuner.summary()},
        "peak_rss_GiB": peak_rss_bytes() / 2**30,
        "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "lengths": rows,
    }


def add_bandwidth(results: dict) -> None:
    """Decode's routed-expert GB/s from host memory and its fraction of the measured DRAM read bandwidth,
    per length."""
    per_token = (results["placement"] or {}).get("cpu_expert_bytes_per_token")
    dram = results["dram"]["GB_per_s"]
    for row in results["lengths"]:
        gbs = None if per_token is None else row["decode_tokens_per_s"] * per_token / 1e9
        row["decode_GB_per_s"] = gbs
        row["decode_frac_dram"] = None if gbs is None else gbs / dram


def where(gpu_memory: str | None, placement: dict | None) -> str:
    """Which path ran and where the weights were, in a few words."""
    if placement is None:
        return "reference path"
    if placement["budget_bytes"] == 0:
        return "everything on the CPU"
    budget = f"GPU budget {placement['budget_bytes'] / 2**30:.1f} GiB" + ("" if gpu_memory else " (free memory)")
    return f"{budget}, {placement['gpu_bytes'] / 2**30:.1f} GiB used"


def format_table(results: dict) -> str:
    """The results as the lines printed on stdout."""
    s, m, dram = results["settings"], results["model"], results["dram"]
    p = results["placement"]
    cpu_mb = "-" if p is None else f"{p['cpu_expert_bytes_per_token'] / 1e6:.1f} MB"
    if p is not None and p.get("pulled_experts_per_token"):
        tuned = ", the count that decoded fastest" if (p.get("pull_tuning") or {}).get("done") else ""
        cpu_mb += f" (the GPU reads {p['pulled_experts_per_token']} of each token's CPU experts{tuned})"
    lines = [
        f"model  {m['name']} ({m['file']})",
        f"run    {s['device']} {s['dtype']}, {s['where']}, {s['threads']} threads, --gen {s['gen']}, "
        f"median of {s['repeat']}",
        f"load   {results['load_s']:.1f} s; warm-up {results['warmup_s']:.1f} s; expert bytes in host memory per "
        f"token {cpu_mb}",
        f"DRAM   {dram['GB_per_s']:.1f} GB/s read ({dram['threads']} threads, {dram['bytes'] / 2**30:.1f} GiB)",
        f"memory peak RSS {results['peak_rss_GiB']:.2f} GiB" + (
            "" if results["peak_gpu_GiB"] is None else f", peak GPU {results['peak_gpu_GiB']:.2f} GiB"),
        "",
        f"{'prompt':>7} {'TTFT s':>8} {'prefill tok/s':>14} {'gen':>5} {'decode tok/s':>13} {'host GB/s':>9} "
        f"{'% DRAM':>7}",
    ]
    for r in results["lengths"]:
        gbs = "-" if r["decode_GB_per_s"] is None else f"{r['decode_GB_per_s']:.2f}"
        pct = "-" if r["decode_frac_dram"] is None else f"{100 * r['decode_frac_dram']:.1f}%"
        lines.append(f"{r['prompt_tokens']:>7} {r['ttft_s']:>8.3f} {r['prefill_tokens_per_s']:>14.1f} "
                     f"{r['decode_tokens']:>5} {r['decode_tokens_per_s']:>13.1f} {gbs:>9} {pct:>7}")
    return "\n".join(lines)


def default_json_path(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    folder = os.path.join(tempfile.gettempdir(), "dslocal-bench")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json")


def run(args: argparse.Namespace, log=sys.stderr) -> int:
    """Measure, then print the table and JSON and write the JSON and chart files."""
    if args.gen < 1 or args.repeat < 1:
        raise ValueError("--gen and --repeat must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be at least 1")
    path = model_path(args)
    lengths = prompt_lengths(args.prompt_lengths, args.gen, model_context(path), log)
    threads = args.threads or psutil.cpu_count(logical=False) or 1
    context = max(16, max(lengths) + args.gen)   # load() refuses a cache under 16 tokens
    cfg = RunConfig(device=args.device, dtype=args.dtype, context=context, threads=args.threads,
                    gpu_memory=args.gpu_memory, cpu_only=args.cpu_only, gpu_experts=args.gpu_experts,
                    expert_threads=args.threads, reference=args.reference,
                    cuda_graphs=not args.no_cuda_graphs, pull_experts=args.pull_experts)
    results = measure(path, cfg, lengths, args.gen, args.repeat, log)
    gc.collect()   # the model's memory goes back before the probe allocates its buffer
    results["settings"] = {
        "device": cfg.torch_device(), "dtype": str(cfg.torch_dtype()).removeprefix("torch."),
        "where": where(args.gpu_memory, results["placement"]), "threads": threads, "gpu_memory": args.gpu_memory,
        "cpu_only": args.cpu_only, "gpu_experts": args.gpu_experts, "reference": args.reference,
        "cuda_graphs": not args.no_cuda_graphs, "pull_experts": args.pull_experts, "gen": args.gen,
        "repeat": args.repeat, "prompt_lengths": lengths}
    results["machine"] = machine(threads)
    results["dram"] = read_bandwidth(args.dram_gib, threads=min(threads, numba.config.NUMBA_NUM_THREADS))
    add_bandwidth(results)

    json_path = args.json or default_json_path(results["model"]["name"])
    chart_path = args.chart or os.path.splitext(json_path)[0] + ".png"
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    write_chart(results, chart_path)
    print(format_table(results))
    print(json.dumps(results))
    print(f"\nresults: {json_path}\nchart:   {chart_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dslocal bench", description=" ".join(__doc__.split("\n\n")[0].split()))
    add_arguments(p)
    return run(p.parse_args(argv))
