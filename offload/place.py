"""From the user's placement flags to a placed model: budget, hotness, plan, load, calibration.

    model, placement = load_placed(path, f, cfg, Placing(...), log)

The GPU budget is --gpu-memory, or the GPU's free memory minus a margin. It must also hold what the weights
and cache do not: the activations of a prefill chunk (WORKSPACE). Expert hotness comes from offload/hotness.py;
a file seen for the first time, whose plan has room for routed experts on the GPU, is calibrated once on a
short text and its experts are then placed again by the counts.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

import torch

from dslocal.offload import hotness
from dslocal.offload.cpu_worker import ExpertWorker, in_passing_thread
from dslocal.offload.hybrid import OffloadedMoE, attach_streamer, load_offloaded, routing_counts
from dslocal.offload.prefill import UNIT_BYTES
from dslocal.offload.planner import Budget, Hardware, ModelShape, Placement, PlanError, format_plan, parse_size, plan
from dslocal.quant.gguf_file import GGUFFile
from dslocal.runtime.config import ModelConfig
from dslocal.runtime.model import DeepSeek, LatentCache
from dslocal.runtime.tokenizer import Tokenizer

GiB = 2**30
# GPU memory kept out of the plan: the activations of a prompt's piece of PREFILL_CHUNK tokens (with a group of
# dequantized experts, kernels/gpu/moe.py DEQUANT_BYTES) and torch's allocator slack (1.5 GiB), and the two
# units of experts a long prefill streams (offload/prefill.py). On the GPU box a piece of 4096 tokens peaked at
# 1.60 GiB above the loaded model for a V2-Lite-shaped file (0.73 GiB of it two units) and 2.22 GiB for the
# V3-shaped slice (1 GiB of units). With no --gpu-memory, a further MARGIN of the free memory is left to other
# programs.
WORKSPACE = 3 * GiB // 2 + 2 * UNIT_BYTES
MARGIN = 0.05
CALIBRATION_TOKENS = 512
PULL_SHARE = 1 / 3     # default share of a token's experts a decode step's GPU reads from host memory


@dataclass(frozen=True)
class Placing:
    """The placement settings of a run (runtime.load.RunConfig carries them from the command line)."""
    device: str                     # "cpu" or a CUDA device
    dtype: torch.dtype              # of everything dequantized on the device
    context: int                    # tokens of latent cache
    gpu_memory: str | None = None   # --gpu-memory, e.g. "12GiB"
    cpu_only: bool = False          # --cpu-only
    gpu_experts: int | None = None  # --gpu-experts N
    expert_threads: int | None = None   # CPU expert threads (default: the physical cores)
    calibrate: bool = True          # measure hotness on a first start when experts can go to the GPU
    pull_experts: int = 0           # --pull-experts N: of each token's CPU experts, N read by the GPU
    pull_tune: bool = False         # start at pull_experts, then keep the fastest count (offload/pulltune.py)


def default_pull(n_used: int) -> int:
    """Where decode steps start when --pull-experts is not given (a run on a GPU with CUDA graphs, which
    then tunes the count): 2 of 6 experts, 3 of 8."""
    return max(1, round(n_used * PULL_SHARE)) if n_used > 1 else 0


def pull_slots(s: Placing, n_used: int) -> int:
    """Experts per token the pull's staging buffer holds: every count the tuning may try, or the fixed one."""
    return (n_used if s.pull_tune else s.pull_experts) if n_used > 1 else 0


def budget_for(s: Placing) -> tuple[Hardware, Budget]:
    """The hardware as measured and the budget the plan gets; a bad --gpu-memory raises ValueError."""
    if s.device == "cpu" or s.cpu_only:
        if s.gpu_memory is not None or s.gpu_experts is not None:
            flag = "--gpu-memory" if s.gpu_memory is not None else "--gpu-experts"
            raise ValueError(f"{flag} places weights on a GPU, but this run is CPU only "
                             f"({'--cpu-only' if s.cpu_only else 'no CUDA device'})")
        return Hardware(gpu_bytes_free=0), Budget(context=s.context, cpu_only=s.cpu_only)
    free, _ = torch.cuda.mem_get_info(torch.device(s.device))
    if s.gpu_memory is None:
        gpu_bytes = int(free * (1 - MARGIN)) - WORKSPACE
    else:
        gpu_bytes = parse_size(s.gpu_memory) - WORKSPACE
        if gpu_bytes <= 0:
            raise PlanError(f"--gpu-memory {s.gpu_memory} is less than the {WORKSPACE // 2**20} MiB of GPU "
                            "working memory a run needs besides its weights")
    return Hardware(gpu_bytes_free=free), Budget(gpu_bytes=max(gpu_bytes, 0), context=s.context,
                                                  gpu_experts=s.gpu_experts)


def load_placed(path: str, f: GGUFFile, cfg: ModelConfig, s: Placing,
                log=sys.stderr) -> tuple[DeepSeek, Placement]:
    """The model placed by the plan (printed to log); PlanError before anything loads if it cannot fit."""
    hardware, budget = budget_for(s)
    shape = ModelShape.from_gguf(f, cfg)
    staging = pull_slots(s, cfg.n_expert_used) * max((lp.expert.file for lp in shape.layers if lp.moe), default=0)
    if staging and budget.gpu_bytes:       # the pull's staging buffer is GPU memory the plan cannot use
        budget = dataclasses.replace(budget, gpu_bytes=max(budget.gpu_bytes - staging, 0))
    counts = hotness.for_model(path, cfg)
    placement = plan(shape, hardware, dataclasses.replace(budget, hotness=counts))
    worker = None
    if s.device != "cpu" and any(lp.n_expert > len(lp.gpu_experts) for lp in placement.layers):
        worker = ExpertWorker(s.expert_threads)
    # loading and calibrating run torch's parallel CPU operators: in a thread of their own, whose OpenMP
    # team then ends with it instead of slowing the expert worker's (offload/cpu_worker.py)
    model = in_passing_thread(load_offloaded, f, cfg, placement, s.device, s.dtype, worker)
    if worker is None and s.expert_threads:
        import numba
        numba.set_num_threads(s.expert_threads)          # the calling thread runs the CPU experts
    if counts is None and s.calibrate and any(lp.gpu_experts for lp in placement.layers):
        counts = in_passing_thread(_calibrate, model, f, cfg, s, path, log)
        placement = plan(shape, hardware, dataclasses.replace(budget, hotness=counts))
        in_passing_thread(replace_gpu_experts, model, placement)
    print(format_plan(placement), file=log)
    if (s.pull_experts or s.pull_tune) and worker is not None:
        try:
            n = attach_pull(model, s.pull_experts, torch.device(s.device), pull_slots(s, cfg.n_expert_used),
                            s.pull_tune)
            if n:
                pulled = min(1.0, s.pull_experts / cfg.n_expert_used) * placement.cpu_expert_bytes_per_token
                tuned = (f" to start with, then the count of 0 to {cfg.n_expert_used} that decodes fastest"
                         if s.pull_tune else "")
                print(f"pull     decode steps: the GPU reads {s.pull_experts} of each token's CPU experts from "
                      f"host memory{tuned} ({pulled / 1e6:.0f} of the "
                      f"{placement.cpu_expert_bytes_per_token / 1e6:.0f} MB a token reads there at most); long "
                      f"prompts copy them from there directly ({n / 2**30:.1f} GiB of expert pages registered "
                      f"with CUDA)", file=log)
        except RuntimeError as e:
            print(f"pull     off: {e}", file=log)
    return model, placement


def attach_pull(model: DeepSeek, n_pull: int, device: torch.device, slots: int | None = None,
                tune: bool = False) -> int:
    """Register the pages of every CPU expert with CUDA (read-only): decode steps then read n_pull of each
    token's CPU experts on the GPU, from host memory (kernels/gpu/pull.py, one staging buffer of `slots`
    experts, default n_pull, on the device; with tune, offload/pulltune.py may change the count up to
    slots), and long prompts copy their streamed experts by DMA straight from the file's map
    (offload/prefill.py). Returns the bytes registered; raises RuntimeError where CUDA refuses the
    registration (nothing is then attached)."""
    from dslocal.kernels.gpu.pull import PULL_TYPES, HostRegistration, PullCount, PulledExperts
    moes = [b.ffn for b in model.layers if isinstance(b.ffn, OffloadedMoE) and b.ffn.n_cpu and b.ffn.worker]
    if not moes:
        return 0
    registration = HostRegistration([a for m in moes for a in (m.experts.gate, m.experts.up, m.experts.down)])
    pulling = [m for m in moes if {m.experts.gate_type, m.experts.up_type, m.experts.down_type} <= PULL_TYPES]
    slots = slots or n_pull
    count = PullCount(n_pull, slots, device, tune) if slots else None
    staging = torch.empty(max((PulledExperts.staging_bytes(m.experts, slots) for m in pulling), default=0),
                          dtype=torch.uint8, device=device)
    for m in moes:
        m.registration = registration
        if m in pulling and count is not None:
            m.pulled = PulledExperts(m.experts, count, staging, registration)
    return registration.nbytes


def replace_gpu_experts(model: DeepSeek, placement: Placement) -> None:
    """Move each MoE layer's GPU experts to those the new placement names (weights stay where they were
    otherwise)."""
    streaming, device = False, None
    for lp, block in zip(placement.layers, model.layers):
        ffn = block.ffn
        if isinstance(ffn, OffloadedMoE):
            device, streaming = ffn.counts.device, streaming or ffn.streamer is not None
            ffn.gpu = None                                                        # free before copying again
            new = OffloadedMoE(ffn, ffn.experts, lp.gpu_experts, device, ffn.worker)
            new.counts.copy_(ffn.counts)
            block.ffn = new
    if streaming:
        attach_streamer(model, torch.device(device))


@torch.inference_mode()
def _calibrate(model: DeepSeek, f: GGUFFile, cfg: ModelConfig, s: Placing, path: str, log) -> dict:
    """Route CALIBRATION_TEXT through the model, store the counts for this file, and return them."""
    t0 = time.perf_counter()
    tokens = Tokenizer.from_gguf(f).encode(hotness.CALIBRATION_TEXT)[:min(CALIBRATION_TOKENS, s.context)]
    device = torch.device(s.device)
    cache = LatentCache(cfg, 1, len(tokens), s.dtype, device)
    model.hidden(torch.tensor([tokens], device=device), cache, 0)
    counts = routing_counts(model)
    where = hotness.save(path, counts, merge=False)
    print(f"hotness  measured on {len(tokens)} calibration tokens in {time.perf_counter() - t0:.1f} s; "
          f"kept in {where}", file=log)
    return counts


def decode_graphs(model: DeepSeek, cache, device: str, log=sys.stderr):
    """Engine.decode_step replaying CUDA graphs (offload/graphs.py), or None where a step cannot be
    captured: an embedding or head the plan left on the CPU is a host copy in the middle of the step."""
    from dslocal.offload.graphs import GraphedDecoder
    from dslocal.offload.hybrid import OnDevice
    if isinstance(model.embed, OnDevice) or isinstance(model.head, OnDevice):
        print("dslocal: decode steps run without CUDA graphs (the plan keeps the embedding or head on the CPU)",
              file=log)
        return None
    workers = {b.ffn.worker for b in model.layers if isinstance(b.ffn, OffloadedMoE)} - {None}
    return GraphedDecoder(model, cache, next(iter(workers), None), device, log)
