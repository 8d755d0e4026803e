"""ModelConfig: metadata round trip, llama.cpp's defaults and the derived attention scale."""
import dataclasses

import numpy as np
import pytest

from dslocal.quant import synthetic
from dslocal.quant.gguf_file import GGUFError, ValueType, open_gguf
from dslocal.quant.gguf_writer import write_gguf
from dslocal.runtime.config import config_metadata, read_config


def _f32(x):
    return float(np.float32(x))


@pytest.mark.parametrize("preset", list(synthetic.PRESETS))
def test_metadata_round_trip(tmp_path, preset):
    cfg = synthetic.PRESETS[preset]
    path = tmp_path / "m.gguf"
    write_gguf(path, config_metadata(cfg), [])
    with open_gguf(path) as f:
        back = read_config(f)
    # floats are stored as FLOAT32; mscale_all_dim as 0.1 * value
    want = dataclasses.replace(cfg, rms_eps=_f32(cfg.rms_eps), rope_base=_f32(cfg.rope_base),
                               rope_factor=_f32(cfg.rope_factor), rope_attn_factor=_f32(cfg.rope_attn_factor),
                               expert_weights_scale=_f32(cfg.expert_weights_scale),
                               mscale_all_dim=_f32(0.1 * cfg.mscale_all_dim) / 0.1)
    assert back == want


@pytest.mark.parametrize("preset,kq_scale", [
    # gguf-deepseek2.md section 4, computed as llama.cpp does (llama-context.cpp, deepseek2.cpp)
    ("v2-lite", 0.114721), ("v3", 0.135234), ("tiny-v2", 0.198703), ("tiny-v3", 0.234233)])
def test_kq_scale_matches_llama_cpp(preset, kq_scale):
    assert synthetic.PRESETS[preset].kq_scale == pytest.approx(kq_scale, abs=2e-6)


def _write_meta(tmp_path, edit):
    meta = [kv for kv in config_metadata(synthetic.PRESETS["tiny-v3"])]
    meta = edit(meta)
    path = tmp_path / "m.gguf"
    write_gguf(path, meta, [])
    return open_gguf(path)


def test_defaults_follow_llama_cpp(tmp_path):
    optional = ("deepseek2.expert_gating_func", "deepseek2.rope.freq_base", "deepseek2.expert_weights_norm",
                "deepseek2.attention.head_count_kv", "deepseek2.rope.scaling.type",
                "deepseek2.rope.scaling.factor", "deepseek2.expert_group_count",
                "deepseek2.expert_group_used_count")
    with _write_meta(tmp_path, lambda m: [kv for kv in m if kv[0] not in optional]) as f:
        cfg = read_config(f)
    assert cfg.gating == 1 and cfg.rope_base == 10000.0 and cfg.expert_weights_norm is False
    assert cfg.n_head_kv == cfg.n_head and cfg.rope_scaling == "linear" and cfg.rope_factor == 1.0
    assert cfg.kq_scale == pytest.approx(1 / np.sqrt(64))


def test_lite_layer_count_makes_q_lora_optional(tmp_path):
    cfg = synthetic.PRESETS["v2-lite"]
    path = tmp_path / "m.gguf"
    write_gguf(path, [kv for kv in config_metadata(cfg) if "q_lora" not in kv[0]], [])
    with open_gguf(path) as f:
        assert read_config(f).q_lora_rank == 0
    with _write_meta(tmp_path, lambda m: [kv for kv in m if "q_lora" not in kv[0]]) as f:
        with pytest.raises(GGUFError, match="q_lora_rank' is missing"):
            read_config(f)


def test_key_types_are_checked_like_llama_cpp(tmp_path):
    def int32_count(meta):
        return [(k, v, ValueType.INT32 if k == "deepseek2.expert_count" else t) for k, v, t in meta]
    with _write_meta(tmp_path, int32_count) as f:
        with pytest.raises(GGUFError, match="expert_count' has type INT32, expected UINT32"):
            read_config(f)


def test_per_layer_arrays(tmp_path):
    def as_array(values):
        def edit(meta):
            return [(k, values if k == "deepseek2.attention.head_count" else v, t) for k, v, t in meta]
        return edit
    with _write_meta(tmp_path, as_array([4] * 5)) as f:
        assert read_config(f).n_head == 4
    with _write_meta(tmp_path, as_array([4, 4, 8, 4, 4])) as f:
        with pytest.raises(GGUFError, match="per-layer values"):
            read_config(f)


def test_other_architecture_is_refused(tmp_path):
    def llama(meta):
        return [(k, "llama" if k == "general.architecture" else v, t) for k, v, t in meta]
    with _write_meta(tmp_path, llama) as f:
        with pytest.raises(GGUFError, match="architecture 'llama'"):
            read_config(f)


def test_scaling_factor_without_type_is_linear_as_in_llama_cpp(tmp_path):
    from dslocal.runtime.model import rope_frequencies
    with _write_meta(tmp_path, lambda m: [kv for kv in m if kv[0] != "deepseek2.rope.scaling.type"]) as f:
        cfg = read_config(f)
    assert cfg.rope_scaling == "linear" and cfg.rope_factor == 40.0
    plain = dataclasses.replace(cfg, rope_scaling="none", rope_factor=1.0)
    assert np.allclose(rope_frequencies(cfg).numpy(), rope_frequencies(plain).numpy() / 40.0)
