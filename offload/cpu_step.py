"""A decode step of a model run on the CPU as a short list of compiled calls on fixed buffers.

    engine.decode_step = cpu_step(model, engine.cache)     # or None where the model is not laid out for it

The same computation as the model's forward pass for one token (runtime/model.py, with offload/hybrid.py's
BlockLinear, BlockAttention and OffloadedMoE in place), without the Python of its modules and the torch
operators between the compiled calls: for the V2-Lite-shaped file those were ~13 ms of a 42 ms step on the
GPU box (kernels/cpu/NOTES.md), ~50 module calls and small operators per layer. Here a layer is 11-17 calls,
each on numpy buffers made once (what offload/graphs.py's CUDA graph is to a step on the GPU):

    x += previous output; xn = RMSNorm(x)                          norm.add_rms (norm.rms_rows for the first)
    q (or q_a) and kv_a of xn: one call where their types match    linear.LinearCall on the GGUF blocks
    (q_a: its norm and q_b)                                        norm.rms_rows, LinearCall
    latent in the cache, the absorbed attention                    BlockAttention.run (kernels/cpu/mla.py)
    a = o Wo;  x += a; xn = RMSNorm(x)                             LinearCall, norm.add_rms
    dense FFN or shared experts: gate and up, swiglu, down         LinearCall x 2, act.swiglu
    MoE: router logits (its F32 rows), route, the routed experts   LinearCall, router.route, moe.LayerCall

and at the end the final norm and the head. Float32 throughout: it runs where the latent cache is float32,
as MLA.cpu_decode does. Where activations are rounded to 8 or 11 bits for the products, a value an ulp apart
(the router's products and SwiGLU's exp are not torch's) can round a quantum apart, so the logits differ from
the module path's by up to ~1e-3 relative, and for F32 files by float rounding (tests/offload/test_cpu_step.py).
The routing counts that offload/hotness.py keeps are kept here too.
On the GPU box, V2-Lite-shaped Q4_K_M file: 1.42-1.68x the module path's decode step (README, Measured).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dslocal.kernels.cpu import act, norm, router
from dslocal.kernels.cpu import moe as cpu_moe
from dslocal.kernels.cpu.linear import LinearCall
from dslocal.offload.hybrid import BlockAttention, BlockLinear, OffloadedMoE
from dslocal.quant.ggml import GGMLType
from dslocal.runtime.model import MLP, DeepSeek, LatentCache


class NotLaidOut(Exception):
    """A part of the model that a CPUStep cannot run (cpu_step then returns None)."""


def _norm(m) -> tuple[np.ndarray, float]:
    return m.weight.detach().numpy(), m.eps


class _Products:
    """Linear layers that read the same input row x (1, n_in): MLA's q (or q_a) and kv_a, an FFN's gate and up.
    Those of one GGML type are one LinearCall on a copy of their blocks laid end to end (the file's pages for
    them are then not read), so one parallel call instead of two: ~30 us a call on the GPU box whatever its
    bytes (kernels/cpu/NOTES.md). `outs` are (1, n_out) views of the outputs, in the layers' order."""

    def __init__(self, layers: list, x: np.ndarray):
        for layer in layers:
            if not isinstance(layer, BlockLinear):
                raise NotLaidOut(f"a linear layer without its blocks: {type(layer).__name__}")
        same = len({(m.ggml_type, m.blocks.shape[1]) for m in layers}) == 1
        groups = [layers] if same else [[m] for m in layers]
        self.calls, self.outs = [], []
        for group in groups:
            blocks = group[0].blocks if len(group) == 1 else np.concatenate([m.blocks for m in group])
            call = LinearCall(blocks[None], group[0].ggml_type, 1, x.shape[1], x,
                              np.empty((1, blocks.shape[0]), np.float32))
            self.calls.append(call)
            at = 0
            for m in group:
                self.outs.append(call.out[:, at:at + m.blocks.shape[0]])
                at += m.blocks.shape[0]

    def __call__(self) -> None:
        for call in self.calls:
            call()


def _call(layer, x: np.ndarray) -> LinearCall:
    """One row of x (1, n_in) times the layer's blocks, into a new (1, n_out) buffer: LinearCall.out."""
    return _Products([layer], x).calls[0]


class _FFN:
    """SwiGLU on the blocks: gate and up read xn, down writes out (1, D)."""

    def __init__(self, mlp: MLP, xn: np.ndarray):
        self.gate_up = _Products([mlp.w_gate, mlp.w_up], xn)
        self.down = _call(mlp.w_down, np.empty_like(self.gate_up.outs[0]))
        self.out = self.down.out

    def __call__(self) -> np.ndarray:
        self.gate_up()
        act.swiglu(*self.gate_up.outs, self.down.x)
        return self.down()


class _MoE:
    """The router, the routed experts (kernels/cpu/moe.py LayerCall, in the calling thread) and the shared
    experts; out (1, D) = shared + routed, summed in OffloadedMoE's order."""

    def __init__(self, moe: OffloadedMoE, xn: np.ndarray):
        r, cfg = moe.router, moe.router.cfg
        weight = r.weight.detach().float().contiguous().numpy()
        self.logits = LinearCall(weight.view(np.uint8)[None], GGMLType.F32, 1, xn.shape[1], xn,
                                 np.empty((1, weight.shape[0]), np.float32))
        self.bias = r.bias.detach().float().numpy()
        self.args = (cfg.gating, cfg.n_group, cfg.n_group_used, cfg.expert_weights_norm,
                     float(cfg.expert_weights_scale))
        self.ids = np.empty((1, cfg.n_expert_used), np.int64)
        self.w = np.empty((1, cfg.n_expert_used), np.float32)
        self.counts = moe.counts.numpy()                  # the module's buffer: hotness sees these steps too
        self.routed = cpu_moe.LayerCall(xn, self.ids, self.w, moe.experts)
        self.shared = _FFN(moe.shared, xn) if moe.shared is not None else None
        self.out = self.shared.out if self.shared is not None else self.routed.out

    def __call__(self) -> np.ndarray:
        router.route(self.logits(), self.bias, *self.args, self.ids, self.w, self.counts)
        routed = self.routed()
        if self.shared is None:
            return routed
        return np.add(self.shared(), routed, out=self.out)


class _Layer:
    def __init__(self, block, xn: np.ndarray, cache: LatentCache):
        a = block.attn
        if not isinstance(a.cpu_decode, BlockAttention):
            raise NotLaidOut("attention without BlockAttention")
        self.lora = not hasattr(a, "wq")
        self.inputs = _Products([a.wq_a if self.lora else a.wq, a.wkv_a], xn)     # q (or q_a) and kv
        if self.lora:
            self.q_norm = _norm(a.q_norm)
            self.q_b = _call(a.wq_b, np.empty_like(self.inputs.outs[0]))
        self.q_shape = (1, a.H, a.N + a.R)
        self.attention: BlockAttention = a.cpu_decode
        self.cache = cache.kv[block.layer, 0].numpy(), cache.pe[block.layer, 0].numpy()
        self.wo = _call(a.wo, np.empty((1, a.H * a.wv_b.shape[1]), np.float32))
        self.attn_norm, self.ffn_norm = _norm(block.attn_norm), _norm(block.ffn_norm)
        if isinstance(block.ffn, OffloadedMoE):
            if block.ffn.n_gpu or block.ffn.worker is not None:
                raise NotLaidOut("routed experts on a GPU or a worker thread")
            self.ffn = _MoE(block.ffn, xn)
        else:
            self.ffn = _FFN(block.ffn, xn)

    def q_kv(self) -> tuple[np.ndarray, np.ndarray]:
        """The input projections of xn: q (1, H, N + R), kv (1, C + R), contiguous."""
        self.inputs()
        q, kv = self.inputs.outs
        if self.lora:
            norm.rms_rows(q, *self.q_norm, self.q_b.x)
            q = self.q_b()
        return np.ascontiguousarray(q).reshape(self.q_shape), np.ascontiguousarray(kv)


class CPUStep:
    """Engine.decode_step (token, position) -> logits (V,) float32 for a model laid out by use_blocks on the
    CPU (offload/hybrid.py) over the engine's float32 latent cache; build it with cpu_step."""

    def __init__(self, model: DeepSeek, cache: LatentCache):
        D = model.cfg.hidden
        self.model, self.cache = model, cache
        self.x, self.xn = np.empty((1, D), np.float32), np.empty((1, D), np.float32)
        self.embed = model.embed.weight.detach().numpy()
        self.freq = model.rope_freq.detach().cpu().double().numpy()
        self.layers = [_Layer(b, self.xn, cache) for b in model.layers]
        self.norm = _norm(model.norm)
        self.head = _call(model.head, self.xn)

    def __call__(self, token: int, start: int) -> torch.Tensor:
        if start + 1 > self.cache.max_len:
            raise ValueError(f"{start + 1} tokens do not fit the cache of {self.cache.max_len}")
        x, xn = self.x, self.xn
        angle = (np.float64(start) * self.freq)[None]                       # as DeepSeek.rope
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        x[0] = self.embed[token]
        norm.rms_rows(x, *self.layers[0].attn_norm, xn)
        for i, layer in enumerate(self.layers):
            o = layer.attention.run(*layer.q_kv(), cos, sin, *layer.cache, start)          # (H, 1, Vh)
            layer.wo.x[...] = o.reshape(1, -1)
            norm.add_rms(x, layer.wo(), *layer.ffn_norm, xn)
            after = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.norm
            norm.add_rms(x, layer.ffn(), *after, xn)
        self.cache.length = start + 1
        return torch.from_numpy(self.head()[0].copy())


def cpu_step(model: DeepSeek, cache: LatentCache) -> CPUStep | None:
    """A CPUStep for the model, or None where some part of it is not laid out for one (then every step is
    the module path's forward pass): a latent cache other than float32 for one sequence on the CPU, weights
    other than float32, a linear layer without its blocks, routed experts on a GPU or a worker thread."""
    if cache.kv.dtype != torch.float32 or cache.kv.shape[1] != 1 or cache.kv.device.type != "cpu":
        return None
    if not isinstance(model.embed, nn.Embedding) or model.embed.weight.dtype != torch.float32:
        return None
    try:
        return CPUStep(model, cache)
    except NotLaidOut:
        return None
