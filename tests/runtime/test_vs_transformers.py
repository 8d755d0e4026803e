"""The reference model against Hugging Face transformers, an implementation no one here wrote.

Tiny random DeepseekV2 (V2-Lite style) and DeepseekV3 models are converted to GGUF as llama.cpp converts them
(hf_to_gguf.py) and loaded by dslocal. Checked: fp32 logits for prefill and for latent-cache decode, in MLA
files and in legacy attn_kv_b files, also from the placed runtime's compiled CPU decode steps; F16 files
against transformers with its weights rounded to fp16 too; the rope pair layout; YaRN frequencies and the
attention scale; and Q8_0 / Q6_K / Q4_K files against the F32 file of the same weights, with the errors
measured here written down as bounds.

What transformers 5.x does that the conversion has to respect (read in models/deepseek_v{2,3}/modeling_*.py):
- Rope: V2 rotates consecutive pairs (view_as_complex); V3 with rope_interleave=True rotates the same pairs and
  writes them de-interleaved, identically for q and k, so q.k is unchanged. Both equal llama.cpp's NORM rope on
  the weights as stored: no permutation. Only rope_interleave=False (rotate_half on halves) needs one.
- YaRN (_compute_yarn_parameters, truncate=True): the same ramp as ggml; cos/sin are multiplied by
  mscale(factor, mscale) / mscale(factor, mscale_all_dim), which is 1 for DeepSeek's equal values, and the
  softmax scale by mscale(factor, mscale_all_dim)^2, as ModelConfig.kq_scale does.
- Routing: V2 is softmax greedy top-k (norm_topk_prob is ignored); V3 is always sigmoid with the selection bias,
  top-2-sum group scores and -inf for unchosen groups, as llama.cpp (transformers 4.x filled 0.0, which differs
  only when a chosen group holds negative selection scores).
"""
import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from dslocal.quant.gguf_file import open_gguf
from dslocal.runtime.config import read_config
from dslocal.runtime.model import LatentCache, rope_frequencies
from dslocal.runtime.weights import load_model


def _import_sibling(name: str):
    # --import-mode=importlib puts no test folder on sys.path
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


conv = _import_sibling("hf_to_gguf")

FP32_BOUND = 1e-4   # relative error max|a - b| / max|b| of the logits; measured ~1e-6
N_PREFILL = 5       # decode: this many tokens at once, then one at a time


def _yarn(mscale: float) -> dict:
    return dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                mscale=mscale, mscale_all_dim=mscale, beta_fast=32, beta_slow=1)


_COMMON = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
               num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=256, qk_nope_head_dim=32,
               qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=163840, rms_norm_eps=1e-6,
               attn_implementation="eager")


def hf_config(kind: str):
    if kind == "v2-lite":
        return DeepseekV2Config(**_COMMON, num_hidden_layers=4, q_lora_rank=None, n_routed_experts=8,
                                num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, n_group=1,
                                topk_group=1, topk_method="greedy", norm_topk_prob=False,
                                routed_scaling_factor=1.0, rope_parameters=_yarn(0.707))
    # V3: sigmoid gating is hard-coded in DeepseekV3TopkRouter (the config has no scoring_func to forget)
    return DeepseekV3Config(**_COMMON, num_hidden_layers=5, q_lora_rank=256, n_routed_experts=16,
                            num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=2, n_group=4,
                            topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                            rope_parameters=_yarn(1.0), num_mtp_layers=0, rope_interleave=kind != "v3-halves")


def hf_model(kind: str, seed: int = 0):
    """A seeded random fp32 DeepseekV{2,3}ForCausalLM with eager attention."""
    cfg = hf_config(kind)
    model = (DeepseekV2ForCausalLM if kind == "v2-lite" else DeepseekV3ForCausalLM)(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # std 1/sqrt(fan-in) (initializer_range 0.02 would make the logits of a 256-wide model nearly flat),
        # and 1/sqrt(2 n_layer) less for the projections into the residual stream, as synthetic._init_std, so
        # the random model is not chaotic. Norm weights 1 + 0.1 N(0, 1) so that a misplaced norm shows.
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                std = 1.0 / math.sqrt(p.shape[-1])
                if "o_proj" in name or "down_proj" in name:
                    std /= math.sqrt(2 * cfg.num_hidden_layers)
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # V3's selection bias: nonzero, so it matters
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def rel_rms_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 1024, (4, 20), generator=torch.Generator().manual_seed(1))   # (B, T)


@pytest.fixture(scope="module")
def case(tmp_path_factory, tokens):
    """case(kind) -> (HF model, its logits on `tokens`); gguf(kind, ftype, mla) -> path; both built once."""
    root = tmp_path_factory.mktemp("hf")
    models, files = {}, {}

    def get(kind):
        if kind not in models:
            model = hf_model(kind)
            with torch.no_grad():
                models[kind] = model, model(tokens).logits.float()
        return models[kind]

    def gguf(kind, ftype="f32", mla=True):
        key = (kind, ftype, mla)
        if key not in files:
            m = get(kind)[0]
            cfg = conv.model_config(m.config, mla=mla)
            path = root / f"{kind}-{ftype}-{'mla' if mla else 'kv_b'}-{len(files)}.gguf"
            conv.write(path, cfg, conv.gguf_arrays(m, cfg), ftype)
            files[key] = path
        return files[key]
    return get, gguf


def dslocal_logits(path, tokens, mode="prefill", like_llama_cpp=False) -> torch.Tensor:
    """Logits (B, T, V) of the GGUF at path: the whole sequence at once, or N_PREFILL then one at a time."""
    with open_gguf(path) as f:
        cfg = read_config(f)
        model = load_model(f, cfg, torch.float32, like_llama_cpp=like_llama_cpp)
    B, T = tokens.shape
    with torch.no_grad():
        if mode == "prefill":
            return model(tokens)
        cache = LatentCache(cfg, B, T, torch.float32, "cpu")
        steps = [model(tokens[:, :N_PREFILL], cache, 0)]
        steps += [model(tokens[:, t:t + 1], cache, t) for t in range(N_PREFILL, T)]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("kind", ["v2-lite", "v3"])
def test_yarn_and_attention_scale_match_transformers(kind):
    model = hf_model(kind)
    cfg = conv.model_config(model.config)
    hf_freq = model.model.rotary_emb.inv_freq.double()                  # (R/2,), computed in fp32 by HF
    err = ((rope_frequencies(cfg) - hf_freq).abs() / hf_freq).max().item()
    print(f"\n{kind}: rope frequency rel err {err:.1e}; kq_scale {cfg.kq_scale:.6f} "
          f"(HF {model.model.layers[0].self_attn.scaling:.6f})")
    assert err < 1e-6
    assert model.model.rotary_emb.attention_scaling == 1.0   # HF's cos/sin factor, 1 in llama.cpp's graph
    for layer in model.model.layers:
        assert cfg.kq_scale == pytest.approx(layer.self_attn.scaling, rel=1e-12)


@pytest.mark.parametrize("path", ["modules", "step"])
@pytest.mark.parametrize("mla", [True, False], ids=["mla", "kv_b"])
@pytest.mark.parametrize("kind", ["v2-lite", "v3"])
def test_placed_cpu_decode_matches_transformers(case, tokens, kind, mla, path):
    """The placed runtime on the CPU (offload/hybrid.py): the decode steps' linear layers, attention and norms
    compiled, on the F32 file's rows (attn_k_b / attn_v_b, or float copies of attn_kv_b's halves), through the
    model's modules or as the engine runs them, one compiled step (offload/cpu_step.py)."""
    from dslocal.offload.cpu_step import CPUStep, cpu_step
    from dslocal.offload.hybrid import load_offloaded
    from dslocal.offload.planner import Budget, Hardware, ModelShape, plan
    get, gguf = case
    _, ref = get(kind)
    with open_gguf(gguf(kind, "f32", mla)) as f:
        cfg = read_config(f)
        placement = plan(ModelShape.from_gguf(f, cfg), Hardware(gpu_bytes_free=0), Budget())
        model = load_offloaded(f, cfg, placement, "cpu", torch.float32, None)
        seq = tokens[:1]                                        # the compiled steps take one sequence
        cache = LatentCache(cfg, 1, seq.shape[1], torch.float32, "cpu")
        step = cpu_step(model, cache)
        assert isinstance(step, CPUStep)
        with torch.no_grad():
            steps = [model(seq[:, :N_PREFILL], cache, 0)]
            for t in range(N_PREFILL, seq.shape[1]):
                if path == "step":
                    steps.append(step(int(seq[0, t]), t)[None, None])
                else:
                    steps.append(model(seq[:, t:t + 1], cache, t))
    err = rel_err(torch.cat(steps, dim=1), ref[:1])
    print(f"\n{kind} {'mla' if mla else 'kv_b'} placed CPU decode ({path}) F32: rel err {err:.2e} "
          f"(bound {FP32_BOUND:.0e})")
    assert err < FP32_BOUND


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("mla", [True, False], ids=["mla", "kv_b"])
@pytest.mark.parametrize("kind", ["v2-lite", "v3"])
def test_f32_matches_transformers(case, tokens, kind, mla, mode):
    get, gguf = case
    _, ref = get(kind)
    err = rel_err(dslocal_logits(gguf(kind, "f32", mla), tokens, mode), ref)
    print(f"\n{kind} {'mla' if mla else 'kv_b'} {mode} F32: rel err {err:.2e} (bound {FP32_BOUND:.0e})")
    assert err < FP32_BOUND


# F16 file vs HF with unrounded fp32 weights, the cost of the fp16 weights themselves: (rel err, rel RMS err)
# bounds; measured v2-lite 0.0398 (one routing flip) / 0.0053, v3 0.00056 / 0.00047.
F16_VS_FP32_BOUNDS = {"v2-lite": (0.06, 0.008), "v3": (0.001, 0.001)}


@pytest.mark.parametrize("kind", ["v2-lite", "v3"])
def test_f16_matches_transformers_with_f16_weights(case, tokens, kind):
    get, gguf = case
    model, ref = get(kind)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.ndim >= 2 and not name.endswith("mlp.gate.weight"):   # what the F16 file stores as F16
                p.copy_(p.half().float())
        ref16 = rounded(tokens).logits.float()
    path = gguf(kind, "f16")
    bound, rms_bound = F16_VS_FP32_BOUNDS[kind]
    for mode in ("prefill", "decode"):
        out = dslocal_logits(path, tokens, mode)
        err, err32, rms32 = rel_err(out, ref16), rel_err(out, ref), rel_rms_err(out, ref)
        print(f"\n{kind} {mode} F16: rel err {err:.2e} vs HF with fp16 weights (bound {FP32_BOUND:.0e}); "
              f"vs HF fp32: rel err {err32:.2e} (bound {bound}), rel RMS err {rms32:.2e} (bound {rms_bound})")
        assert err < FP32_BOUND
        assert err32 < bound and rms32 < rms_bound


def test_rope_pair_layout(case, tokens, tmp_path):
    """rotate_half weights (rope_interleave=False) need the converter's permutation; DeepSeek's own do not."""
    get, gguf = case
    halves, ref_halves = get("v3-halves")
    err = rel_err(dslocal_logits(gguf("v3-halves"), tokens), ref_halves)
    model, ref = get("v3")
    cfg = conv.model_config(model.config)
    wrong = {}
    for kind, m, r, permute in (("v3", model, ref, True), ("v3-halves", halves, ref_halves, False)):
        path = tmp_path / f"{kind}-wrong-rope.gguf"
        conv.write(path, cfg, conv.gguf_arrays(m, cfg, permute_rope=permute), "f32")
        wrong[kind] = rel_err(dslocal_logits(path, tokens), r)
    print(f"\nrotate_half weights, permuted: rel err {err:.2e}; wrong layout: interleaved weights permuted "
          f"{wrong['v3']:.2f}, rotate_half weights as stored {wrong['v3-halves']:.2f}")
    assert err < FP32_BOUND
    assert min(wrong.values()) > 0.1


# Each file type against the F32 file of the same weights, loaded plain and like_llama_cpp (activations rounded
# to 8 bits before each quantized product, as llama.cpp's CPU backend does). Measured on 4 x 20 tokens: relative
# error, relative RMS error, share of positions whose top-1 token agrees (the weights' own relative RMS error:
# Q8_0 0.0054, Q6_K 0.018, Q4_K 0.072; attn_k_b, rows of 32, falls back to Q8_0 / Q5_0). The max error is set by
# the tokens at or after a flipped top-k expert choice (Q8_0: 1 flip in V2, 5 in V3; at the positions before
# any flip its rel err is 0.014 in both). The RMS error is about 2x (V2) to 3-7x (V3) the weights'.
#   kind    type  like_llama_cpp  rel err  rel RMS  top-1
#   v2-lite q8_0  no / yes        0.040    0.0121   0.950  /  0.057  0.0182  0.950
#   v2-lite q6_k  no / yes        0.064    0.0417   0.863  /  0.070  0.0443  0.850
#   v2-lite q4_k  no / yes        0.173    0.1466   0.775  /  0.174  0.1469  0.800
#   v3      q8_0  no / yes        0.169    0.0400   0.975  /  0.170  0.0476  0.962
#   v3      q6_k  no / yes        0.209    0.0827   0.875  /  0.207  0.0878  0.850
#   v3      q4_k  no / yes        0.331    0.2146   0.663  /  0.292  0.2137  0.688
# Bounds: those values with headroom.  (kind, ftype): (rel err, rel RMS err, top-1 agreement at least)
QUANT_BOUNDS = {
    ("v2-lite", "q8_0"): (0.08, 0.025, 0.9),
    ("v2-lite", "q6_k"): (0.1, 0.055, 0.8),
    ("v2-lite", "q4_k"): (0.25, 0.19, 0.7),
    ("v3", "q8_0"): (0.25, 0.06, 0.9),
    ("v3", "q6_k"): (0.3, 0.11, 0.8),
    ("v3", "q4_k"): (0.45, 0.28, 0.55),
}


@pytest.mark.parametrize("kind,ftype", list(QUANT_BOUNDS))
def test_quantized_vs_f32_file(case, tokens, kind, ftype):
    _, gguf = case
    f32 = dslocal_logits(gguf(kind, "f32"), tokens)
    path = gguf(kind, ftype)
    with open_gguf(path) as f:
        types = sorted({t.ggml_type.name for t in f.tensors.values()})
    bound, rms_bound, min_top1 = QUANT_BOUNDS[kind, ftype]
    for like in (False, True):
        out = dslocal_logits(path, tokens, like_llama_cpp=like)
        err, rms = rel_err(out, f32), rel_rms_err(out, f32)
        top1 = (out.argmax(-1) == f32.argmax(-1)).float().mean().item()
        print(f"\n{kind} {ftype} ({'/'.join(types)}) like_llama_cpp={like}: rel err {err:.3f} (bound {bound}), "
              f"rel RMS err {rms:.4f} (bound {rms_bound}), top-1 agreement {top1:.3f} (at least {min_top1})")
        assert err < bound and rms < rms_bound and top1 >= min_top1
