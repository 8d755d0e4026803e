"""ModelConfig: the deepseek2 hyper-parameters, read from GGUF metadata in one function (and written back).

Keys, types and defaults follow llama.cpp (src/llama-model.cpp load_hparams and src/models/deepseek2.cpp);
see gguf-deepseek2.md section 2. The GGUF key of each field is in the comment beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dslocal.quant.gguf_file import GGUFError, GGUFFile, ValueType

ARCH = "deepseek2"
GATING_SOFTMAX = 1  # deepseek2.expert_gating_func values (enum llama_expert_gating_func_type)
GATING_SIGMOID = 2


@dataclass(frozen=True)
class ModelConfig:
    name: str                  # general.name (optional)
    context_length: int        # deepseek2.context_length
    hidden: int                # deepseek2.embedding_length                      (D)
    n_layer: int               # deepseek2.block_count - deepseek2.nextn_predict_layers
    n_mtp: int                 # deepseek2.nextn_predict_layers (0)
    n_head: int                # deepseek2.attention.head_count                   (H)
    n_head_kv: int             # deepseek2.attention.head_count_kv (= n_head; MLA files: 1)
    vocab_size: int            # deepseek2.vocab_size, else len(tokenizer.ggml.tokens)  (V)
    rms_eps: float             # deepseek2.attention.layer_norm_rms_epsilon
    q_lora_rank: int           # deepseek2.attention.q_lora_rank (0: one attn_q)  (Q)
    kv_lora_rank: int          # deepseek2.attention.kv_lora_rank                 (C)
    qk_nope_dim: int           # key_length_mla (or key_length) - rope.dimension_count
    qk_rope_dim: int           # deepseek2.rope.dimension_count                   (R)
    v_head_dim: int            # deepseek2.attention.value_length_mla (or value_length)
    mla: bool                  # both *_mla keys present: split attn_k_b / attn_v_b (else fused attn_kv_b)
    n_dense_lead: int          # deepseek2.leading_dense_block_count (0)
    dense_ffn: int             # deepseek2.feed_forward_length (0)
    n_expert: int              # deepseek2.expert_count (0)                        (E)
    n_expert_used: int         # deepseek2.expert_used_count (0)                   (K)
    n_expert_shared: int       # deepseek2.expert_shared_count
    expert_ffn: int            # deepseek2.expert_feed_forward_length               (F)
    n_group: int               # deepseek2.expert_group_count (0)
    n_group_used: int          # deepseek2.expert_group_used_count (0)
    expert_weights_scale: float  # deepseek2.expert_weights_scale (0: no scaling)
    expert_weights_norm: bool  # deepseek2.expert_weights_norm (false)
    gating: int                # deepseek2.expert_gating_func (absent: softmax)
    rope_base: float           # deepseek2.rope.freq_base (10000)
    rope_scaling: str          # deepseek2.rope.scaling.type ("linear" when absent, as in llama.cpp)
    rope_factor: float         # deepseek2.rope.scaling.factor (0 or absent: 1)
    rope_orig_ctx: int         # deepseek2.rope.scaling.original_context_length (= context_length)
    rope_attn_factor: float    # deepseek2.rope.scaling.attn_factor (1)
    mscale_all_dim: float      # deepseek2.rope.scaling.yarn_log_multiplier / 0.1 (0)

    @property
    def n_layer_moe(self) -> int:
        return self.n_layer - self.n_dense_lead if self.n_expert else 0

    def is_moe_layer(self, i: int) -> bool:
        return self.n_expert > 0 and i >= self.n_dense_lead

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim

    @property
    def kq_scale(self) -> float:
        """Attention softmax scale: mscale^2 / sqrt(qk_head_dim) with YaRN, else 1/sqrt(qk_head_dim)."""
        scale = 1.0 / math.sqrt(self.qk_head_dim)
        if self.rope_scaling == "yarn" and self.rope_factor > 1.0:
            mscale = self.rope_attn_factor * (1.0 + 0.1 * self.mscale_all_dim * math.log(self.rope_factor))
            scale *= mscale * mscale
        return scale


def _is_lite(n_layer: int, vocab_size: int) -> bool:
    # llama.cpp tells V2-Lite apart by its layer count and skips the q_lora_rank key (deepseek2.cpp L8-14)
    return n_layer in (26, 27) or (n_layer == 48 and vocab_size == 128256)


_UINT = (ValueType.UINT32,)
_FLOAT = (ValueType.FLOAT32,)


def _get(f: GGUFFile, key: str, types, default=None, required=False, per_layer=False):
    """A metadata value, type-checked as strictly as llama.cpp checks it (llama-model-loader.cpp)."""
    mv = f.metadata.get(key)
    if mv is None:
        if required:
            raise GGUFError(f"required metadata key {key!r} is missing")
        return default
    if per_layer and mv.type == ValueType.ARRAY and mv.elem_type in (ValueType.UINT32, ValueType.INT32):
        values = np.asarray(mv.value)
        if len(values) == 0 or (values != values[0]).any():
            raise GGUFError(f"metadata key {key!r} has per-layer values {values.tolist()}; "
                            "only one value for all layers is supported")
        return int(values[0])
    if mv.type not in types:
        want = " or ".join(t.name for t in types)
        raise GGUFError(f"metadata key {key!r} has type {mv.type.name}, expected {want}")
    return mv.value


def read_config(f: GGUFFile) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata; a missing or ill-typed key is a GGUFError."""
    arch = _get(f, "general.architecture", (ValueType.STRING,), required=True)
    if arch != ARCH:
        raise GGUFError(f"has architecture {arch!r}; dslocal runs only {ARCH!r} (DeepSeek V2/V3) models")
    A = ARCH

    def u(key, default=None, required=False, per_layer=False):
        return _get(f, f"{A}.{key}", _UINT, default, required, per_layer)

    def fl(key, default=None, required=False):
        return _get(f, f"{A}.{key}", _FLOAT, default, required)

    block_count = u("block_count", required=True)
    n_mtp = u("nextn_predict_layers", 0)
    hidden = u("embedding_length", required=True)
    n_head = u("attention.head_count", 0, per_layer=True)
    if n_head == 0:
        raise GGUFError(f"metadata key '{A}.attention.head_count' is missing or 0")
    tokens = f.get("tokenizer.ggml.tokens")
    vocab_size = u("vocab_size", len(tokens) if tokens is not None else 0)
    n_layer = block_count - n_mtp
    if n_layer <= 0:
        raise GGUFError(f"block_count {block_count} leaves no layers after {n_mtp} MTP layers")

    key_length = u("attention.key_length", hidden // n_head)
    value_length = u("attention.value_length", hidden // n_head)
    rope_dim = u("rope.dimension_count", key_length)
    key_length_mla = u("attention.key_length_mla", 0)
    value_length_mla = u("attention.value_length_mla", 0)
    mla = key_length_mla > 0 and value_length_mla > 0
    qk_head = key_length_mla if mla else key_length
    if not 0 < rope_dim < qk_head:
        raise GGUFError(f"rope.dimension_count {rope_dim} must be below the query/key head size {qk_head}")

    q_lora = u("attention.q_lora_rank", None)
    if q_lora is None:
        if not _is_lite(n_layer, vocab_size):
            raise GGUFError(f"required metadata key '{A}.attention.q_lora_rank' is missing")
        q_lora = 0

    n_expert = u("expert_count", 0)
    n_expert_used = u("expert_used_count", 0, per_layer=True)
    n_group = u("expert_group_count", 0)
    n_group_used = u("expert_group_used_count", 0)
    if n_expert and not 0 < n_expert_used <= n_expert:
        raise GGUFError(f"expert_used_count {n_expert_used} must be between 1 and expert_count {n_expert}")
    if n_group > 1 and (n_expert % n_group or not 0 < n_group_used < n_group):
        raise GGUFError(f"expert groups ({n_group} groups, {n_group_used} used) do not fit {n_expert} experts")

    scaling = _get(f, f"{A}.rope.scaling.type", (ValueType.STRING,), "linear")   # llama.cpp's default
    factor = fl("rope.scaling.factor", None)
    if factor is None:
        factor = fl("rope.scale_linear", 0.0)
    context_length = u("context_length", required=True)
    gating = u("expert_gating_func", GATING_SOFTMAX)
    if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
        raise GGUFError(f"expert_gating_func {gating} is not supported (1 = softmax, 2 = sigmoid)")

    return ModelConfig(
        name=_get(f, "general.name", (ValueType.STRING,), ""),
        context_length=context_length,
        hidden=hidden,
        n_layer=n_layer,
        n_mtp=n_mtp,
        n_head=n_head,
        n_head_kv=u("attention.head_count_kv", n_head, per_layer=True),
        vocab_size=vocab_size,
        rms_eps=fl("attention.layer_norm_rms_epsilon", required=True),
        q_lora_rank=q_lora,
        kv_lora_rank=u("attention.kv_lora_rank", required=True),
        qk_nope_dim=qk_head - rope_dim,
        qk_rope_dim=rope_dim,
        v_head_dim=value_length_mla if mla else value_length,
        mla=mla,
        n_dense_lead=u("leading_dense_block_count", 0),
        dense_ffn=u("feed_forward_length", 0, per_layer=True),
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_expert_shared=u("expert_shared_count", required=True),
        expert_ffn=u("expert_feed_forward_length", required=True, per_layer=True),
        n_group=n_group,
        n_group_used=n_group_used,
        expert_weights_scale=fl("expert_weights_scale", 0.0),
        expert_weights_norm=_get(f, f"{A}.expert_weights_norm", (ValueType.BOOL,), False),
        gating=gating,
        rope_base=fl("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        rope_factor=factor if factor > 0 else 1.0,
        rope_orig_ctx=u("rope.scaling.original_context_length", context_length),
        rope_attn_factor=fl("rope.scaling.attn_factor", 1.0),
        mscale_all_dim=fl("rope.scaling.yarn_log_multiplier", 0.0) / 0.1,
    )


def config_metadata(cfg: ModelConfig) -> list[tuple[str, object, ValueType]]:
    """The deepseek2 metadata keys that read_config reads back as cfg, typed as llama.cpp expects."""
    A, U, F, B, S = ARCH, ValueType.UINT32, ValueType.FLOAT32, ValueType.BOOL, ValueType.STRING
    qk_head = cfg.qk_nope_dim + cfg.qk_rope_dim
    kv = [
        ("general.architecture", A, S),
        ("general.name", cfg.name or "dslocal-model", S),
        (f"{A}.context_length", cfg.context_length, U),
        (f"{A}.embedding_length", cfg.hidden, U),
        (f"{A}.block_count", cfg.n_layer + cfg.n_mtp, U),
        (f"{A}.attention.head_count", cfg.n_head, U),
        (f"{A}.attention.head_count_kv", cfg.n_head_kv, U),
        (f"{A}.vocab_size", cfg.vocab_size, U),
        (f"{A}.attention.layer_norm_rms_epsilon", cfg.rms_eps, F),
        (f"{A}.attention.kv_lora_rank", cfg.kv_lora_rank, U),
        (f"{A}.rope.dimension_count", cfg.qk_rope_dim, U),
        (f"{A}.leading_dense_block_count", cfg.n_dense_lead, U),
        (f"{A}.feed_forward_length", cfg.dense_ffn, U),
        (f"{A}.expert_count", cfg.n_expert, U),
        (f"{A}.expert_used_count", cfg.n_expert_used, U),
        (f"{A}.expert_shared_count", cfg.n_expert_shared, U),
        (f"{A}.expert_feed_forward_length", cfg.expert_ffn, U),
        (f"{A}.expert_group_count", cfg.n_group, U),
        (f"{A}.expert_group_used_count", cfg.n_group_used, U),
        (f"{A}.expert_weights_scale", cfg.expert_weights_scale, F),
        (f"{A}.expert_weights_norm", cfg.expert_weights_norm, B),
        (f"{A}.expert_gating_func", cfg.gating, U),
        (f"{A}.rope.freq_base", cfg.rope_base, F),
    ]
    if cfg.n_mtp:
        kv.append((f"{A}.nextn_predict_layers", cfg.n_mtp, U))
    # Written even when 0: llama.cpp requires the key unless it takes the file for V2-Lite by its layer count
    kv.append((f"{A}.attention.q_lora_rank", cfg.q_lora_rank, U))
    if cfg.mla:
        # MLA files: one shared latent "head"; K is the cache row (C + R), V its first C values
        kv += [(f"{A}.attention.key_length", cfg.kv_lora_rank + cfg.qk_rope_dim, U),
               (f"{A}.attention.value_length", cfg.kv_lora_rank, U),
               (f"{A}.attention.key_length_mla", qk_head, U),
               (f"{A}.attention.value_length_mla", cfg.v_head_dim, U)]
    else:
        kv += [(f"{A}.attention.key_length", qk_head, U),
               (f"{A}.attention.value_length", cfg.v_head_dim, U)]
    if cfg.rope_scaling != "none" and (cfg.rope_scaling != "linear" or cfg.rope_factor != 1.0):
        kv += [(f"{A}.rope.scaling.type", cfg.rope_scaling, S),
               (f"{A}.rope.scaling.factor", cfg.rope_factor, F),
               (f"{A}.rope.scaling.original_context_length", cfg.rope_orig_ctx, U),
               (f"{A}.rope.scaling.attn_factor", cfg.rope_attn_factor, F),
               (f"{A}.rope.scaling.yarn_log_multiplier", 0.1 * cfg.mscale_all_dim, F)]
    return kv


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order
    part: str               # embed | attn | norm | dense | router | shared | routed | head | mtp
    required: bool = True


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor a deepseek2 GGUF of this config holds, named as llama.cpp names them (deepseek2.cpp)."""
    D, H, V = cfg.hidden, cfg.n_head, cfg.vocab_size
    C, R, N, Vh = cfg.kv_lora_rank, cfg.qk_rope_dim, cfg.qk_nope_dim, cfg.v_head_dim
    E, F, S = cfg.n_expert, cfg.expert_ffn, cfg.n_expert_shared
    specs = [TensorSpec("token_embd.weight", (V, D), "embed"),
             TensorSpec("output_norm.weight", (D,), "norm"),
             TensorSpec("output.weight", (V, D), "head", required=False)]  # absent: tied to token_embd
    for i in range(cfg.n_layer + cfg.n_mtp):
        mtp = i >= cfg.n_layer   # MTP blocks are optional: llama.cpp loads them only on request

        def t(name, shape, part, required=True):
            specs.append(TensorSpec(f"blk.{i}.{name}", shape, "mtp" if mtp else part, required and not mtp))
        t("attn_norm.weight", (D,), "norm")
        if cfg.q_lora_rank:
            t("attn_q_a.weight", (cfg.q_lora_rank, D), "attn")
            t("attn_q_a_norm.weight", (cfg.q_lora_rank,), "norm")
            t("attn_q_b.weight", (H * (N + R), cfg.q_lora_rank), "attn")
        else:
            t("attn_q.weight", (H * (N + R), D), "attn")
        t("attn_kv_a_mqa.weight", (C + R, D), "attn")
        t("attn_kv_a_norm.weight", (C,), "norm")
        if cfg.mla:
            t("attn_k_b.weight", (H, C, N), "attn")   # per head: latent <- q_nope (absorbed form)
            t("attn_v_b.weight", (H, Vh, C), "attn")
        else:
            t("attn_kv_b.weight", (H * (N + Vh), C), "attn")
        t("attn_output.weight", (D, H * Vh), "attn")
        t("ffn_norm.weight", (D,), "norm")
        if not cfg.is_moe_layer(i):
            t("ffn_gate.weight", (cfg.dense_ffn, D), "dense")
            t("ffn_up.weight", (cfg.dense_ffn, D), "dense")
            t("ffn_down.weight", (D, cfg.dense_ffn), "dense")
        else:
            t("ffn_gate_inp.weight", (E, D), "router")
            t("exp_probs_b.bias", (E,), "router", required=False)
            t("ffn_gate_exps.weight", (E, F, D), "routed")
            t("ffn_up_exps.weight", (E, F, D), "routed")
            t("ffn_down_exps.weight", (E, D, F), "routed")
            if S:
                t("ffn_gate_shexp.weight", (F * S, D), "shared")
                t("ffn_up_shexp.weight", (F * S, D), "shared")
                t("ffn_down_shexp.weight", (D, F * S), "shared")
        if mtp:
            t("nextn.eh_proj.weight", (D, 2 * D), "mtp")
            t("nextn.enorm.weight", (D,), "mtp")
            t("nextn.hnorm.weight", (D,), "mtp")
            t("nextn.embed_tokens.weight", (V, D), "mtp")
            t("nextn.shared_head_head.weight", (V, D), "mtp")
            t("nextn.shared_head_norm.weight", (D,), "mtp")
    return specs


def check_tensors(cfg: ModelConfig, f: GGUFFile) -> dict[str, TensorSpec]:
    """Check that the file holds exactly the tensors cfg needs, with their shapes; returns specs by name."""
    specs = {s.name: s for s in tensor_specs(cfg)}
    for spec in specs.values():
        info = f.tensors.get(spec.name)
        if info is None:
            if spec.required:
                raise GGUFError(f"tensor {spec.name!r} is missing (the metadata describes a model that needs it)")
        elif info.shape != spec.shape:
            raise GGUFError(f"tensor {spec.name!r} has shape {list(info.shape)}, but the metadata implies "
                            f"{list(spec.shape)}")
    for name in f.tensors:
        if name not in specs:
            raise GGUFError(f"tensor {name!r} does not belong to a deepseek2 model of this configuration")
    return specs
