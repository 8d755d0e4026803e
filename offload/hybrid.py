"""A model run by its placement: attention and shared experts on the GPU, routed experts split by the plan.

    placement = plan(ModelShape.from_gguf(f, cfg), hardware, budget)      # offload/planner.py
    model = load_offloaded(f, cfg, placement, "cuda", torch.bfloat16, ExpertWorker())

The result is the runtime's DeepSeek module (runtime/model.py) with each MoE layer's feed-forward replaced
by an OffloadedMoE; the Engine drives it like the reference model. Per MoE layer (DESIGN.md, "Data flow of
one decode step"):

    router on the GPU -> ids, weights (T, K)
    ids of CPU experts, x  --copy-->  CPU worker: Numba kernels on the GGUF blocks (kernels/cpu/moe.py)
    GPU meanwhile: shared experts + routed experts the plan put on the GPU (kernels/gpu/moe.py)
    CPU result --copy--> summed on the GPU

In a decode step replayed as a CUDA graph the GPU may also take some of the CPU's pairs itself, reading
those experts from host memory (`pulled`, kernels/gpu/pull.py). A pair (token, expert) is computed on
exactly one side: the other side sees its id as -1. The token
embedding and the output head live where the plan says; the latent cache is on the GPU. With the device
"cpu" the same code runs everything on the CPU (Numba for experts, and for a decode step's linear layers and
attention, which read their GGUF blocks: BlockLinear, BlockAttention, run by the engine's decode step as
offload/cpu_step.py lists them; torch for prompts): the CPU-only mode, and the way tests exercise every
placement without a GPU.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import numba
import numpy as np
import torch
from torch import nn

from dslocal.kernels.cpu import linear as cpu_linear
from dslocal.kernels.cpu import mla as cpu_mla
from dslocal.kernels.cpu import moe as cpu_moe
from dslocal.kernels.experts import ExpertTensors, from_gguf
from dslocal.offload.cpu_worker import ExpertWorker
from dslocal.offload.planner import Placement, blocks_on_gpu, gpu_bytes
from dslocal.offload.prefill import STREAM_MIN_TOKENS, ExpertStreamer
from dslocal.quant.ggml import GGMLType
from dslocal.quant.gguf_file import GGUFFile
from dslocal.runtime.config import ModelConfig
from dslocal.runtime.model import MLA, DeepSeek, LatentCache, Linear, MoE, RMSNorm, fused
from dslocal.runtime.weights import gguf_names, load_model

# A decode step's attention over ATTEND_CHUNKS_MIN positions or more reads the cache in chunks of at least
# ATTEND_CHUNK positions, one per thread (kernels/cpu/mla.py attend_chunks), not once per head (attend)
ATTEND_CHUNKS_MIN = 1024
ATTEND_CHUNK = 64
# On a CUDA device the linear layers of the types planner.BLOCK_TYPES names keep their GGUF blocks (False:
# dequantized to the model's dtype at load, as before kernels/gpu/linear.py; the planner counts blocks)
GPU_LINEAR_BLOCKS = True


class OnDevice(nn.Module):
    """A part of the model kept on another device than the rest (an embedding or head the plan left on
    the CPU): inputs are moved to it and its outputs back to the model's device."""

    def __init__(self, module: nn.Module, device: torch.device, out_device: torch.device):
        super().__init__()
        self.module, self.device, self.out_device = module.to(device), device, out_device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.device)).to(self.out_device)


class BlockLinear(nn.Module):
    """A linear layer of a model run on the CPU that reads its GGUF blocks for a decode step's few rows
    (kernels/cpu/linear.py: a Q4_K weight is 7x fewer bytes per token than its float32 copy) and keeps the
    float copy for longer inputs (prompts, where torch's matrix products on it are faster) and for autograd."""

    def __init__(self, dense: Linear, blocks: np.ndarray, ggml_type: GGMLType):
        super().__init__()
        if blocks.shape[0] != dense.out_features:
            raise ValueError(f"{blocks.shape[0]} rows of blocks for a layer of {dense.out_features} outputs")
        self.dense, self.blocks, self.ggml_type = dense, blocks, ggml_type
        self._one_row = None     # a cpu_linear.LinearCall for one row, made at the first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.device.type != "cpu" or not 0 < rows <= cpu_linear.MAX_ROWS or (x.requires_grad and
                                                                               torch.is_grad_enabled()):
            return self.dense(x)
        x_rows = x.detach().reshape(rows, -1).float().numpy()
        if rows == 1:
            if self._one_row is None:
                self._one_row = cpu_linear.LinearCall(self.blocks[None], self.ggml_type, 1, x.shape[-1])
            self._one_row.x[...] = x_rows
            y = self._one_row().copy()
        else:
            y = cpu_linear.linear(x_rows, self.blocks, self.ggml_type)
        return torch.from_numpy(y).to(x.dtype).view(*x.shape[:-1], -1)


class BlockAttention:
    """MLA's attention for a decode step of a model run on the CPU (runtime/model.py MLA.cpu_decode): the new
    tokens' latent into the cache, the absorbed products with attn_k_b / attn_v_b from their GGUF blocks, the
    attention over the cache, all in Numba (kernels/cpu/mla.py). A file with attn_kv_b instead (older
    conversions) has no rows to read for the key half: both products then read float32 copies."""

    def __init__(self, mla: MLA, k_b: tuple[np.ndarray, GGMLType] | None, v_b: tuple[np.ndarray, GGMLType] | None):
        """k_b, v_b: the blocks (H, C, row bytes) and (H, Vh, row bytes) and their type, or None for both."""
        if k_b is None or v_b is None:
            wk = mla.wk_b.detach().float().transpose(1, 2).contiguous().numpy()           # (H, C, N)
            wv = mla.wv_b.detach().float().contiguous().numpy()                            # (H, Vh, C)
            k_b, v_b = (wk.view(np.uint8), GGMLType.F32), (wv.view(np.uint8), GGMLType.F32)
        self.mla, self.k_b, self.v_b = mla, k_b, v_b
        self.norm_w = mla.kv_norm.weight.detach().float().numpy()
        self._calls = {}     # T -> the two products as cpu_linear.LinearCalls on fixed buffers

    def __call__(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache,
                 layer: int, start: int) -> torch.Tensor:
        """q (T, H, N + R), kv (T, C + R) of a sequence's new tokens at start.. -> the heads' outputs (T, H * Vh)
        float32, before the output projection; the cache (float32) gets their latent."""
        T = q.shape[0]
        q, kv = (np.ascontiguousarray(a.float().numpy()) for a in (q, kv))
        o = self.run(q, kv, cos.numpy(), sin.numpy(), cache.kv[layer, 0].numpy(), cache.pe[layer, 0].numpy(), start)
        return torch.from_numpy(o.transpose(1, 0, 2).reshape(T, -1))

    def run(self, q: np.ndarray, kv: np.ndarray, cos: np.ndarray, sin: np.ndarray, cache_kv: np.ndarray,
            cache_pe: np.ndarray, start: int) -> np.ndarray:
        """The same on numpy arrays (float32, C-contiguous): q (T, H, N + R), kv (T, C + R), cos / sin (T, R / 2),
        one layer's cache of the sequence (max_len, C) and (max_len, R) -> (H, T, Vh), a buffer of this object
        that the next call with T tokens overwrites."""
        m = self.mla
        T = q.shape[0]
        if T not in self._calls:
            self._calls[T] = (cpu_linear.LinearCall(*self.k_b, T, m.N), cpu_linear.LinearCall(*self.v_b, T, m.C),
                              np.empty((T, m.H, m.R), np.float32))
        k_call, v_call, q_pe = self._calls[T]
        q_nope, q_lat, o_lat = (a.reshape(m.H, T, -1) for a in (k_call.x, k_call.out, v_call.x))   # views
        cpu_mla.latent_in(q, kv, self.norm_w, m.kv_norm.eps, cos, sin, cache_kv, cache_pe, start, q_nope, q_pe)
        k_call()                                                                           # q_lat (H, T, C)
        n = min(numba.get_num_threads(), (start + T) // ATTEND_CHUNK)
        if start + T >= ATTEND_CHUNKS_MIN and n > 1:
            cpu_mla.attend_chunks(q_lat, q_pe, cache_kv, cache_pe, start, m.scale, *self._parts(n, m.H * T, m.C),
                                  o_lat)
        else:
            cpu_mla.attend(q_lat, q_pe, cache_kv, cache_pe, start, m.scale, o_lat)
        return v_call().reshape(m.H, T, -1)                                               # (H, T, Vh)

    # attend_chunks' partial results, (J, C) -> buffers: shared by the layers, which run one at a time in a
    # thread (V3's 128 heads take 4 MB per new token at 16 threads), and kept apart between threads
    _scratch = threading.local()

    @classmethod
    def _parts(cls, n: int, J: int, C: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        by_shape = cls._scratch.__dict__.setdefault("parts", {})
        parts = by_shape.get((J, C))
        if parts is None or parts[0].shape[0] < n:
            parts = by_shape[J, C] = (np.empty((n, J), np.float32), np.empty((n, J), np.float32),
                                      np.empty((n, J, C), np.float32))
        return tuple(a[:n] for a in parts)


def use_blocks(model: DeepSeek, f: GGUFFile, cfg: ModelConfig) -> int:
    """Give every linear layer of a model on the CPU its GGUF blocks (BlockLinear), the attention of each layer
    its decode step (BlockAttention), the norms theirs (kernels/cpu/norm.py); returns how many linear layers."""
    modules = dict(model.named_modules())
    n = 0
    for pname, gname in gguf_names(cfg).items():
        owner_name, _, attr = pname.rpartition(".")
        dense = modules.get(owner_name)
        if attr != "weight" or type(dense) is not Linear:
            continue
        if gname not in f.tensors and gname == "output.weight":
            gname = "token_embd.weight"                   # a head tied to the embedding
        if gname not in f.tensors:
            continue
        parent_name, _, child = owner_name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, BlockLinear(dense, f.raw(gname), f.tensors[gname].ggml_type))
        n += 1
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.cpu_kernel = True
    for i, block in enumerate(model.layers):
        k, v = f"blk.{i}.attn_k_b.weight", f"blk.{i}.attn_v_b.weight"
        if k in f.tensors and v in f.tensors:
            block.attn.cpu_decode = BlockAttention(block.attn, (f.raw(k), f.tensors[k].ggml_type),
                                                   (f.raw(v), f.tensors[v].ggml_type))
        else:
            block.attn.cpu_decode = BlockAttention(block.attn, None, None)
    return n


class OffloadedMoE(nn.Module):
    """DeepSeekMoE with its routed experts split between the GPU (GPUExperts, in their GGUF blocks where a
    GPU kernel exists) and the CPU (read by Numba threads from the memory-mapped file)."""

    def __init__(self, moe: MoE, experts: ExpertTensors, gpu_ids: Sequence[int], device: torch.device,
                 worker: ExpertWorker | None):
        """moe: the layer's module without routed weights (router, shared experts); experts: all E of them,
        zero-copy from the file; gpu_ids: those the plan put on the GPU; worker: the CPU thread to overlap
        with, or None to run the CPU experts in the calling thread."""
        super().__init__()
        E = experts.n_expert
        gpu_ids = sorted(int(e) for e in gpu_ids)
        self.router, self.shared, self.experts, self.worker = moe.router, moe.shared, experts, worker
        self.gpu_ids, self.n_gpu, self.n_cpu = frozenset(gpu_ids), len(gpu_ids), E - len(gpu_ids)
        self.expert_gpu_bytes = sum(          # one expert on the GPU, as the planner counts it
            gpu_bytes(t, rows * cols, a.nbytes // E) for a, t, rows, cols in (
                (experts.gate, experts.gate_type, experts.ffn, experts.hidden),
                (experts.up, experts.up_type, experts.ffn, experts.up_cols),
                (experts.down, experts.down_type, experts.hidden, experts.down_cols)))
        self.streamer: ExpertStreamer | None = None   # set by load_offloaded when long prompts stream
        self.stream_index = -1                          # this layer's index in the streamer
        self.graph_step = None   # set by offload/graphs.py while it runs or captures a decode step
        self.pulled = None       # kernels/gpu/pull.py PulledExperts: a decode step's share read by the GPU
        self.registration = None   # kernels/gpu/pull.py HostRegistration of the experts' pages, if any
        self._one_token = None     # (x, ids, weights) buffers and their LayerCall: see _cpu_experts
        slot = torch.full((E,), -1, dtype=torch.long)                     # expert id -> index in self.gpu
        slot[gpu_ids] = torch.arange(self.n_gpu)
        cpu_id = torch.arange(E)
        cpu_id[gpu_ids] = -1                                               # expert id -> itself, or -1
        self.register_buffer("gpu_slot", slot.to(device), persistent=False)
        self.register_buffer("cpu_id", cpu_id.to(device), persistent=False)
        # routing counts since load (E,): the hotness that offload/hotness.py stores for the next start
        self.register_buffer("counts", torch.zeros(E, dtype=torch.long, device=device), persistent=False)
        self.gpu = None
        if self.n_gpu:
            from dslocal.kernels.gpu.moe import GPUExperts, moe_ffn   # Triton: only when experts go there
            self.gpu = GPUExperts.from_experts(experts, gpu_ids, device)
            self._gpu_moe_ffn = moe_ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                            # (M, D)
        ids, w, cpu_ids = self._route(x)                                        # (M, K), on x's device
        stream = self.n_cpu and self.streamer is not None and x.shape[0] >= STREAM_MIN_TOKENS
        overlap = self.n_cpu and self.worker is not None and not stream
        if overlap and self.graph_step is not None:
            return self._forward_in_graph_step(x, ids, w, cpu_ids).view(shape)
        if overlap:
            self.worker.submit(x.float(), cpu_ids, w, self.experts)            # returns at once
        try:
            y = self._gpu_part(x, ids, w)
        except BaseException:           # Ctrl-C or an error: collect the CPU job so the next step can start
            if overlap:
                self.worker.wait()
            raise
        if stream:
            y += self.streamer.layer_experts(self.stream_index, x, cpu_ids, w)
        elif self.n_cpu:
            if self.worker is None:
                y_cpu = self._cpu_experts(x, cpu_ids, w)
            else:
                y_cpu = self.worker.wait()      # a reused pinned buffer: copied before the next submit
            y += y_cpu.to(y.device, non_blocking=True)
        return y.to(x.dtype).view(shape)

    def _cpu_experts(self, x: torch.Tensor, cpu_ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The CPU's experts in the calling thread, (M, D) float32 on the CPU. One token on the CPU (a decode
        step of a model run there) goes through a LayerCall kept on fixed buffers: no checks or scratch
        allocations per step; its result is overwritten by the next."""
        if x.shape[0] != 1 or x.device.type != "cpu":
            return cpu_moe.moe_ffn(x.float().cpu(), cpu_ids.cpu(), w.cpu(), self.experts)
        if self._one_token is None:      # numpy: torch buffers made in inference mode are read-only outside it
            buffers = (np.empty(x.shape, np.float32), np.empty(w.shape, np.int64), np.empty(w.shape, np.float32))
            self._one_token = buffers, cpu_moe.LayerCall(*buffers, self.experts)
        buffers, call = self._one_token
        for buffer, a in zip(buffers, (x.float(), cpu_ids, w.float())):
            buffer[...] = a.detach().numpy()
        return torch.from_numpy(call())

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (M, D) -> expert ids, weights and CPU ids (the id, or -1 for a GPU expert), each (M, K); the
        routing counts updated. On CUDA all but the logits matmul is one kernel (kernels/gpu/router.py)."""
        r = self.router
        if fused(x):
            from dslocal.kernels.gpu.router import route, router_logits
            cfg = r.cfg
            return route(router_logits(x, r.weight), r.bias, cfg.n_expert_used, cfg.gating, cfg.n_group,
                         cfg.n_group_used, cfg.expert_weights_norm, cfg.expert_weights_scale, self.cpu_id,
                         self.counts)
        ids, w = r(x)                       # Router.logits multiplies in float32
        self.counts.scatter_add_(0, ids.flatten(), torch.ones_like(ids.flatten()))
        return ids, w, self.cpu_id[ids]

    def _gpu_part(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Shared experts plus the routed experts kept on the GPU: (M, D) float32."""
        y = self.shared(x).float() if self.shared is not None else torch.zeros(x.shape, device=x.device)
        if self.gpu is not None:
            self._gpu_moe_ffn(x, self.gpu_slot[ids], w, self.gpu, out=y, accumulate=True)
        return y

    def _forward_in_graph_step(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                               cpu_ids: torch.Tensor) -> torch.Tensor:
        """The same layer as a decode step of offload/graphs.py runs it: the CPU experts' inputs handed
        over (as float32, converted by the send), the GPU's own experts computed meanwhile (and those it
        pulls from host memory), the CPU's result added when it is there."""
        self.graph_step.send(self, x, cpu_ids, w)
        y = self._gpu_part(x, ids, w)
        if self.pulled is not None:
            self.pulled(x, cpu_ids, w, out=y)
        return self.graph_step.receive(self, y, x.dtype)

    @property
    def pull(self):
        """kernels/gpu/pull.py PullCount: how many experts per token of a decode step the GPU reads from host
        memory instead of the CPU (shared by the layers), or None."""
        return None if self.pulled is None else self.pulled.count


def put_blocks(model: DeepSeek, f: GGUFFile, cfg: ModelConfig, names: frozenset[str], device: torch.device) -> None:
    """Give the linear layers whose weights load_model left out (names: their GGUF names) their GGUF blocks on
    the device, as kernels/gpu/linear.py BlockWeight."""
    from dslocal.kernels.gpu.linear import BlockWeight
    for pname, gname in gguf_names(cfg).items():
        if gname in names:
            linear = model.get_submodule(pname.rsplit(".", 1)[0])
            # copied out of the memory map first: pages of it may be registered with CUDA for the experts
            # (kernels/gpu/pull.py), and a copy from a range only partly registered fails
            rows = torch.from_numpy(np.array(f.raw(gname)))                  # uint8 (n_out, row_bytes)
            linear.weight = BlockWeight(rows, f.tensors[gname].ggml_type, linear.in_features, device)


def load_offloaded(f: GGUFFile, cfg: ModelConfig, placement: Placement, device: str | torch.device,
                   dtype: torch.dtype, worker: ExpertWorker | None, stream_prefill: bool = True) -> DeepSeek:
    """The model laid out as placement says, on `device` (a CUDA device, or "cpu" for everything on the CPU).

    Norms, routers, attn_k_b / attn_v_b and linear layers of types without GPU kernels are dequantized to
    dtype on the device; on a CUDA device the other linear layers (attention projections, shared experts,
    dense layers, the head) keep their GGUF blocks there (kernels/gpu/linear.py; planner.blocks_on_gpu);
    the embedding and the head go where the plan put them; routed experts stay in the file's blocks (CPU)
    or are copied to the device (GPU ids of each layer); on a CUDA device, with stream_prefill, long prompts
    bring the CPU experts to the GPU in units (offload/prefill.py); on the CPU, linear layers also keep
    their blocks for decode steps (BlockLinear). The file must stay open while the model is used: the CPU
    experts and blocks are views of its memory map.
    """
    gpu = torch.device(device)
    cpu = torch.device("cpu")
    head_on_gpu = placement.head.device == "gpu" or gpu.type == "cpu"
    in_blocks = blocks_on_gpu(cfg, f.tensors) if gpu.type == "cuda" and GPU_LINEAR_BLOCKS else frozenset()
    if not head_on_gpu:
        in_blocks -= {"output.weight"}                  # a head left on the CPU stays dense there
    model = load_model(f, cfg, dtype, cpu, like_llama_cpp=False, routed_experts=False, leave_out=in_blocks)
    tied = "output.weight" not in f.tensors
    for block in model.layers:
        block.to(gpu)
    model.norm.to(gpu)
    model.rope_freq = model.rope_freq.to(gpu)
    # a head tied to the embedding is one tensor in the file and in the plan (counted as the head)
    embed_on_gpu = head_on_gpu if tied else placement.embed.device == "gpu" or gpu.type == "cpu"
    model.head = model.head.to(gpu) if head_on_gpu else OnDevice(model.head, cpu, gpu)
    model.embed = model.embed.to(gpu) if embed_on_gpu else OnDevice(model.embed, cpu, gpu)
    if tied and head_on_gpu:
        model.head.weight = model.embed.weight          # one copy on the device, as in the file
    put_blocks(model, f, cfg, in_blocks, gpu)
    for i, block in enumerate(model.layers):
        if cfg.is_moe_layer(i):
            block.ffn = OffloadedMoE(block.ffn, from_gguf(f, i), placement.layers[i].gpu_experts, gpu, worker)
    if gpu.type == "cuda":
        model.merge_projections()
    if stream_prefill and gpu.type == "cuda":
        attach_streamer(model, gpu)
    if gpu.type == "cpu":
        use_blocks(model, f, cfg)
    return model.eval()


def attach_streamer(model: DeepSeek, device: torch.device) -> None:
    """Let long prompts stream the CPU experts to the GPU (offload/prefill.py); again after a re-placement."""
    moes = [b.ffn for b in model.layers if isinstance(b.ffn, OffloadedMoE) and b.ffn.n_cpu]
    if not moes:
        return
    streamer = ExpertStreamer(moes, device)
    for j, moe in enumerate(moes):
        moe.streamer, moe.stream_index = streamer, j


def routing_counts(model: DeepSeek) -> dict[int, list[int]]:
    """MoE layer -> tokens routed to each expert since load (E,), for offload/hotness.py."""
    return {i: block.ffn.counts.tolist() for i, block in enumerate(model.layers)
            if isinstance(block.ffn, OffloadedMoE)}
