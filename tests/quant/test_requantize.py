"""`dslocal quantize`: re-quantization keeps metadata, follows choose_type, equals quantizing the dequantized
weights directly, and the result loads in dslocal and llama.cpp."""
import llama_cpp
import numpy as np
import pytest

from dslocal.gui import cli
from dslocal.quant.dequant import load_tensor
from dslocal.quant.ggml import GGMLType
from dslocal.quant.gguf_file import open_gguf
from dslocal.quant.quantize import quantize
from dslocal.quant.requantize import requantize
from dslocal.quant.synthetic import choose_type
from dslocal.runtime.config import read_config
from dslocal.runtime.weights import load_model


@pytest.mark.parametrize("src_type,preset,ftype", [("q8_0", "tiny-v2", "q4_k"), ("f16", "tiny-v3", "q4_k_m"),
                                                   ("q4_k", "tiny-v2", "q8_0")])
def test_requantize_is_quantize_of_dequantized(tiny_gguf, tmp_path, src_type, preset, ftype):
    src = tiny_gguf(preset, src_type)
    dst = str(tmp_path / "out.gguf")
    requantize(src, dst, ftype)
    with open_gguf(src) as f, open_gguf(dst) as g:
        cfg = read_config(f)
        assert read_config(g) == cfg
        keep = {k: v for k, v, _ in f.items() if k != "general.file_type"}
        assert {k: v for k, v, _ in g.items() if k != "general.file_type"}.keys() == keep.keys()
        assert g.get("tokenizer.ggml.tokens") == f.get("tokenizer.ggml.tokens")
        assert list(g.tensors) == list(f.tensors)
        for name, t in f.tensors.items():
            want_type = choose_type(name, t.shape, ftype, cfg.n_layer)
            assert g.tensors[name].ggml_type == want_type, name
            want = quantize(load_tensor(f, name), want_type)
            assert np.array_equal(g.raw(name).reshape(want.shape), want), name
        load_model(g, read_config(g))
    # logits_all: the binding writes its scores array (allocated uninitialised) only then
    ref = llama_cpp.Llama(model_path=dst, n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    try:
        ref.eval(ref.tokenize(b"Hello world", add_bos=True))
        scores = np.array(ref.scores[:ref.n_tokens])
        assert scores.shape[0] > 1 and np.isfinite(scores).all() and scores.std(axis=1).min() > 0
    finally:
        ref.close()


def test_cli_quantize(tiny_gguf, tmp_path, capsys):
    dst = str(tmp_path / "q6.gguf")
    assert cli.main(["quantize", tiny_gguf("tiny-v2", "q8_0"), dst, "--type", "q6_k"]) == 0
    assert "Q8_0 -> Q6_K" in capsys.readouterr().err
    with open_gguf(dst) as g:
        assert g.tensors["blk.1.ffn_up_exps.weight"].ggml_type == GGMLType.Q6_K
        assert g.get("general.file_type") == 18
    assert cli.main(["quantize", str(tmp_path / "missing.gguf"), dst, "--type", "q4_k"]) == 2
