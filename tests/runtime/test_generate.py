"""Generation: sampling settings, stop conditions, the context limit and reuse of the cached prefix."""
import dataclasses

import pytest
import torch

from dslocal.runtime import generate
from dslocal.runtime.generate import ContextFull, OutOfMemory
from dslocal.runtime.load import RunConfig, load
from dslocal.runtime.sampling import Sampling, apply_repetition_penalty, sample

GREEDY = Sampling(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def loaded(tiny_gguf):
    return load(tiny_gguf("tiny-v2", "q8_0"), RunConfig(context=64))


def _run(engine, prompt, s):
    pieces = list(engine.generate(prompt, s))
    return "".join(p.text for p in pieces), pieces[-1]


def test_greedy_stream_is_the_argmax_path(loaded, greedy):
    e = loaded.engine
    prompt = e.tokenizer.encode("The quick brown fox")
    e.reset()
    pieces = list(e.generate(prompt, GREEDY))
    tokens = [p.token for p in pieces if p.token is not None]
    assert pieces[-1].finish in ("length", "eos")
    want = greedy.dslocal(e.model, e.cfg, prompt, pieces[-1].stats.generated_tokens, str(e.device))
    # pieces hold back incomplete characters, so compare the decoded text and the ids that were shown
    assert "".join(p.text for p in pieces) == e.tokenizer.decode(want)
    assert set(tokens) <= set(want)


def test_prefix_of_a_longer_prompt_comes_from_the_cache(loaded):
    e = loaded.engine
    first = e.tokenizer.encode("One two three four five")
    e.reset()
    _run(e, first, GREEDY)
    n_cached = len(e.cached)
    longer = list(e.cached) + e.tokenizer.encode(" six seven", add_bos=False)
    text, last = _run(e, longer, GREEDY)
    assert last.stats.prefilled_tokens == len(longer) - n_cached
    e.reset()
    fresh, _ = _run(e, longer, GREEDY)
    assert text == fresh


def test_a_long_prompt_is_prefilled_in_pieces(loaded, monkeypatch):
    """A prompt longer than PREFILL_CHUNK goes through the model in pieces, each attending to the cache the
    ones before it wrote: the same answer and (within rounding) the same latents as in one pass."""
    e = loaded.engine
    prompt = e.tokenizer.encode("The quick brown fox jumps over the lazy dog again and again")
    e.reset()
    whole, _ = _run(e, prompt, GREEDY)
    kv = e.cache.kv[:, :, :len(prompt) - 1].clone()
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 3)
    calls = []
    hidden = e.model.hidden
    monkeypatch.setattr(e.model, "hidden",
                        lambda tokens, cache, start: calls.append(start) or hidden(tokens, cache, start))
    e.reset()
    pieces, last = _run(e, prompt, GREEDY)
    assert calls == list(range(0, len(prompt) - 1, 3)) and last.stats.prefilled_tokens == len(prompt)
    assert pieces == whole
    # the CPU kernels take other paths for other token counts (one-token rows on 8-bit activations, bf16
    # products for many tokens): 0.9-2.2e-3 apart, growing over the layers; a piece attending to the wrong
    # positions would be ~1 apart
    got = e.cache.kv[:, :, :len(prompt) - 1]
    err = [((got[i] - kv[i]).norm() / kv[i].norm()).item() for i in range(kv.shape[0])]
    print("relative error of each layer's latents:", " ".join(f"{x:.1e}" for x in err))
    assert max(err) < 1e-2


def test_running_out_of_gpu_memory_is_one_sentence(loaded, monkeypatch):
    """The device's out-of-memory error during a prompt becomes OutOfMemory (a ValueError: the commands
    print it and exit with the usage code), the cache keeps only what it held before."""
    e = loaded.engine
    prompt = e.tokenizer.encode("One two three")
    e.reset()
    _run(e, prompt, GREEDY)

    def no_room(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(e.model, "hidden", no_room)
    with pytest.raises(OutOfMemory, match=r"ran out of memory for a prompt of \d+ new tokens; give the run less"):
        list(e.generate(e.tokenizer.encode("Four five six seven eight"), GREEDY))
    assert e.cached == prompt[:1]       # the shared first token (BOS) is all the cache still vouches for


def test_seeded_sampling_repeats_and_seeds_differ(loaded):
    e = loaded.engine
    prompt = e.tokenizer.encode("Once upon a time")
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, max_tokens=16)
    a, _ = _run(e, prompt, s)
    b, _ = _run(e, prompt, s)
    c, _ = _run(e, prompt, dataclasses.replace(s, seed=8))
    assert a == b and a != c


def test_max_tokens_stop_strings_and_context(loaded):
    e = loaded.engine
    prompt = e.tokenizer.encode("Hello")
    text, last = _run(e, prompt, GREEDY)
    assert last.finish == "length" and last.stats.generated_tokens == GREEDY.max_tokens
    stop = text[3:6]                                   # a string the greedy answer is known to contain
    cut, last = _run(e, prompt, dataclasses.replace(GREEDY, stop=(stop,)))
    assert last.finish == "stop" and cut == text[:text.find(stop)]
    _, last = _run(e, prompt, dataclasses.replace(GREEDY, max_tokens=500))
    assert last.finish == "context" and len(e.cached) == e.context_length
    with pytest.raises(ContextFull, match="context holds 64"):
        list(e.generate(list(range(10, 80)), GREEDY))


def test_end_of_turn_token_ends_the_answer(loaded, greedy):
    e = loaded.engine
    prompt = e.tokenizer.encode("Hello")
    first = greedy.dslocal(e.model, e.cfg, prompt, 3, str(e.device))[2]
    saved = e.tokenizer.eot_ids
    e.tokenizer.eot_ids = frozenset(saved) | {first}
    try:
        text, last = _run(e, prompt, GREEDY)
    finally:
        e.tokenizer.eot_ids = saved
    assert last.finish == "eos" and last.stats.generated_tokens == 2


def test_sampling_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    only_best = [Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_k=0, top_p=0.01),
                 Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.99), Sampling(temperature=0.0)]
    for s in only_best:
        assert {sample(logits, s, [], g) for _ in range(20)} == {0}, s
    wide = Sampling(temperature=5.0, top_k=0, top_p=1.0, min_p=0.0)
    assert len({sample(logits, wide, [], g) for _ in range(200)}) == 5
    two = Sampling(temperature=5.0, top_k=2, top_p=1.0, min_p=0.0)
    assert {sample(logits, two, [], g) for _ in range(200)} == {0, 1}


def test_repetition_penalty_as_llama_cpp():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_bad_settings_are_refused():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(min_p=1), dict(max_tokens=0),
                dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            Sampling(**bad).check()
