"""The synthetic model builder: llama-quantize's type mix, valid random blocks, hot experts."""
import numpy as np
import pytest

from dslocal.quant import synthetic
from dslocal.quant.dequant import dequantize
from dslocal.quant.ggml import GGMLType as T
from dslocal.quant.ggml import nbytes
from dslocal.quant.gguf_file import open_gguf
from dslocal.runtime.config import check_tensors, read_config, tensor_specs


def _q4_k_m_bytes(cfg):
    total = routed = 0
    for s in tensor_specs(cfg):
        if s.required or s.name == "output.weight" or (s.name.endswith("exp_probs_b.bias") and cfg.gating == 2):
            b = nbytes(synthetic.choose_type(s.name, s.shape, "q4_k_m", cfg.n_layer), int(np.prod(s.shape)))
            total += b
            if "_exps." in s.name:
                routed += b // cfg.n_expert * cfg.n_expert_used
    return total, routed


def test_q4_k_m_mix_matches_llama_quantize_sizes():
    # gguf-deepseek2.md section 7: V2-Lite Q4_K_M is 10.37 GB (9.65 GiB) and reads 0.89 GB of routed
    # experts per token; issue text: a V3 slice of 1 dense + 3 MoE layers is 21.4 GiB, 0.21 GB per layer.
    total, routed = _q4_k_m_bytes(synthetic.preset("v2-lite"))
    assert total / 2**30 == pytest.approx(9.65, abs=0.01) and routed / 1e9 == pytest.approx(0.89, abs=0.01)
    total, routed = _q4_k_m_bytes(synthetic.preset("v3"))
    assert total / 2**30 == pytest.approx(21.4, abs=0.05) and routed / 3 / 1e9 == pytest.approx(0.218, abs=0.005)


def test_fallback_types_for_short_rows():
    cfg = synthetic.preset("v2-lite")
    assert synthetic.choose_type("blk.3.attn_k_b.weight", (16, 512, 128), "q4_k_m", 27) == T.Q5_0
    assert synthetic.choose_type("blk.3.ffn_down_exps.weight", (64, 2048, 1408), "q4_k_m", 27) == T.Q5_0
    assert synthetic.choose_type("blk.0.ffn_down_exps.weight", (64, 2048, 1408), "q4_k_m", 27) == T.Q8_0
    assert synthetic.choose_type("blk.3.ffn_gate_inp.weight", (64, 2048), "q4_k_m", 27) == T.F32
    assert synthetic.choose_type("output.weight", (cfg.vocab_size, 2048), "q4_k_m", 27) == T.Q6_K
    assert synthetic.choose_type("blk.3.attn_q.weight", (3072, 2048), "q6_k", 27) == T.Q6_K


@pytest.mark.parametrize("ftype", ["f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k",
                                   "q5_k", "q6_k"])
def test_random_blocks_have_the_intended_scale(tmp_path, ftype):
    path = tmp_path / "m.gguf"
    synthetic.build(str(path), synthetic.preset("tiny-v2"), ftype, method="blocks")
    with open_gguf(path) as f:
        check_tensors(read_config(f), f)
        for name in ("blk.1.ffn_up_exps.weight", "blk.2.attn_output.weight"):
            t = f.tensors[name]
            w = dequantize(f.raw(name), t.ggml_type)
            assert np.isfinite(w).all(), name
            want = synthetic._init_std(name, t.shape, 4)
            assert w.std() == pytest.approx(want, rel=0.15), (name, t.ggml_type.name)
            assert abs(w.mean()) < 0.1 * want, (name, t.ggml_type.name)


def _first_layer_routing(path):
    """Expert selection counts of the first MoE layer with token embeddings as its input."""
    with open_gguf(path) as f:
        cfg = read_config(f)
        layer = cfg.n_dense_lead
        x = dequantize(f.raw("token_embd.weight"), f.tensors["token_embd.weight"].ggml_type)
        h = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_eps)
        router = dequantize(f.raw(f"blk.{layer}.ffn_gate_inp.weight"), T.F32)
        top = np.argsort(-(h @ router.T), axis=-1)[:, :cfg.n_expert_used]
        return np.bincount(top.reshape(-1), minlength=cfg.n_expert) / top.size


def test_hot_experts_skew_the_router(tiny_gguf):
    uniform = np.sort(_first_layer_routing(tiny_gguf("tiny-v3", "q8_0")))[::-1]
    skewed = np.sort(_first_layer_routing(tiny_gguf("tiny-v3", "q8_0", hot=synthetic.HotExperts(0.25, 3.0))))[::-1]
    n_hot = 4   # 25% of 16
    print(f"share of the 4 most used of 16 experts: uniform {uniform[:n_hot].sum():.2f}, "
          f"hot {skewed[:n_hot].sum():.2f}")
    assert uniform[:n_hot].sum() < 0.45
    assert skewed[:n_hot].sum() > 0.8


def test_presets_with_other_layer_counts():
    cfg = synthetic.preset("v3", n_layer=6, n_dense=3)
    assert cfg.n_layer == 6 and cfg.n_layer_moe == 3
    with pytest.raises(ValueError, match="--dense"):
        synthetic.preset("v3", n_layer=2, n_dense=3)
