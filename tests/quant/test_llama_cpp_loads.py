"""Files the synthetic builder writes load and run in llama.cpp itself (through llama-cpp-python)."""
import llama_cpp
import pytest

from dslocal.quant import synthetic


@pytest.mark.parametrize("preset,ftype,method", [
    ("tiny-v2", "f32", "quantize"), ("tiny-v2", "q8_0", "quantize"), ("tiny-v3", "q4_k_m", "quantize"),
    ("tiny-v3", "q6_k", "blocks"), ("tiny-v2", "q2_k", "blocks")])
def test_llama_cpp_loads_and_generates(tiny_gguf, preset, ftype, method):
    path = tiny_gguf(preset, ftype, method=method)
    cfg = synthetic.PRESETS[preset]
    m = llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=2, verbose=False)
    try:
        assert m.n_vocab() == cfg.vocab_size and m.n_embd() == cfg.hidden
        assert m.metadata["general.architecture"] == "deepseek2"
        ids = m.tokenize("Hello world, 你好! 🙂".encode(), add_bos=True, special=False)
        assert ids[0] == 0 and len(ids) > 5
        out = m.create_completion("The model", max_tokens=4, temperature=0.0)
        assert out["usage"]["prompt_tokens"] > 0
    finally:
        m.close()
