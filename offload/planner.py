"""The placement planner: which weights live on the GPU and which on the CPU, decided before loading.

    shape = ModelShape.from_gguf(f, cfg)                       # bytes of each part, from the tensor table
    placement = plan(shape, Hardware(gpu_bytes_free=free), Budget(gpu_bytes=parse_size("12GiB")))
    print(format_plan(placement))

plan() is pure: no I/O, no device probing; the caller measures the hardware and picks the budget.
GPU memory goes by arithmetic intensity (DESIGN.md, "Placement planner"), highest first:

1. the minimum, which must fit or the plan is refused with PlanError: MLA attention with the layer norms,
   its latent KV cache for the requested context, shared experts, dense leading layers and routers;
2. the output head (output.weight + output_norm), read in full by every token;
3. the token embedding. It is not part of the minimum: a token needs one row of it, which the CPU looks up
   as cheaply as the GPU, so it only gets memory that the head did not need;
4. routed experts, hottest first across all layers, until the budget is used.

Items 2-4 form one ranked list and the GPU takes its longest prefix that fits. Skipping an item that does
not fit to take a smaller later one would use a few more bytes, but then a larger budget could push an
earlier item out again; a prefix guarantees that more budget never moves anything to the CPU.

GPU bytes: weights in Q4_K, Q6_K, Q8_0 and Q5_0 have GPU kernels and keep their GGUF size there: routed
experts (kernels/gpu/moe.py) as do F16 and BF16 ones, and the linear layers' matrices (attention
projections, shared experts, dense layers, head: kernels/gpu/linear.py). Every other weight is dequantized
at load: 2 bytes per value (bf16; routed experts of other types, the embedding, attn_k_b / attn_v_b,
linear layers of other types), 4 for the vectors and routers kept in fp32 (offload/hybrid.py). The CPU
always holds the GGUF bytes.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dslocal.quant.ggml import GGMLType
from dslocal.quant.gguf_file import GGUFFile, TensorInfo
from dslocal.runtime.config import ModelConfig, tensor_specs

T = GGMLType
KEEP_ON_GPU = frozenset({T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_K, T.Q6_K, T.Q5_0})
KV_BYTES_PER_VALUE = 2   # the latent cache is f16 / bf16


class PlanError(ValueError):
    """A placement that cannot work (budget too small, bad override); raised before anything loads."""


def gpu_bytes(ggml_type: GGMLType, n_values: int, nbytes: int) -> int:
    """Bytes of a routed expert tensor on the GPU: its GGUF size for types with GPU kernels, else bf16."""
    return nbytes if ggml_type in KEEP_ON_GPU else 2 * n_values


BLOCK_TYPES = KEEP_ON_GPU - {T.F32, T.F16, T.BF16}   # types the GPU computes on as GGUF blocks


def linear_in_blocks(part: str, n_dims: int, ggml_type: GGMLType) -> bool:
    """Whether the GPU keeps a tensor of tensor_specs' `part` in its GGUF blocks as a linear layer's matrix
    (kernels/gpu/linear.py): attention projections (not attn_k_b / attn_v_b, 3-D), shared experts, dense
    FFN and head, of a type with kernels."""
    return part in ("attn", "shared", "dense", "head") and n_dims == 2 and ggml_type in BLOCK_TYPES


def blocks_on_gpu(cfg: ModelConfig, tensors: Mapping[str, TensorInfo]) -> frozenset[str]:
    """The GGUF names of the linear layers' matrices that linear_in_blocks keeps in blocks."""
    return frozenset(s.name for s in tensor_specs(cfg) if s.name in tensors and
                     linear_in_blocks(s.part, len(tensors[s.name].shape), tensors[s.name].ggml_type))


def dense_gpu_bytes(name: str, part: str, n_dims: int, n_values: int, ggml_type: GGMLType, nbytes: int) -> int:
    """Bytes of any other tensor on the GPU: GGUF size for a linear layer kept in blocks, else dequantized to
    bf16, or fp32 for norms, biases and routers."""
    if linear_in_blocks(part, n_dims, ggml_type):
        return nbytes
    fp32 = n_dims == 1 or name.endswith("ffn_gate_inp.weight")
    return (4 if fp32 else 2) * n_values


@dataclass(frozen=True)
class Size:
    file: int   # bytes as stored in the GGUF: what the CPU holds and reads
    gpu: int    # bytes on the GPU (gpu_bytes)

    def __add__(self, other: Size) -> Size:
        return Size(self.file + other.file, self.gpu + other.gpu)


ZERO = Size(0, 0)


@dataclass(frozen=True)
class LayerShape:
    attn: Size      # attention tensors and the layer's norms
    router: Size    # ffn_gate_inp (+ exp_probs_b); ZERO in dense layers
    shared: Size    # the shared experts' gate + up + down
    dense: Size     # the dense FFN of a leading layer; ZERO in MoE layers
    expert: Size    # ONE routed expert: gate + up + down (stacked tensor bytes // n_expert)
    moe: bool


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model: the bytes of each part. MTP layers are left out (plain
    decoding does not run them)."""
    layers: tuple[LayerShape, ...]
    embed: Size               # token_embd (ZERO when the head is tied to it: counted once, as the head)
    head: Size                # output.weight + output_norm
    n_expert: int             # E
    n_expert_used: int        # K
    kv_bytes_per_token: int   # latent cache: (kv_lora_rank + qk_rope_dim) x n_layer x 2

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: Mapping[str, TensorInfo]) -> ModelShape:
        """Sizes from a tensor table (name -> TensorInfo) already checked against cfg (check_tensors)."""
        parts: dict[tuple[int, str], Size] = defaultdict(lambda: ZERO)   # (layer or -1, part) -> bytes
        for spec in tensor_specs(cfg):
            t = tensors.get(spec.name)
            if t is None or spec.part == "mtp":
                continue
            layer = int(spec.name.split(".")[1]) if spec.name.startswith("blk.") else -1
            part, n_values, nbytes = spec.part, t.n_values, t.nbytes
            if part == "routed":
                part, n_values, nbytes = "expert", n_values // cfg.n_expert, nbytes // cfg.n_expert
                on_gpu = gpu_bytes(t.ggml_type, n_values, nbytes)
            else:
                on_gpu = dense_gpu_bytes(spec.name, part, len(t.shape), n_values, t.ggml_type, nbytes)
            if part == "norm":
                part = "attn" if layer >= 0 else "head"   # output_norm goes with the head
            parts[layer, part] += Size(nbytes, on_gpu)
        if "output.weight" not in tensors:   # tied head: token_embd serves both, counted once
            parts[-1, "head"] += parts.pop((-1, "embed"), ZERO)
        layers = tuple(LayerShape(*(parts[i, p] for p in ("attn", "router", "shared", "dense", "expert")),
                                  moe=cfg.is_moe_layer(i)) for i in range(cfg.n_layer))
        return cls(layers, parts[-1, "embed"], parts[-1, "head"], cfg.n_expert, cfg.n_expert_used,
                   (cfg.kv_lora_rank + cfg.qk_rope_dim) * cfg.n_layer * KV_BYTES_PER_VALUE)

    @classmethod
    def from_gguf(cls, f: GGUFFile, cfg: ModelConfig) -> ModelShape:
        return cls.from_tensors(cfg, f.tensors)


@dataclass(frozen=True)
class Hardware:
    gpu_bytes_free: int | None = None   # 0: no GPU; None: not measured (`dslocal info` plans for a budget)
    cpu_threads: int | None = None      # informational
    ram_bytes: int | None = None        # informational


@dataclass(frozen=True)
class Budget:
    gpu_bytes: int = 0                  # --gpu-memory; the caller's default is free memory minus a margin
    context: int = 4096                 # tokens of KV cache to hold
    cpu_only: bool = False              # --cpu-only: everything on the CPU
    gpu_experts: int | None = None      # --gpu-experts N: exactly N routed experts per MoE layer on the GPU
    hotness: Mapping[int, Sequence[float]] | None = None   # MoE layer -> routing count per expert (E,)


@dataclass(frozen=True)
class Part:
    device: str   # "gpu" | "cpu"
    bytes: int    # on that device (0: the layer has no such part)


@dataclass(frozen=True)
class LayerPlacement:
    index: int
    attn: Part                  # attention + norms
    kv_cache: Part              # this layer's latent cache for the context
    router: Part
    shared: Part
    dense: Part
    gpu_experts: tuple[int, ...]   # routed expert ids on the GPU, sorted; the rest are on the CPU
    n_expert: int               # 0 in dense layers
    expert_gpu_bytes: int       # all of this layer's GPU experts
    expert_cpu_bytes: int       # all of this layer's CPU experts


@dataclass(frozen=True)
class Placement:
    layers: tuple[LayerPlacement, ...]
    embed: Part
    head: Part
    context: int
    budget_bytes: int                   # 0 when everything is on the CPU
    gpu_bytes: int                      # weights + KV cache on the GPU
    cpu_bytes: int                      # weights (+ KV cache when CPU-only) on the CPU
    cpu_expert_bytes_per_token: float   # expected routed-expert bytes the CPU reads per decoded token
    cpu_other_bytes_per_token: int      # other CPU-resident weights read per token (embedding rows: ~0)
    ranking: str                        # how experts were ranked for the GPU
    note: str                           # why the plan looks as it does, one line

    @property
    def cpu_bytes_per_token(self) -> float:
        return self.cpu_expert_bytes_per_token + self.cpu_other_bytes_per_token


def _shares(model: ModelShape, hotness: Mapping[int, Sequence[float]] | None) -> dict[int, np.ndarray]:
    """Per MoE layer the share of routing mass of each expert (E,), summing to 1; uniform without counts."""
    E = model.n_expert
    shares = {}
    for i, layer in enumerate(model.layers):
        if not layer.moe:
            continue
        if hotness is None:
            shares[i] = np.full(E, 1.0 / E)
            continue
        if i not in hotness:
            raise PlanError(f"the expert hotness has no routing counts for MoE layer {i}")
        counts = np.asarray(hotness[i], dtype=np.float64)
        if counts.shape != (E,) or (counts < 0).any() or not np.isfinite(counts).all():
            raise PlanError(f"the expert hotness of layer {i} must be {E} non-negative counts, "
                            f"not an array of shape {counts.shape}")
        total = counts.sum()
        shares[i] = counts / total if total > 0 else np.full(E, 1.0 / E)
    return shares


def _ranked(shares: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """(layer, expert) hottest first across layers; ties (all of them without hotness) by expert id, then
    layer, so equal experts spread evenly over the layers."""
    return sorted(((i, e) for i, s in shares.items() for e in range(len(s))),
                  key=lambda le: (-shares[le[0]][le[1]], le[1], le[0]))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _minimum(model: ModelShape, context: int) -> int:
    return model.kv_bytes_per_token * context + sum(
        layer.attn.gpu + layer.router.gpu + layer.shared.gpu + layer.dense.gpu for layer in model.layers)


def plan(model: ModelShape, hardware: Hardware, budget: Budget) -> Placement:
    """Where every part of the model lives, or PlanError when the budget cannot hold the minimum."""
    if budget.context <= 0:
        raise PlanError(f"the context must be at least 1 token, not {budget.context}")
    if budget.gpu_experts is not None and not 0 <= budget.gpu_experts <= model.n_expert:
        raise PlanError(f"--gpu-experts {budget.gpu_experts} must be between 0 and the {model.n_expert} "
                        "routed experts per layer")
    shares = _shares(model, budget.hotness)
    ranked = _ranked(shares)
    ranking = ("measured hotness" if budget.hotness is not None
               else "expert id (no hotness measured: uniform routing assumed)")
    on_gpu: set[tuple[int, int]] = set()
    head_gpu = embed_gpu = base_gpu = False

    if budget.cpu_only or hardware.gpu_bytes_free == 0:
        note = "CPU only (--cpu-only)" if budget.cpu_only else "CPU only: no GPU"
        budget_bytes = 0
    else:
        budget_bytes = budget.gpu_bytes
        if hardware.gpu_bytes_free is not None and budget_bytes > hardware.gpu_bytes_free:
            raise PlanError(f"a GPU budget of {_gib(budget_bytes)} is more than the "
                            f"{_gib(hardware.gpu_bytes_free)} free on the GPU; lower --gpu-memory")
        base_gpu = True
        need = _minimum(model, budget.context)
        what = f"attention, its KV cache for {budget.context} tokens, shared experts, dense layers, routers"
        fixes = "raise --gpu-memory, lower --ctx"
        optional = [("head", model.head), ("embed", model.embed)]   # (what, size), in priority order
        if budget.gpu_experts is None:
            optional += [(le, model.layers[le[0]].expert) for le in ranked]
            note = "routed experts fill the GPU budget"
        else:
            per_layer = defaultdict(int)
            for i, e in ranked:   # the N hottest of each layer
                if per_layer[i] < budget.gpu_experts:
                    per_layer[i] += 1
                    on_gpu.add((i, e))
            need += sum(model.layers[i].expert.gpu for i, _ in on_gpu)
            what += f", {budget.gpu_experts} routed experts per layer (--gpu-experts {budget.gpu_experts})"
            fixes += ", lower --gpu-experts"
            note = f"{budget.gpu_experts} routed experts per layer on the GPU (--gpu-experts)"
        if need > budget_bytes:
            raise PlanError(f"a GPU budget of {_gib(budget_bytes)} cannot hold the {what}: it needs at least "
                            f"{_gib(need)} ({need} bytes); {fixes} or use --cpu-only")
        left = budget_bytes - need
        for what, size in optional:   # the longest prefix that fits (module docstring: why a prefix)
            if size.gpu > left:
                break
            left -= size.gpu
            if what == "head":
                head_gpu = True
            elif what == "embed":
                embed_gpu = True
            else:
                on_gpu.add(what)

    def part(size: Size, gpu: bool) -> Part:
        return Part("gpu", size.gpu) if gpu else Part("cpu", size.file)

    layers, expert_per_token, other_per_token = [], 0.0, 0
    for i, shape in enumerate(model.layers):
        ids = tuple(sorted(e for j, e in on_gpu if j == i))
        n_cpu = model.n_expert - len(ids) if shape.moe else 0
        kv_bytes = model.kv_bytes_per_token // model.n_layer * budget.context
        lp = LayerPlacement(
            index=i, attn=part(shape.attn, base_gpu), kv_cache=Part("gpu" if base_gpu else "cpu", kv_bytes),
            router=part(shape.router, base_gpu), shared=part(shape.shared, base_gpu),
            dense=part(shape.dense, base_gpu), gpu_experts=ids, n_expert=model.n_expert if shape.moe else 0,
            expert_gpu_bytes=len(ids) * shape.expert.gpu, expert_cpu_bytes=n_cpu * shape.expert.file)
        layers.append(lp)
        if shape.moe:
            cpu_mass = max(0.0, 1.0 - float(shares[i][list(ids)].sum())) if ids else 1.0
            expert_per_token += model.n_expert_used * shape.expert.file * cpu_mass
        if not base_gpu:
            other_per_token += shape.attn.file + shape.router.file + shape.shared.file + shape.dense.file
    head, embed = part(model.head, head_gpu), part(model.embed, embed_gpu)
    if not head_gpu:
        other_per_token += model.head.file

    everything = [p for lp in layers for p in (lp.attn, lp.kv_cache, lp.router, lp.shared, lp.dense)]
    everything += [head, embed]
    gpu_total = sum(p.bytes for p in everything if p.device == "gpu") + sum(lp.expert_gpu_bytes for lp in layers)
    cpu_total = sum(p.bytes for p in everything if p.device == "cpu") + sum(lp.expert_cpu_bytes for lp in layers)
    return Placement(tuple(layers), embed, head, budget.context, budget_bytes, gpu_total, cpu_total,
                     expert_per_token, other_per_token, ranking, note)


def _mb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _where(name: str, p: Part) -> str:
    return f"{name} {p.device.upper()} {_mb(p.bytes)}"


def format_plan(placement: Placement) -> str:
    """The plan as text: one line per layer, then the totals and what the CPU reads per token."""
    lines = [f"placement     {placement.note}; context {placement.context} tokens"]
    for lp in placement.layers:
        cols = [_where("attn", lp.attn) + f" + KV {_mb(lp.kv_cache.bytes)}"]
        if lp.dense.bytes:
            cols.append(_where("dense", lp.dense))
        if lp.shared.bytes:
            cols.append(_where("shared", lp.shared))
        if lp.n_expert:
            n_gpu = len(lp.gpu_experts)
            cols.append(f"experts {n_gpu}/{lp.n_expert} GPU {_mb(lp.expert_gpu_bytes)} "
                        f"({lp.n_expert - n_gpu} CPU, {_mb(lp.expert_cpu_bytes)})")
        lines.append(f"  layer {lp.index:<3} " + " | ".join(cols))
    lines.append(f"  {_where('head', placement.head)} | {_where('embeddings', placement.embed)}")
    budget = f" of a {_gib(placement.budget_bytes)} budget" if placement.budget_bytes else ""
    lines.append(f"GPU           {_gib(placement.gpu_bytes)}{budget}; CPU {_gib(placement.cpu_bytes)}")
    lines.append(f"experts       ranked by {placement.ranking}")
    lines.append(f"CPU reads     ~{_mb(placement.cpu_bytes_per_token)} per token (routed experts "
                 f"{_mb(placement.cpu_expert_bytes_per_token)}, other weights "
                 f"{_mb(placement.cpu_other_bytes_per_token)})")
    return "\n".join(lines)


_UNITS = {"": None, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """Bytes from a size such as 12GiB, 12GB, 500MiB or 12G.

    KiB/MiB/GiB/TiB are binary and KB/MB/GB/TB decimal, as the SI and IEC define them; a bare K/M/G/T is
    binary, as in llama.cpp's and nvidia-smi's usage; B is bytes. Case does not matter. A number needs a
    unit: `--gpu-memory 12` is far more likely a missing "GiB" than twelve bytes.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", text.lower())
    unit = _UNITS.get(m.group(2)) if m else None
    if unit is None:
        raise ValueError(f"cannot read {text!r} as a size; write a number and a unit, "
                         "e.g. 12GiB, 12GB, 500MiB or 12G")
    return int(float(m.group(1)) * unit)
