"""GGUF tensors <-> DeepSeek module parameters: one name table, used to load and (later) to export."""
from __future__ import annotations

import numpy as np
import torch

from dslocal.quant.dequant import load_tensor
from dslocal.quant.ggml import GGMLType
from dslocal.quant.gguf_file import GGUFFile
from dslocal.runtime.config import ModelConfig, check_tensors
from dslocal.runtime.model import DeepSeek, Linear, rope_frequencies


def gguf_names(cfg: ModelConfig) -> dict[str, str]:
    """Module parameter name -> GGUF tensor name, for the tensors stored one to one."""
    names = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "head.weight": "output.weight"}
    for i in range(cfg.n_layer):
        p, g = f"layers.{i}.", f"blk.{i}."
        names |= {p + "attn_norm.weight": g + "attn_norm.weight", p + "ffn_norm.weight": g + "ffn_norm.weight",
                  p + "attn.wkv_a.weight": g + "attn_kv_a_mqa.weight",
                  p + "attn.kv_norm.weight": g + "attn_kv_a_norm.weight",
                  p + "attn.wo.weight": g + "attn_output.weight"}
        if cfg.q_lora_rank:
            names |= {p + "attn.wq_a.weight": g + "attn_q_a.weight", p + "attn.q_norm.weight": g + "attn_q_a_norm.weight",
                      p + "attn.wq_b.weight": g + "attn_q_b.weight"}
        else:
            names[p + "attn.wq.weight"] = g + "attn_q.weight"
        if cfg.is_moe_layer(i):
            names |= {p + "ffn.router.weight": g + "ffn_gate_inp.weight", p + "ffn.router.bias": g + "exp_probs_b.bias",
                      p + "ffn.w_gate": g + "ffn_gate_exps.weight", p + "ffn.w_up": g + "ffn_up_exps.weight",
                      p + "ffn.w_down": g + "ffn_down_exps.weight"}
            if cfg.n_expert_shared:
                names |= {p + "ffn.shared.w_gate.weight": g + "ffn_gate_shexp.weight",
                          p + "ffn.shared.w_up.weight": g + "ffn_up_shexp.weight",
                          p + "ffn.shared.w_down.weight": g + "ffn_down_shexp.weight"}
        else:
            names |= {p + "ffn.w_gate.weight": g + "ffn_gate.weight", p + "ffn.w_up.weight": g + "ffn_up.weight",
                      p + "ffn.w_down.weight": g + "ffn_down.weight"}
    return names


# The activation rounding llama.cpp's CPU backend applies before a dot product with each weight type
T = GGMLType
ACTIVATION_KIND = {T.Q4_0: "q8_0", T.Q4_1: "q8_0", T.Q5_0: "q8_0", T.Q5_1: "q8_0", T.Q8_0: "q8_0",
                   T.Q2_K: "q8_k", T.Q3_K: "q8_k", T.Q4_K: "q8_k", T.Q5_K: "q8_k", T.Q6_K: "q8_k",
                   T.F16: "f16", T.BF16: "bf16", T.F32: None}


def load_model(f: GGUFFile, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", like_llama_cpp: bool = True,
               routed_experts: bool = True, leave_out: frozenset[str] = frozenset()) -> DeepSeek:
    """The reference model with every weight dequantized once to dtype (norms and routers stay fp32).

    like_llama_cpp: round the activations before each product with a quantized weight as llama.cpp's CPU
    backend does (runtime.model.round_activations), so greedy output matches llama.cpp token for token.
    routed_experts=False leaves the MoE layers' routed experts out (their parameters are deleted): the
    caller computes them from the file's blocks (offload/hybrid.py) and replaces the MoE modules' forward.
    leave_out: GGUF names of linear layers' weights not to load: their modules have no weight until the caller
    gives them one (offload/hybrid.py keeps such weights in their blocks on the GPU).
    """
    check_tensors(cfg, f)
    with torch.device("meta"):
        model = DeepSeek(cfg)         # no memory yet: each parameter arrives once, in its final dtype
    if not routed_experts:
        for moe in model.moe_layers():
            del moe.w_gate, moe.w_up, moe.w_down
    for pname, gname in gguf_names(cfg).items():
        if gname in leave_out:
            del model.get_submodule(pname.rsplit(".", 1)[0]).weight
    meta = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}

    def put(pname: str, value: np.ndarray) -> None:
        keep_fp32 = meta[pname].dtype == torch.float32 and (value.ndim == 1 or pname.endswith("router.weight"))
        t = torch.from_numpy(np.ascontiguousarray(value))
        state[pname] = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)

    for pname, gname in gguf_names(cfg).items():
        if pname not in meta:
            continue                  # a routed expert left out
        if gname in f.tensors:
            put(pname, load_tensor(f, gname))
        elif gname.endswith("exp_probs_b.bias"):
            put(pname, np.zeros(cfg.n_expert, np.float32))
    if "head.weight" not in state and "head.weight" in meta:
        state["head.weight"] = state["embed.weight"]                          # tied output head
    for i in range(cfg.n_layer):
        g = f"blk.{i}."
        if cfg.mla:
            k_b = load_tensor(f, g + "attn_k_b.weight")                   # (H, C, N) as llama.cpp stores it
            put(f"layers.{i}.attn.wk_b", k_b.transpose(0, 2, 1))           # (H, N, C)
            put(f"layers.{i}.attn.wv_b", load_tensor(f, g + "attn_v_b.weight"))
        else:
            kv_b = load_tensor(f, g + "attn_kv_b.weight").reshape(cfg.n_head, -1, cfg.kv_lora_rank)
            put(f"layers.{i}.attn.wk_b", kv_b[:, :cfg.qk_nope_dim])          # (H, N, C)
            put(f"layers.{i}.attn.wv_b", kv_b[:, cfg.qk_nope_dim:])          # (H, Vh, C)
    model.load_state_dict(state, strict=True, assign=True)
    model.rope_freq = rope_frequencies(cfg).to(device)
    if like_llama_cpp:
        _set_activation_rounding(model, cfg, f)
    return model.eval()


def _set_activation_rounding(model: DeepSeek, cfg: ModelConfig, f: GGUFFile) -> None:
    def kind(gname: str):
        t = f.tensors.get(gname)
        return ACTIVATION_KIND.get(t.ggml_type) if t is not None else None
    modules = dict(model.named_modules())
    for pname, gname in gguf_names(cfg).items():
        owner = modules[pname.rsplit(".", 1)[0]]
        if isinstance(owner, Linear):
            owner.act = kind(gname if gname in f.tensors or gname != "output.weight" else "token_embd.weight")
    for i, block in enumerate(model.layers):
        g = f"blk.{i}."
        if cfg.mla:
            block.attn.act_k_b, block.attn.act_v_b = kind(g + "attn_k_b.weight"), kind(g + "attn_v_b.weight")
        if cfg.is_moe_layer(i):
            block.ffn.act_gate_up, block.ffn.act_down = kind(g + "ffn_gate_exps.weight"), kind(g + "ffn_down_exps.weight")
