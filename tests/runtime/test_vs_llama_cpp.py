"""The reference model against llama.cpp itself on the same GGUF files (llama-cpp-python).

F32 files: the same logits (llama.cpp with an F32 KV cache) and the same greedy continuation.
Quantized files: llama.cpp rounds activations to 8-bit blocks before each product with a quantized weight;
the reference does the same (like_llama_cpp), and then differs from llama.cpp only where one of those
roundings lands on the other side of a half step because an input differs in its last bits (llama.cpp's
own exp/silu approximations). Such a flip moves a layer's output by ~0.1%, and random models amplify it,
so we check: single tokens agree to fp32 noise almost always, and along llama.cpp's greedy path our choice
is the same at every step that is not a near tie. (llama.cpp disagrees with itself the same way: on these
files its flash-attention and plain attention paths give different greedy continuations after 4-23 tokens.)
"""
import llama_cpp
import numpy as np
import pytest
import torch

from dslocal.quant.gguf_file import open_gguf
from dslocal.runtime.config import read_config
from dslocal.runtime.model import LatentCache
from dslocal.runtime.weights import load_model

PROMPTS = [b"The quick brown fox", b"def main(argv=None):", "深度求索的专家".encode()]


def _models(path, **llama_kw):
    with open_gguf(path) as f:
        cfg = read_config(f)
        ours = load_model(f, cfg)
    ref = llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=2, verbose=False, logits_all=True,
                          flash_attn=False, **llama_kw)
    return cfg, ours, ref


def _rel_err(a, b):
    return np.abs(a - b).max(-1) / np.abs(b).max(-1)


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_f32_logits_prefill_and_decode(tiny_gguf, preset):
    cfg, ours, ref = _models(tiny_gguf(preset, "f32"), type_k=0, type_v=0)
    try:
        tokens = ref.tokenize(b"Hello world, this is a test of the latent cache.", add_bos=True)
        ref.eval(tokens)
        want = np.array(ref.scores[:len(tokens)])
        with torch.no_grad():
            prefill = ours(torch.tensor([tokens]))[0].numpy()
            cache = LatentCache(cfg, 1, 64, torch.float32, "cpu")
            steps = [ours(torch.tensor([tokens[:4]]), cache, 0)[0]]
            steps += [ours(torch.tensor([[t]]), cache, i)[0] for i, t in enumerate(tokens[4:], start=4)]
            decode = torch.cat(steps).numpy()
        print(f"{preset}: prefill max rel err {_rel_err(prefill, want).max():.2e}, "
              f"decode {_rel_err(decode, want).max():.2e}")
        assert _rel_err(prefill, want).max() < 1e-4
        assert _rel_err(decode, want).max() < 1e-4
    finally:
        ref.close()


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_f32_greedy_continuation_is_identical(tiny_gguf, greedy, preset):
    # llama.cpp with its default F16 KV cache, as a user runs it
    cfg, ours, ref = _models(tiny_gguf(preset, "f32"))
    try:
        for text in PROMPTS:
            prompt = ref.tokenize(text, add_bos=True)
            want, _ = greedy.llama(ref, prompt, 32)
            got = greedy.dslocal(ours, cfg, prompt, 32)
            assert got == want, (text, got, want)
    finally:
        ref.close()


@pytest.mark.parametrize("preset,ftype", [("tiny-v2", "q8_0"), ("tiny-v3", "q8_0"), ("tiny-v2", "q4_k"),
                                          ("tiny-v3", "q4_k_m")])
def test_quantized_single_tokens_match_to_fp32_noise(tiny_gguf, preset, ftype):
    cfg, ours, ref = _models(tiny_gguf(preset, ftype), type_k=0, type_v=0)
    try:
        errs = []
        for t in range(6, cfg.vocab_size, 17):
            ref.reset()
            ref.eval([t])
            with torch.no_grad():
                got = ours(torch.tensor([[t]]))[0, 0].numpy()
            errs.append(_rel_err(got, np.array(ref.scores[0])))
        errs = np.array(errs)
        print(f"{preset} {ftype}: median rel err {np.median(errs):.1e}, "
              f"share below 1e-4 {(errs < 1e-4).mean():.2f}, max {errs.max():.1e}")
        assert np.median(errs) < 1e-5           # measured 2-3e-7: the same arithmetic
        assert (errs < 1e-4).mean() > 0.8       # measured 0.87-0.94; the rest are rounding flips
    finally:
        ref.close()


@pytest.mark.parametrize("preset,ftype", [("tiny-v2", "q8_0"), ("tiny-v3", "q8_0"), ("tiny-v2", "q4_k"),
                                          ("tiny-v3", "q4_k_m")])
def test_quantized_greedy_choices_match_except_near_ties(tiny_gguf, greedy, preset, ftype):
    cfg, ours, ref = _models(tiny_gguf(preset, ftype), type_k=0, type_v=0)
    try:
        agree, steps, worst_gap = 0, 0, 0.0
        for text in PROMPTS:
            prompt = ref.tokenize(text, add_bos=True)
            cont, want = greedy.llama(ref, prompt, 32)
            seq = prompt + cont
            with torch.no_grad():
                got = ours(torch.tensor([seq[:-1]]))[0, len(prompt) - 1:].numpy()
            top2 = np.sort(want, -1)[:, -2:]
            gap = (top2[:, 1] - top2[:, 0]) / np.abs(want).max(-1)   # llama.cpp's own margin
            same = got.argmax(-1) == want.argmax(-1)
            agree, steps = agree + same.sum(), steps + len(same)
            worst_gap = max(worst_gap, gap[~same].max(initial=0.0))
        print(f"{preset} {ftype}: same greedy choice at {agree}/{steps} steps; "
              f"largest llama.cpp top-2 gap where we differ {worst_gap:.3f}")
        assert agree >= 0.9 * steps             # measured 90-95 of 96
        # measured at most 0.034 of the logit range with llama.cpp built on a Zen 4 machine, 0.070 on an
        # AVX512-FP16 Xeon (the same dslocal code: llama.cpp picks its CPU kernels, and their rounding, by
        # the build machine's instruction set)
        assert worst_gap < 0.1
    finally:
        ref.close()
