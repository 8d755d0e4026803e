"""Test helper: a Hugging Face DeepseekV2/V3 model (transformers 5.x) -> a deepseek2 GGUF, as llama.cpp does it.

The mapping follows llama.cpp's converter (gguf-deepseek2.md sections 2-3): num_key_value_heads becomes 1 in
MLA files, kv_b_proj is split into attn_k_b (the k half, transposed per head) and attn_v_b, the routed experts
are stacked, mscale_all_dim is stored as yarn_log_multiplier = 0.1 * value. What the GGUF cannot express (HF
details that llama.cpp computes differently) raises instead of converting to a silently different model.

Shapes: H heads, C kv_lora_rank, N qk nope dim, R rope dim, Vh v head dim, E experts, F expert ffn, D hidden,
Q q_lora_rank.
"""
from __future__ import annotations

import numpy as np
import torch

from dslocal.quant.ggml import GGMLType
from dslocal.quant.gguf_writer import TensorData, write_gguf
from dslocal.quant.quantize import quantize
from dslocal.quant.synthetic import choose_type
from dslocal.quant.vocab import synthetic_vocab
from dslocal.runtime.config import GATING_SIGMOID, GATING_SOFTMAX, ModelConfig, config_metadata


def model_config(hf_cfg, mla: bool = True) -> ModelConfig:
    """The ModelConfig of a transformers DeepseekV2Config / DeepseekV3Config; mla=False: legacy attn_kv_b file."""
    c = hf_cfg
    v3 = c.model_type == "deepseek_v3"
    if c.model_type not in ("deepseek_v2", "deepseek_v3"):
        raise ValueError(f"model_type {c.model_type!r} is not DeepSeek V2/V3")
    if not v3 and c.topk_method != "greedy":
        # HF V2's group_limited_greedy scores a group by its max; llama.cpp always uses the top-2 sum
        raise NotImplementedError(f"topk_method {c.topk_method!r}: llama.cpp routes groups differently")
    if not v3 and c.norm_topk_prob:
        # transformers 5.x's DeepseekV2TopkRouter ignores norm_topk_prob; llama.cpp's converter would honour it
        raise NotImplementedError("DeepseekV2 with norm_topk_prob: transformers and llama.cpp disagree")
    if c.rms_norm_eps != 1e-6:
        # HF builds q_a_layernorm / kv_a_layernorm with eps 1e-6 whatever rms_norm_eps says; GGUF has one eps
        raise NotImplementedError(f"rms_norm_eps {c.rms_norm_eps}: HF's latent norms use 1e-6")
    rp = c.rope_parameters
    rope_type = rp.get("rope_type", "default")
    scaling, factor, orig_ctx, mscale_all_dim = "none", 1.0, c.max_position_embeddings, 0.0
    if rope_type == "yarn":
        # HF multiplies cos/sin by attention_factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim);
        # llama.cpp's deepseek2 graph makes the rope magnitude exactly 1. Equal only when that ratio is 1.
        if rp.get("attention_factor") is not None or rp.get("mscale") != rp.get("mscale_all_dim"):
            raise NotImplementedError("YaRN with mscale != mscale_all_dim scales the rope dims; not in GGUF")
        if (rp.get("beta_fast") or 32) != 32 or (rp.get("beta_slow") or 1) != 1 or not rp.get("truncate", True):
            raise NotImplementedError("llama.cpp's deepseek2 YaRN uses beta_fast 32, beta_slow 1, truncated")
        scaling, factor = "yarn", float(rp["factor"])
        orig_ctx = int(rp["original_max_position_embeddings"])
        mscale_all_dim = float(rp.get("mscale_all_dim") or 0.0)
    elif rope_type != "default":
        raise NotImplementedError(f"rope_type {rope_type!r}")
    return ModelConfig(
        name=f"hf-{c.model_type}", context_length=c.max_position_embeddings, hidden=c.hidden_size,
        n_layer=c.num_hidden_layers, n_mtp=0, n_head=c.num_attention_heads,
        n_head_kv=1 if mla else c.num_attention_heads, vocab_size=c.vocab_size, rms_eps=c.rms_norm_eps,
        q_lora_rank=c.q_lora_rank or 0, kv_lora_rank=c.kv_lora_rank, qk_nope_dim=c.qk_nope_head_dim,
        qk_rope_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, mla=mla,
        n_dense_lead=c.first_k_dense_replace, dense_ffn=c.intermediate_size, n_expert=c.n_routed_experts,
        n_expert_used=c.num_experts_per_tok, n_expert_shared=c.n_shared_experts,
        expert_ffn=c.moe_intermediate_size, n_group=c.n_group or 0, n_group_used=c.topk_group or 0,
        expert_weights_scale=float(c.routed_scaling_factor), expert_weights_norm=bool(v3 and c.norm_topk_prob),
        # transformers 5.x hard-codes the gating: softmax in DeepseekV2TopkRouter, sigmoid in DeepseekV3TopkRouter
        gating=GATING_SIGMOID if v3 else GATING_SOFTMAX,
        rope_base=float(rp["rope_theta"]), rope_scaling=scaling, rope_factor=factor, rope_orig_ctx=orig_ctx,
        rope_attn_factor=1.0, mscale_all_dim=mscale_all_dim)


def rope_pairs_from_halves(w: np.ndarray, R: int) -> np.ndarray:
    """Rows (..., R, n_in) ordered for rotate_half (pairs i, i + R/2) -> consecutive pairs (2i, 2i+1)."""
    perm = np.stack([np.arange(R // 2), np.arange(R // 2) + R // 2], axis=-1).reshape(R)   # new 2i+j <- old
    return w[..., perm, :]


def gguf_arrays(model: torch.nn.Module, cfg: ModelConfig, permute_rope: bool | None = None
                ) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array in llama.cpp's numpy shape, from a DeepseekV{2,3}ForCausalLM.

    permute_rope (default: the config's rope_interleave is False): reorder the rope rows of the q and kv_a
    projections from HF's rotate_half layout to llama.cpp's consecutive pairs. DeepSeek's checkpoints store
    interleaved pairs (rope_interleave True; V2 always), which llama.cpp's NORM rope uses as they are.
    """
    if permute_rope is None:
        permute_rope = getattr(model.config, "rope_interleave", True) is False
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    H, C, N, R, Vh, F = (cfg.n_head, cfg.kv_lora_rank, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim,
                         cfg.expert_ffn)
    out = {"token_embd.weight": sd["model.embed_tokens.weight"],
           "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        p, g = f"model.layers.{i}.", f"blk.{i}."
        a = p + "self_attn."
        out[g + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[g + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        q_name = "attn_q_b.weight" if cfg.q_lora_rank else "attn_q.weight"
        wq = sd[a + ("q_b_proj.weight" if cfg.q_lora_rank else "q_proj.weight")]      # (H*(N+R), Q or D)
        wkv_a = sd[a + "kv_a_proj_with_mqa.weight"]                                    # (C+R, D)
        if permute_rope:
            wq = wq.reshape(H, N + R, -1)                                              # (H, N+R, Q or D)
            wq = np.concatenate([wq[:, :N], rope_pairs_from_halves(wq[:, N:], R)], axis=1)
            wq = wq.reshape(H * (N + R), -1)
            wkv_a = np.concatenate([wkv_a[:C], rope_pairs_from_halves(wkv_a[C:], R)], axis=0)
        out[g + q_name] = wq
        if cfg.q_lora_rank:
            out[g + "attn_q_a.weight"] = sd[a + "q_a_proj.weight"]
            out[g + "attn_q_a_norm.weight"] = sd[a + "q_a_layernorm.weight"]
        out[g + "attn_kv_a_mqa.weight"] = wkv_a
        out[g + "attn_kv_a_norm.weight"] = sd[a + "kv_a_layernorm.weight"]
        kv_b = sd[a + "kv_b_proj.weight"]                                              # (H*(N+Vh), C)
        if cfg.mla:
            kv_b = kv_b.reshape(H, N + Vh, C)
            out[g + "attn_k_b.weight"] = kv_b[:, :N].transpose(0, 2, 1)                # (H, C, N)
            out[g + "attn_v_b.weight"] = kv_b[:, N:]                                   # (H, Vh, C)
        else:
            out[g + "attn_kv_b.weight"] = kv_b
        out[g + "attn_output.weight"] = sd[a + "o_proj.weight"]
        m = p + "mlp."
        if cfg.is_moe_layer(i):
            out[g + "ffn_gate_inp.weight"] = sd[m + "gate.weight"]                     # (E, D)
            if m + "gate.e_score_correction_bias" in sd:
                out[g + "exp_probs_b.bias"] = sd[m + "gate.e_score_correction_bias"]
            gate_up = sd[m + "experts.gate_up_proj"]                                   # (E, 2F, D): gate | up
            out[g + "ffn_gate_exps.weight"] = gate_up[:, :F]                           # (E, F, D)
            out[g + "ffn_up_exps.weight"] = gate_up[:, F:]
            out[g + "ffn_down_exps.weight"] = sd[m + "experts.down_proj"]              # (E, D, F)
            for part in ("gate", "up", "down"):
                out[g + f"ffn_{part}_shexp.weight"] = sd[m + f"shared_experts.{part}_proj.weight"]
        else:
            for part in ("gate", "up", "down"):
                out[g + f"ffn_{part}.weight"] = sd[m + f"{part}_proj.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def write(path, cfg: ModelConfig, arrays: dict[str, np.ndarray], ftype: str = "f32") -> dict[str, GGMLType]:
    """Write the arrays as a GGUF of file type ftype (types chosen as llama-quantize does); returns the types."""
    types = {name: choose_type(name, a.shape, ftype, cfg.n_layer) for name, a in arrays.items()}
    tensors = [TensorData(name, a.shape, types[name], lambda a=a, t=types[name]: [quantize(a, t)])
               for name, a in arrays.items()]
    pre = "deepseek-v3" if cfg.gating == GATING_SIGMOID else "deepseek-llm"
    write_gguf(path, config_metadata(cfg) + synthetic_vocab(cfg.vocab_size, pre), tensors)
    return types
