"""The model bundled with the package loads and answers held-out arithmetic (pairs never trained on)."""
import os

import llama_cpp
import pytest

from dslocal.gui import cli
from dslocal.quant.gguf_file import open_gguf
from dslocal.runtime import data
from dslocal.runtime.config import read_config
from dslocal.runtime.tokenizer import Tokenizer
from dslocal.runtime.weights import load_model
from dslocal.runtime.load import RunConfig, default_model, load
from dslocal.runtime.sampling import Sampling


def test_bundled_model_answers_held_out_additions():
    path = default_model()
    assert os.path.getsize(path) < 25e6
    loaded = load(path, RunConfig(context=256))
    greedy = Sampling(temperature=0.0, max_tokens=16)
    questions = [q for q in data.held_out_questions(40) if q[0] == "addition"][:12]
    wrong = []
    for _, question, answer in questions:
        ids = loaded.template.encode(loaded.engine.tokenizer, [{"role": "user", "content": question}])
        text = "".join(p.text for p in loaded.engine.generate(ids, greedy))
        a, b = (int(x) for x in question.removeprefix("What is ").rstrip("?").split(" + "))
        assert data.is_held_out(a, b)
        if text.strip() != f"{a} + {b} = {answer}.":
            wrong.append((question, text))
    assert not wrong, wrong


@pytest.mark.parametrize("ftype", ["q8_0", "q4_k"])
def test_bundled_model_greedy_output_equals_llama_cpp(tmp_path, greedy, ftype):
    """A trained model has decisive logits, so quantized greedy output must match llama.cpp token for token
    (on random models near ties make this ill-posed: see tests/runtime/test_vs_llama_cpp.py)."""
    path = default_model()
    if ftype != "q8_0":
        path = str(tmp_path / f"nano-{ftype}.gguf")
        assert cli.main(["quantize", default_model(), path, "--type", ftype]) == 0
    with open_gguf(path) as f:
        cfg = read_config(f)
        model = load_model(f, cfg, like_llama_cpp=True)
        tok = Tokenizer.from_gguf(f)
    ref = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    try:
        for text in ["Once upon a time, Mia the", "What is 12 + 34?", "Sam has 40 coins. Sam gets 17 more"]:
            prompt = tok.encode(text)
            want, _ = greedy.llama(ref, prompt, 32)
            got = greedy.dslocal(model, cfg, prompt, 32)
            assert got == want, (text, tok.decode(got), tok.decode(want))
    finally:
        ref.close()
