"""The DeepSeek-V2/V3 model in plain torch: MLA with a latent KV cache, DeepSeekMoE, dense leading layers.

One definition serves the reference forward pass and training. It computes what llama.cpp's deepseek2
graph computes (gguf-deepseek2.md section 4; src/models/deepseek2.cpp), in the absorbed MLA form.
Training adds, without changing the forward pass: multi-token prediction modules (DeepSeek-V3 section 2.2),
expert-load counting and the auxiliary-loss-free bias update, an optional sequence-wise balance loss
(section 2.1.2), and init_weights for fresh models.

Shapes: B batch, T new tokens, S cached + new tokens, D hidden, H heads, C kv_lora_rank, R rope dim,
N qk nope dim, Vh v head dim, Q q_lora_rank, E routed experts, K experts per token, F expert ffn, V vocab.
Routers and norms run in fp32 whatever the compute dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dslocal.runtime.config import GATING_SIGMOID, ModelConfig


def round_activations(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """x rounded the way llama.cpp's CPU matmuls round activations before a dot product with a weight.

    ggml converts the activations to the weight type's vec_dot_type (ggml-cpu type_traits_cpu): Q8_0 blocks
    of 32 for Q4_0..Q8_0 (Q8_1 holds the same values), Q8_K blocks of 256 for the K-quants, F16 or BF16 for
    those weights. kind None: no rounding (F32 weights, or a run that does not emulate llama.cpp).
    """
    if kind is None:
        return x
    if kind == "f16":
        return x.to(torch.float16).to(x.dtype)
    if kind == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    block = 32 if kind == "q8_0" else 256
    xb = x.float().unflatten(-1, (-1, block))                                   # (..., n_blocks, block)
    amax = xb.abs().amax(-1, keepdim=True)
    if kind == "q8_0":
        # quantize_row_q8_0 (x86): q = round(x * 127 / amax), d = amax / 127 stored as fp16
        q = torch.round(xb * torch.where(amax > 0, 127.0 / amax, 0.0))
        d = (amax / 127.0).to(torch.float16).float()
    else:
        # quantize_row_q8_K_ref: the scale comes from the signed value of largest magnitude, d stays fp32
        vmax = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
        iscale = torch.where(amax > 0, -127.0 / vmax, 0.0)
        q = torch.round(xb * iscale).clamp(max=127)
        d = torch.where(amax > 0, 1.0 / iscale, 0.0)
    return (q * d).flatten(-2).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear without bias whose input may be rounded as llama.cpp rounds it (see round_activations)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out, bias=False)
        self.act: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(round_activations(x, self.act), self.weight)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T: the one dispatch point for a linear layer's weight, a dense tensor (torch) or GGUF blocks on a
    GPU (kernels/gpu/linear.py BlockWeight, which a placed model's loader puts in place of the tensor)."""
    return Fn.linear(x, w) if isinstance(w, torch.Tensor) else w(x)


def merge_weights(a: Linear, b: Linear):
    """One (a.out + b.out, n_in) weight holding both, which become views of it (no extra memory), so one
    matrix product computes both outputs: a tensor, or blocks where both are blocks of one type. None, and
    nothing changed, where either input is rounded as llama.cpp rounds it or the two cannot share blocks.
    For inference on the model's final device (a later .to() would separate the views)."""
    if a.act is not None or b.act is not None:
        return None
    if isinstance(a.weight, torch.Tensor) != isinstance(b.weight, torch.Tensor):
        return None
    if not isinstance(a.weight, torch.Tensor):
        return a.weight.merged_with(b.weight)             # GGUF blocks (kernels/gpu/linear.py BlockWeight)
    w = torch.cat([a.weight.detach(), b.weight.detach()])
    a.weight = nn.Parameter(w[:a.out_features], requires_grad=False)
    b.weight = nn.Parameter(w[a.out_features:], requires_grad=False)
    return w


def fused(x: torch.Tensor) -> bool:
    """Inference on a CUDA device: the Triton kernels of kernels/gpu stand in for chains of small torch
    kernels (a decode step launches ~2x fewer kernels). Training, evaluation under autocast (mixed dtypes
    in one block) and CPU runs keep the torch code, which those kernels are tested against."""
    return x.is_cuda and not torch.is_grad_enabled() and not _autocast_on()


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cuda")
    except TypeError:           # torch before 2.4 takes no device and means CUDA
        return torch.is_autocast_enabled()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.cpu_kernel = False   # a model run on the CPU: decode steps through kernels/cpu/norm.py (use_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused(x):
            from dslocal.kernels.gpu.norm import rms_norm
            return rms_norm(x, self.weight, self.eps)[0]
        if self.cpu_kernel and not x.is_cuda and not torch.is_grad_enabled():
            from dslocal.kernels.cpu import norm
            if x.numel() <= norm.MAX_ROWS * x.shape[-1]:
                return norm.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Angular frequency of each rope pair, fp64 (R/2,), with YaRN's blend when the file asks for it.

    YaRN (ggml rope_yarn, HF yarn_find_correction_range): pairs faster than beta_fast=32 turns over the
    original context keep their frequency, pairs slower than beta_slow=1 are divided by the factor, and a
    linear ramp blends the pairs between.
    """
    R, base = cfg.qk_rope_dim, cfg.rope_base
    freq = base ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)
    if cfg.rope_scaling != "yarn" or cfg.rope_factor <= 1.0:
        return freq / (cfg.rope_factor if cfg.rope_scaling == "linear" else 1.0)

    def corr_dim(n_rot: float) -> float:
        return R * math.log(cfg.rope_orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(corr_dim(32.0)), 0)
    high = min(math.ceil(corr_dim(1.0)), R - 1)
    ramp = (torch.arange(R // 2, dtype=torch.float64) - low) / max(high - low, 0.001)
    keep = 1.0 - ramp.clamp(0.0, 1.0)   # 1: keep the original frequency, 0: interpolate
    return freq / cfg.rope_factor * (1.0 - keep) + freq * keep


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (2i, 2i+1) of the last axis (llama.cpp's NORM rope). x: (B, T, ..., R)."""
    xf = x.float().unflatten(-1, (-1, 2))                       # (..., R/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


# torch's fused attention kernels that a prompt on a GPU may take (MLA._attend_expanded). Not cuDNN's: it
# builds a plan for every new shape (37-670 ms at the first call on the GPU box), and each turn of a
# conversation brings a new (new tokens, cached tokens) shape.
PROMPT_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
EXPANDED_KV_BYTES = 256 * 2**20   # at most this much of a prompt's expanded keys and values at a time
DECODE_TOKENS = 4   # new tokens up to which a forward with a cache uses the decode attention kernels (GPU, CPU)


class LatentCache:
    """Per layer, the compressed KV latent c_kv (B, S, C) and the roped key k_pe (B, S, R); nothing else."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        self.max_len = max_len
        self.kv = torch.zeros(cfg.n_layer, batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(cfg.n_layer, batch, max_len, cfg.qk_rope_dim, dtype=dtype, device=device)
        self.length = 0   # tokens stored so far

    def nbytes(self) -> int:
        return self.kv.nbytes + self.pe.nbytes


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 paper section 2.1), computed in the absorbed form (but a prompt on
    a GPU: _attend_expanded)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, C, R, N, Vh = (cfg.hidden, cfg.n_head, cfg.kv_lora_rank, cfg.qk_rope_dim, cfg.qk_nope_dim,
                             cfg.v_head_dim)
        self.H, self.C, self.R, self.N = H, C, R, N
        self.scale = cfg.kq_scale
        if cfg.q_lora_rank:
            self.wq_a = Linear(D, cfg.q_lora_rank)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_eps)
            self.wq_b = Linear(cfg.q_lora_rank, H * (N + R))
        else:
            self.wq = Linear(D, H * (N + R))
        self.wkv_a = Linear(D, C + R)
        self.kv_norm = RMSNorm(C, cfg.rms_eps)
        self.wk_b = nn.Parameter(torch.empty(H, N, C))    # latent -> per-head nope key
        self.wv_b = nn.Parameter(torch.empty(H, Vh, C))   # latent -> per-head value
        self.wo = Linear(H * Vh, D)
        self.act_k_b: str | None = None   # activation rounding for the wk_b and wv_b products
        self.act_v_b: str | None = None
        self.w_in = None   # both input projections' weights in one (merge_input_projections)
        # a model run on the CPU: a few new tokens' attention from q and kv, as offload/hybrid.py BlockAttention
        self.cpu_decode = None

    def merge_input_projections(self) -> None:
        """Let one matrix product compute both projections of x (wq or wq_a, and wkv_a): their weights become
        two views of one (n_q + C + R, D) tensor, w_in. For inference on the model's final device (a later
        .to() would separate the views); kept apart where llama.cpp's activation rounding is emulated."""
        if self.w_in is None:
            self.w_in = merge_weights(self.wq if hasattr(self, "wq") else self.wq_a, self.wkv_a)

    def forward(self, x, cos, sin, cache: LatentCache | None, layer: int, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        first = self.wq if hasattr(self, "wq") else self.wq_a
        if self.w_in is not None:
            both = linear(x, self.w_in)
            q, kv = both[..., :first.out_features], both[..., first.out_features:]       # views
        else:
            q, kv = first(x), self.wkv_a(x)                                      # kv (B, T, C + R)
        if not hasattr(self, "wq"):
            q = self.wq_b(self.q_norm(q))
        q = q.view(B, T, self.H, self.N + self.R)
        if (self.cpu_decode is not None and cache is not None and B == 1 and T <= DECODE_TOKENS and
                isinstance(start, int) and cache.kv.dtype == torch.float32 and not x.is_cuda and
                not torch.is_grad_enabled()):
            return self.wo(self.cpu_decode(q[0], kv[0], cos, sin, cache, layer, start).to(x.dtype)[None])
        if cache is not None and fused(x) and T <= DECODE_TOKENS:
            return self._decode(x, q, kv, cos, sin, cache, layer, start)
        if cache is not None and fused(x):
            # rope of q_pe, and the latent normed, roped and written to the cache: one kernel each
            from dslocal.kernels.gpu.rope import latent_to_cache, rope
            q_nope, q_pe = q[..., :self.N], rope(q[..., self.N:], cos, sin)
            latent_to_cache(kv, self.kv_norm.weight, self.kv_norm.eps, cos, sin, cache.kv[layer], cache.pe[layer],
                            start)
            c_kv, k_pe = cache.kv[layer, :, :start + T], cache.pe[layer, :, :start + T]
            if self.act_k_b is None and self.act_v_b is None:
                return self.wo(self._attend_expanded(q_nope, q_pe, c_kv, k_pe, start).flatten(2).to(x.dtype))
        else:
            q_nope, q_pe = q[..., :self.N], apply_rope(q[..., self.N:], cos[:, None], sin[:, None])
            c_kv = self.kv_norm(kv[..., :self.C])                        # (B, T, C)
            k_pe = apply_rope(kv[..., self.C:], cos, sin)                # (B, T, R)
            if cache is not None and isinstance(start, torch.Tensor):
                # a decode step captured in a CUDA graph: the position lives on the device (offload/graphs.py)
                at = start + torch.arange(T, device=x.device)
                cache.kv[layer].index_copy_(1, at, c_kv.to(cache.kv.dtype))
                cache.pe[layer].index_copy_(1, at, k_pe.to(cache.pe.dtype))
            elif cache is not None:
                cache.kv[layer, :, start:start + T] = c_kv
                cache.pe[layer, :, start:start + T] = k_pe
                c_kv, k_pe = cache.kv[layer, :, :start + T], cache.pe[layer, :, :start + T]
        # Absorb wk_b into the query: q_nope . (wk_b c) = (wk_b^T q_nope) . c, so keys stay latent.
        q_nope = round_activations(q_nope, self.act_k_b)
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope.float(), self.wk_b.float())
        o_lat = round_activations(self._attend(q_lat, q_pe, c_kv, k_pe, start), self.act_v_b)
        o = torch.einsum("bthc,hvc->bthv", o_lat, self.wv_b.float())                   # (B, T, H, Vh)
        return self.wo(o.flatten(2).to(x.dtype))

    def _decode(self, x, q, kv, cos, sin, cache: LatentCache, layer: int, start) -> torch.Tensor:
        """A few new tokens on a GPU: the same arithmetic in Triton (kernels/gpu/absorb.py: the absorbed
        products, the ropes and the cache write; kernels/gpu/mla.py: flash-decoding over the latent cache).
        start may be a 0-d device tensor (a decode step replayed as a CUDA graph)."""
        from dslocal.kernels.gpu.absorb import absorb_o, decode_queries
        from dslocal.kernels.gpu.mla import mla_decode
        if self.act_k_b is not None:
            q = torch.cat([round_activations(q[..., :self.N], self.act_k_b), q[..., self.N:]], -1)
        q_lat, q_pe = decode_queries(q, self.wk_b, cos, sin, kv, self.kv_norm.weight, self.kv_norm.eps,
                                     cache.kv[layer], cache.pe[layer], start)
        o_lat = mla_decode(q_lat, q_pe, cache.kv[layer], cache.pe[layer], start, self.scale, length_add=q.shape[1])
        return self.wo(absorb_o(round_activations(o_lat, self.act_v_b), self.wv_b, x.dtype).flatten(2))

    def _attend_expanded(self, q_nope, q_pe, c_kv, k_pe, start: int) -> torch.Tensor:
        """A prompt's attention on a GPU: each head's keys and values expanded from the latents (the form the
        model trains in; for T new tokens over S cached ones, cheaper than the absorbed form's 576-wide keys
        once T is more than a few), then torch's fused attention, which never holds the (T, H, S) scores.
        q_nope (B, T, H, N), q_pe (B, T, H, R), c_kv (B, S, C), k_pe (B, S, R) -> (B, T, H, Vh) in q's dtype."""
        B, T, H, _ = q_nope.shape
        S, dt, Vh = c_kv.shape[1], q_nope.dtype, self.wv_b.shape[1]
        c_kv, q_pe, k_pe = c_kv.to(dt), q_pe.to(dt), k_pe.to(dt)
        seen = None                              # new token t sees cached positions up to start + t
        if start:
            at = torch.arange(S, device=c_kv.device)
            seen = at[None, :] <= at[start:start + T, None]
        o = torch.empty(B, T, H, Vh, dtype=dt, device=c_kv.device)
        # heads a few at a time where the expanded keys and values of all of them would be large (long contexts)
        step = max(1, EXPANDED_KV_BYTES // (B * S * (self.N + self.R + Vh) * c_kv.element_size()))
        for h in range(0, H, step):
            heads = slice(h, min(H, h + step))
            n = heads.stop - h
            k = torch.cat([torch.einsum("bsc,hnc->bhsn", c_kv, self.wk_b[heads].to(dt)),
                           k_pe[:, None].expand(B, n, S, self.R)], -1)             # (B, n, S, N + R)
            v = torch.einsum("bsc,hvc->bhsv", c_kv, self.wv_b[heads].to(dt))       # (B, n, S, Vh)
            q = torch.cat([q_nope[:, :, heads], q_pe[:, :, heads]], -1).transpose(1, 2)   # (B, n, T, N + R)
            with sdpa_kernel(PROMPT_ATTENTION):
                o[:, :, heads] = Fn.scaled_dot_product_attention(q, k, v, attn_mask=seen, is_causal=not start,
                                                                  scale=self.scale).transpose(1, 2)
        return o

    def _attend(self, q_lat, q_pe, c_kv, k_pe, start: int) -> torch.Tensor:
        """softmax(q_lat . c_kv + q_pe . k_pe) . c_kv over the causal positions -> o_lat (B, T, H, C) fp32."""
        T, S = q_lat.shape[1], c_kv.shape[1]
        scores = (torch.einsum("bthc,bsc->bths", q_lat, c_kv.float())
                  + torch.einsum("bthr,bsr->bths", q_pe.float(), k_pe.float())) * self.scale
        q_pos = torch.arange(start, start + T, device=q_lat.device)
        mask = torch.arange(S, device=q_lat.device)[None, :] > q_pos[:, None]         # (T, S)
        scores = scores.masked_fill(mask[None, :, None, :], float("-inf"))
        p = scores.softmax(dim=-1)                                                     # (B, T, H, S)
        return torch.einsum("bths,bsc->bthc", p, c_kv.float())


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x); the dense FFN and the shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = Linear(dim, hidden)
        self.w_up = Linear(dim, hidden)
        self.w_down = Linear(hidden, dim)
        self.w_gate_up = None   # both weights in one (merge_gate_up)

    def merge_gate_up(self) -> None:
        """Let one matrix product compute gate and up (as MLA.merge_input_projections: two views of one
        (2 * hidden, dim) tensor, for inference on the model's final device)."""
        if self.w_gate_up is None:
            self.w_gate_up = merge_weights(self.w_gate, self.w_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate_up is not None and fused(x):
            from dslocal.kernels.gpu.act import swiglu
            return self.w_down(swiglu(linear(x, self.w_gate_up)))
        return self.w_down(Fn.silu(self.w_gate(x)) * self.w_up(x))


class Router(nn.Module):
    """Top-k expert choice (llama.cpp build_moe_ffn; DeepSeek-V3 paper section 2.1.2), in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_expert, cfg.hidden, dtype=torch.float32))
        # exp_probs_b: a per-expert bias used only to select experts, never to weight them
        self.bias = nn.Parameter(torch.zeros(cfg.n_expert, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, D) -> expert ids (M, K) long, weights (M, K) fp32."""
        ids, w, _ = self.route(x)
        return ids, w

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, D) -> router logits (M, E) fp32."""
        return x.float() @ self.weight.float().t()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (M, D) -> expert ids (M, K), weights (M, K), and every expert's affinity probs (M, E)."""
        cfg = self.cfg
        logits = self.logits(x)                                                        # (M, E)
        probs = logits.sigmoid() if cfg.gating == GATING_SIGMOID else logits.softmax(dim=-1)
        sel = probs + self.bias
        if cfg.n_group > 1:
            grouped = sel.view(-1, cfg.n_group, cfg.n_expert // cfg.n_group)            # (M, G, E/G)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)                        # top-2 sum per group
            keep = group_score.topk(cfg.n_group_used, dim=-1).indices
            group_mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            sel = grouped.masked_fill(group_mask[..., None], float("-inf")).flatten(1)
        ids = sel.topk(cfg.n_expert_used, dim=-1).indices
        w = probs.gather(1, ids)
        if cfg.expert_weights_norm:
            w = w / w.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
        if cfg.expert_weights_scale not in (0.0, 1.0):
            w = w * cfg.expert_weights_scale
        return ids, w, probs

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, speed: float) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3 section 2.1.2): after a step, lower the selection bias
        of each overloaded expert by `speed` and raise it for each underloaded one. load: (E,) token counts."""
        self.bias += speed * torch.sign(load.float().mean() - load.float())


def sequence_balance_loss(probs: torch.Tensor, ids: torch.Tensor, batch: int, k: int) -> torch.Tensor:
    """The sequence-wise balance loss sum_i f_i P_i of DeepSeek-V3 eq. 17-19, averaged over sequences.

    f_i = E / (K T) * (tokens of the sequence routed to i); P_i = mean over the sequence of the affinity
    normalized over experts. probs (B*T, E), ids (B*T, K). Equals 1 when routing is perfectly balanced.
    """
    E = probs.shape[-1]
    probs = probs.view(batch, -1, E)                                                # (B, T, E)
    T = probs.shape[1]
    chosen = torch.zeros_like(probs).scatter_(-1, ids.view(batch, T, -1), 1.0)     # (B, T, E)
    f = chosen.sum(1) * E / (k * T)                                                 # (B, E)
    p = (probs / probs.sum(-1, keepdim=True)).mean(1)                               # (B, E)
    return (f * p).sum(-1).mean()


class MoE(nn.Module):
    """DeepSeekMoE: K of E fine-grained routed experts plus always-on shared experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, F, D = cfg.n_expert, cfg.expert_ffn, cfg.hidden
        self.router = Router(cfg)
        self.w_gate = nn.Parameter(torch.empty(E, F, D))
        self.w_up = nn.Parameter(torch.empty(E, F, D))
        self.w_down = nn.Parameter(torch.empty(E, D, F))
        self.shared = MLP(D, F * cfg.n_expert_shared) if cfg.n_expert_shared else None
        self.act_gate_up: str | None = None   # activation rounding for the routed experts' products
        self.act_down: str | None = None
        # Training only: tokens routed to each expert (E,) since the trainer last reset it to None, and the
        # balance loss of the last forward (computed when balance_loss is True).
        self.load: torch.Tensor | None = None
        self.balance_loss = False
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                   # (M, D)
        ids, w, probs = self.router.route(x)
        if self.training:
            counts = torch.bincount(ids.flatten(), minlength=self.router.weight.shape[0]).float()
            self.load = counts if self.load is None else self.load + counts
            if self.balance_loss:
                self.aux_loss = sequence_balance_loss(probs, ids, shape[0] if len(shape) == 3 else 1,
                                                      ids.shape[1])
        y = routed_experts(x, ids, w, self.w_gate, self.w_up, self.w_down, self.act_gate_up, self.act_down)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape)


def routed_experts(x, ids, w, w_gate, w_up, w_down, act_gate_up=None, act_down=None) -> torch.Tensor:
    """sum_k w[:, k] * down_e(silu(gate_e x) * up_e x) with e = ids[:, k]. x (M, D), ids/w (M, K)."""
    y = torch.zeros_like(x, dtype=torch.float32)
    xr = round_activations(x, act_gate_up)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = xr[tok]
        a = Fn.silu(h @ w_gate[e].t()) * (h @ w_up[e].t())
        out = round_activations(a, act_down) @ w_down[e].t()
        y.index_add_(0, tok, out.float() * w[tok, slot, None])
    return y.to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden, cfg.dense_ffn)

    def forward(self, x, cos, sin, cache, start):
        a = self.attn(self.attn_norm(x), cos, sin, cache, self.layer, start)
        if fused(x):    # the residual add and the norm after it in one kernel
            from dslocal.kernels.gpu.norm import rms_norm
            h, x = rms_norm(a, self.ffn_norm.weight, self.ffn_norm.eps, residual=x)
            return x + self.ffn(h)
        x = x + a
        return x + self.ffn(self.ffn_norm(x))


class MTP(nn.Module):
    """One multi-token prediction depth (DeepSeek-V3 section 2.2; GGUF blk.M.nextn.*): combine the previous
    depth's hidden state at i with the embedding of token i+k, run one more block; the embedding and the
    output head are the main model's."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.hnorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.eh_proj = Linear(2 * cfg.hidden, cfg.hidden)
        self.block = Block(cfg, layer)
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)    # shared_head_norm, before the shared head

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos, sin) -> torch.Tensor:
        """h (B, T, D) previous depth's hidden state, emb (B, T, D) embeddings of the tokens k ahead."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))        # (B, T, D)
        return self.block(x, cos, sin, None, 0)


class DeepSeek(nn.Module):
    def __init__(self, cfg: ModelConfig, mtp: bool = False):
        """mtp: also build the cfg.n_mtp multi-token prediction modules (training; inference skips them)."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.head = Linear(cfg.hidden, cfg.vocab_size)
        if mtp and cfg.n_mtp:
            self.mtp = nn.ModuleList(MTP(cfg, cfg.n_layer + k) for k in range(cfg.n_mtp))
        self.register_buffer("rope_freq", rope_frequencies(cfg), persistent=False)

    def rope(self, start: int | torch.Tensor, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, R/2) of positions start..start+T-1 (start may be a 0-d device tensor)."""
        pos = torch.arange(T, device=device, dtype=torch.float64) + start
        angle = pos[:, None] * self.rope_freq.to(device, torch.float64)[None, :]   # (T, R/2)
        return angle.cos().float(), angle.sin().float()

    def forward(self, tokens: torch.Tensor, cache: LatentCache | None = None, start: int = 0) -> torch.Tensor:
        """tokens (B, T) at positions start.. -> logits (B, T, V) fp32; appends to the cache if given."""
        return self.head(self.norm(self.hidden(tokens, cache, start))).float()

    def next_logits(self, tokens: torch.Tensor, cache: LatentCache, start: int | torch.Tensor = 0) -> torch.Tensor:
        """tokens (1, T) appended to the cache -> logits (V,) fp32 of the last one only (generation)."""
        h = self.hidden(tokens, cache, start)[:, -1:]                                   # (1, 1, D)
        return self.head(self.norm(h)).float()[0, -1]

    def hidden(self, tokens: torch.Tensor, cache: LatentCache | None = None, start: int = 0) -> torch.Tensor:
        """tokens (B, T) -> the last block's output (B, T, D), before the final norm."""
        T = tokens.shape[1]
        positioned = isinstance(start, int)   # else a 0-d device tensor: a step captured in a CUDA graph
        if cache is not None and positioned and start + T > cache.max_len:
            raise ValueError(f"{start + T} tokens do not fit the cache of {cache.max_len}")
        cos, sin = self.rope(start, T, tokens.device)
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, cos, sin, cache, start)
        if cache is not None and positioned:
            cache.length = start + T
        return x

    def forward_train(self, window: torch.Tensor) -> list[torch.Tensor]:
        """window (B, T + 1 + n_mtp) -> logits (B, T, V) for the main head, then one per MTP depth k = 1..,
        which at position i predicts window[:, i + 1 + k] (DeepSeek-V3 section 2.2, the causal chain)."""
        n_mtp = len(self.mtp) if hasattr(self, "mtp") else 0
        T = window.shape[1] - 1 - n_mtp
        h = self.hidden(window[:, :T])
        out = [self.head(self.norm(h)).float()]
        if n_mtp:
            cos, sin = self.rope(0, T, window.device)
            for k, module in enumerate(self.mtp, start=1):
                h = module(h, self.embed(window[:, k:k + T]), cos, sin)
                out.append(self.head(module.norm(h)).float())
        return out

    def merge_projections(self) -> None:
        """Fewer, larger matrix products for inference (MLA.merge_input_projections, MLP.merge_gate_up);
        call once the model is on its device."""
        for m in self.modules():
            if isinstance(m, MLA):
                m.merge_input_projections()
            elif isinstance(m, MLP):
                m.merge_gate_up()

    def moe_layers(self) -> list[MoE]:
        """The MoE feed-forwards of the main layers and the MTP modules, in order."""
        blocks = list(self.layers) + ([m.block for m in self.mtp] if hasattr(self, "mtp") else [])
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]


@torch.no_grad()
def init_weights(model: DeepSeek, std: float = 0.02) -> None:
    """Fresh weights (GPT-2's scheme): N(0, std) for every matrix, std / sqrt(2 n_layer) for the projections
    that write into the residual stream, norms 1, selection biases 0."""
    resid = std / math.sqrt(2 * model.cfg.n_layer)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 1:
            p.fill_(0.0 if leaf == "bias" else 1.0)
        elif name.endswith(("wo.weight", "w_down.weight", "ffn.w_down")):
            p.normal_(0.0, resid)
        else:
            p.normal_(0.0, std)
