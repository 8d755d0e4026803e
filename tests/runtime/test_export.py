"""Export: a trained checkpoint -> deepseek2 GGUF, checked against the torch checkpoint and against llama.cpp.

A briefly trained model (not a random one) has decisive logits, so llama.cpp's greedy continuation must
equal ours token for token in F32, and in Q8_0 (with like_llama_cpp activation rounding) at every step
but near ties: where llama.cpp's own top-2 margin is under NEAR_TIE of its logit range, the order of its
CPU kernels' sums (chosen by the build machine's instruction set) can flip the choice.
"""
import dataclasses

import llama_cpp
import numpy as np
import pytest
import sentencepiece
import torch

from dslocal.quant.gguf_file import open_gguf
from dslocal.runtime import data, export, train
from dslocal.runtime.chat import ChatTemplate
from dslocal.runtime.config import read_config
from dslocal.runtime.model import DeepSeek
from dslocal.runtime.tokenizer import Tokenizer
from dslocal.runtime.weights import load_model

# rows of 256 so that Q4_K / Q6_K apply to the embeddings, the experts and the dense FFN
CFG = dataclasses.replace(train.PRESETS["nano"], name="export-test", hidden=256, n_layer=2, n_head=2,
                          kv_lora_rank=64, dense_ffn=256, n_expert=4, expert_ffn=256, n_mtp=1)
TC = train.TrainConfig(steps=100, batch=8, seq_len=64, lr=3e-3, warmup=10, eval_every=1000, log_every=1000,
                       ckpt_every=1000, bias_speed=1e-2)
NEAR_TIE = 0.02    # of llama.cpp's logit range
TEXTS = ["Once upon a time, Mia the fox lived in the forest.", "12 + 34 = 46.", "Hello, wörld! 深度 🙂\ttab  two",
         " leading space", ""]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("export")
    docs, chats = data.generate_corpus(3000, 0, seed=11)
    sp_model = data.train_tokenizer(docs, 400)
    vocab = data.vocab_metadata(sp_model)
    tok, _ = data.tokenizer_from_metadata(vocab)
    cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size)
    state = train.train(cfg, TC, data.text_stream(tok, docs), None, vocab, str(root))
    print(f"trained: loss {state.history[0][1]:.3f} -> {state.history[-1][1]:.3f}")
    ckpt = str(root / "ckpt.pt")
    blob = train.load_checkpoint(ckpt)
    model = DeepSeek(blob["cfg"]).eval()
    model.load_state_dict({k: v for k, v in blob["model"].items() if not k.startswith("mtp.")})
    files = {}
    for t in ["f32", "f16", "bf16", "q8_0", "q4_k", "q6_k"]:
        files[t] = str(root / f"m-{t}.gguf")
        export.export(ckpt, files[t], t)
    files["f32-no-mtp"] = str(root / "m-f32-no-mtp.gguf")
    export.export(ckpt, files["f32-no-mtp"], "f32", mtp=False)
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(sp_model)
    return dict(model=model, files=files, sp=sp, cfg=blob["cfg"], last_loss=state.history[-1][1])


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].numpy()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


TOKENS = [1, 5, 300, 17, 42, 99, 260, 261, 7, 8, 200, 100, 64]


def test_training_learned_something(trained):
    assert trained["last_loss"] < 2.0


def test_f32_logits_equal_the_checkpoint(trained):
    want = _logits(trained["model"], TOKENS)
    for key in ["f32", "f32-no-mtp"]:
        with open_gguf(trained["files"][key]) as f:
            cfg = read_config(f)
            got = _logits(load_model(f, cfg, like_llama_cpp=False), TOKENS)
        print(f"{key}: max rel err {_rel(got, want):.1e}")
        assert _rel(got, want) < 1e-5
    with open_gguf(trained["files"]["f32"]) as f, open_gguf(trained["files"]["f32-no-mtp"]) as g:
        assert read_config(f).n_mtp == 1 and read_config(g).n_mtp == 0
        assert "blk.2.nextn.eh_proj.weight" in f.tensors and "blk.2.ffn_gate_exps.weight" in f.tensors
        assert not any(n.startswith("blk.2.") for n in g.tensors)


# max abs error over the logit range (weights rounded only, no activation rounding), measured on this model
# (100 steps): f16 2.2e-4, bf16 4.8e-3, q8_0 6.6e-3, q6_k 2.8e-2, q4_k 1.1e-1 (150 steps: f16 4.9e-4, bf16 2.5e-3,
# q8_0 1.1e-2); the bounds are about 3x the largest
BOUNDS = {"f16": 1.5e-3, "bf16": 1.5e-2, "q8_0": 3.3e-2, "q6_k": 8e-2, "q4_k": 3e-1}


@pytest.mark.parametrize("ftype", list(BOUNDS))
def test_quantized_logits_within_measured_bounds(trained, ftype):
    want = _logits(trained["model"], TOKENS)
    with open_gguf(trained["files"][ftype]) as f:
        got = _logits(load_model(f, read_config(f), like_llama_cpp=False), TOKENS)
    err = _rel(got, want)
    print(f"{ftype}: max rel err {err:.1e} (bound {BOUNDS[ftype]:.0e})")
    assert err < BOUNDS[ftype]
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.fixture(scope="module")
def llamas(trained):
    made = {}

    def get(key):
        if key not in made:
            made[key] = llama_cpp.Llama(model_path=trained["files"][key], n_ctx=256, n_threads=2, verbose=False,
                                        flash_attn=False, logits_all=True)
        return made[key]
    yield get
    for m in made.values():
        m.close()


def test_llama_cpp_tokenizes_like_dslocal_and_sentencepiece(trained, llamas):
    ref = llamas("f32")
    with open_gguf(trained["files"]["f32"]) as f:
        tok, template = Tokenizer.from_gguf(f), ChatTemplate.from_gguf(f)
    for text in TEXTS:
        ours = tok.encode(text)
        assert ours == [tok.bos_id] + trained["sp"].encode(text), text
        assert ref.tokenize(text.encode(), add_bos=True, special=True) == ours, text
    prompt = template.render([{"role": "user", "content": "What is 12 + 34?"},
                              {"role": "assistant", "content": "12 + 34 = 46."},
                              {"role": "user", "content": "Thanks"}])
    ids = tok.encode(prompt, add_bos=False)     # the template writes the BOS
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
    assert ref.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    assert tok.token_to_id("<｜User｜>") in ids and tok.token_to_id("<｜Assistant｜>") in ids


@pytest.mark.parametrize("ftype", ["f32", "q8_0"])
def test_llama_cpp_greedy_continuation_is_identical(trained, llamas, greedy, ftype):
    path = trained["files"][ftype]
    with open_gguf(path) as f:
        cfg = read_config(f)
        model = load_model(f, cfg, like_llama_cpp=True)
        tok = Tokenizer.from_gguf(f)
    ref = llamas(ftype)
    prompts = ["Once upon a time, Leo the", "45 + 21 = 66.\n13 + 50 =", "Tom has 12 apples.", "The"]
    for text in prompts:
        ids = tok.encode(text)
        (want, scores), ours = greedy.llama(ref, ids, 24), greedy.dslocal(model, cfg, ids, 24)
        print(f"{ftype} {text!r} -> {tok.decode(ours)!r}")
        if ftype == "f32":
            assert ours == want, (text, tok.decode(ours), tok.decode(want))
            continue
        # teacher-forced on llama.cpp's continuation: the same choice at every step that is not a near tie
        with torch.no_grad():
            logits = model(torch.tensor([ids + want[:-1]]))[0, len(ids) - 1:].numpy()
        top2 = np.sort(scores, -1)[:, -2:]
        margin = (top2[:, 1] - top2[:, 0]) / np.abs(scores).max(-1)
        differ = logits.argmax(-1) != scores.argmax(-1)
        print(f"  {differ.sum()} of {len(want)} steps differ, llama.cpp's margins there {margin[differ]}")
        assert not (differ & (margin >= NEAR_TIE)).any(), (text, tok.decode(ours), tok.decode(want))
