"""The GGUF tokenizers give llama.cpp's token ids (and sentencepiece's, for SentencePiece vocabularies).

References: llama.cpp through llama-cpp-python (Llama(vocab_only=True).tokenize, llama_detokenize) and the
sentencepiece library. Vocabularies: the synthetic models' small byte-level BPE (pre deepseek-llm,
deepseek-v3, and deepseek-coder by rewriting the metadata), a bigger byte-level BPE trained here with
`tokenizers`, a probe vocabulary that makes every pre-tokenizer split visible, and a SentencePiece BPE
with byte fallback trained here.
"""
import ctypes
import io
import json
import random
import re

import llama_cpp
import numpy as np
import pytest
import sentencepiece
import tokenizers
from tokenizers import pre_tokenizers

from dslocal.quant.gguf_file import GGUFError, GGUFFile, ValueType
from dslocal.quant.gguf_writer import write_gguf
from dslocal.quant.vocab import byte_symbols
from dslocal.runtime.tokenizer import _UNICODE_16, PRE_REGEXES, IncrementalDecoder, Tokenizer

S, U, B, I, F = ValueType.STRING, ValueType.UINT32, ValueType.BOOL, ValueType.INT32, ValueType.FLOAT32
BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"

TEXTS = [
    "Hello world", "", " ", "  leading spaces", "trailing   ", " " * 40 + "x", "\n", "\n\n\n\n", "a\n\nb\r\n c\t\td",
    "\t\t\tindented\n\t\t", "1234567", "1234567 12 3.14159 -0.5e10 0x1F 1,000,000", "٣٤٥ ① ² ½ Ⅻ",
    "don't I'll we're they've she'd He's IT'S 'quoted'", "café naïve Ångström façade Ærø œuvre", "e\u0301 combining",
    "你好，世界！深度求索。", "日本語のテキスト、カタカナ・ひらがな。", "한국어 텍스트입니다", "「引用」『書名』【注】……——",
    "def main(argv=None):\n    return 0\n", "for (int i = 0; i < n; ++i) { x[i] += y[i] * 2; }",
    "x = [1, 2, 3]; y = {'a': 1}",
    "👨‍👩‍👧‍👦 family 🙂🏽 flags 🇫🇷🇯🇵 🫩🫆 (Unicode 16)", "emoji🙂text🙂", "Ωmega K kelvin ℃ ™ © ﬁ ligature",
    "tabs\tand\u00a0nbsp\u3000ideographic\u2003em space",
    "~tilde ~~ ~/path $100 + 50% = ? #hash @at ^caret |pipe `tick`",
    "ＡＢＣ ａｂｃ １２３ fullwidth", "Mixed中文English混合123数字", "   \n   \n", "αβγ ΑΒΓ кириллица Ёж עברית العربية हिन्दी",
    "\u200b zero width \u200d joiner \ufeff bom", "\x1c\x1d\x1e\x1f separators \x00 nul \x7f del",
    "\u0085next line \u2028\u2029",
    "Garay 𐵀𐵁 digits, Todhri 𐗀𐗁, legacy 𜰀 (new in Unicode 16)",
    f"{USER}hi{ASSISTANT}hello{EOS}", f"<think>\nreason\n</think>\n\nanswer{EOS}", f"{BOS}{BOS}double",
    f"text{USER}{USER}  {ASSISTANT}\n", "<｜User", "<think", "not special: <|User|> <s> </s>",
]


def _random_text(rng: random.Random, n_lines: int) -> list[str]:
    """Lines mixing English, CJK, code, digits, emoji, accents and whitespace runs."""
    words = ("the model reads weights from memory once per token and the speed is set by bandwidth mixture of "
             "experts routes each token Hello World don't it's we'll").split()
    cjk, other = "深度求索的混合专家模型在一台电脑上运行你好世界日本語カタカナ한국어", ["🙂", "👍🏽", "é", "ñ", "ß", "—", "…", "€"]
    code = ["def f(x):", "return x", "{", "}", "==", "+=", "print(x)", "a[i]", "\t", "    ", "\n", "\r\n", "//", "#"]
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 18)):
            r = rng.random()
            if r < 0.5:
                w = rng.choice(words)
                parts.append(w.upper() if rng.random() < 0.05 else w.capitalize() if rng.random() < 0.1 else w)
            elif r < 0.65:
                parts.append("".join(rng.choice(cjk) for _ in range(rng.randint(1, 5))))
            elif r < 0.75:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
            elif r < 0.9:
                parts.append(rng.choice(code))
            else:
                parts.append(rng.choice(other) * rng.randint(1, 3))
        lines.append(rng.choice([" ", "  ", "", "\t"]).join(parts))
    return lines


def _write_vocab(path, tiny_path: str, tokenizer_kv: list) -> str:
    """A tensor-less GGUF: the metadata of a synthetic model with other tokenizer keys (llama.cpp loads it
    with vocab_only=True)."""
    with GGUFFile(tiny_path) as f:
        base = [kv for kv in f.items() if not kv[0].startswith("tokenizer.") and kv[0] != "deepseek2.vocab_size"]
    n_vocab = len(next(v for k, v, _ in tokenizer_kv if k == "tokenizer.ggml.tokens"))
    write_gguf(path, base + [("deepseek2.vocab_size", n_vocab, U)] + tokenizer_kv, [])
    return str(path)


def _replace(tiny_path: str, path, **changes) -> str:
    """The tiny model's vocabulary with some tokenizer.ggml.* keys replaced (None removes one)."""
    with GGUFFile(tiny_path) as f:
        kv = [(k, v, t) for k, v, t in f.items() if k.startswith("tokenizer.ggml.")]
    keys = {k for k, _, _ in kv}
    kv = [(k, changes.get(k[len("tokenizer.ggml."):], v), t) for k, v, t in kv]
    kv = [x for x in kv if x[1] is not None]
    kv += [(f"tokenizer.ggml.{k}", v, B if isinstance(v, bool) else S) for k, v in changes.items()
           if f"tokenizer.ggml.{k}" not in keys and v is not None]
    return _write_vocab(path, tiny_path, kv)


def _bpe_kv(pre: str, tokens: list[str], types: list[int], merges: list[str]) -> list:
    return [("tokenizer.ggml.model", "gpt2", S), ("tokenizer.ggml.pre", pre, S), ("tokenizer.ggml.tokens", tokens, S),
            ("tokenizer.ggml.token_type", types, I), ("tokenizer.ggml.merges", merges, S),
            ("tokenizer.ggml.bos_token_id", 0, U), ("tokenizer.ggml.eos_token_id", 1, U),
            ("tokenizer.ggml.add_bos_token", True, B)]


@pytest.fixture(scope="module")
def files(tiny_gguf, tmp_path_factory):
    """name -> GGUF path for every vocabulary compared here."""
    d = tmp_path_factory.mktemp("vocab")
    out = {"tiny-llm": tiny_gguf("tiny-v2"), "tiny-v3": tiny_gguf("tiny-v3")}
    out["tiny-coder"] = _replace(out["tiny-llm"], d / "tiny-coder.gguf", pre="deepseek-coder")

    # A bigger byte-level BPE (~4000 merges) trained on pieces cut by the DeepSeek-V3 pre-tokenizer.
    specials = [BOS, EOS, USER, ASSISTANT, "<|EOT|>"]
    user_defined = ["<think>", "</think>"]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in PRE_REGEXES["deepseek-v3"]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=4500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    hf.train_from_iterator(_random_text(random.Random(1), 4000) + TEXTS, trainer)
    model = json.loads(hf.to_str())["model"]
    trained = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = specials + user_defined + trained
    types = [3] * len(specials) + [4] * len(user_defined) + [1] * len(trained)
    for pre in PRE_REGEXES:
        out[f"big-{pre[9:]}"] = _write_vocab(d / f"big-{pre}.gguf", out["tiny-v3"], _bpe_kv(pre, tokens, types, merges))

    # A probe vocabulary: byte symbols plus merges of an anchor ('a', '.', '1', ' ') with every byte, so any
    # piece boundary next to an anchor shows in the ids.
    sym = byte_symbols()
    tokens, merges = ["<s>", "</s>"] + sym, []
    for anchor in "a.1 ":
        for x, y in [(p, q) for z in sym for p, q in ((sym[ord(anchor)], z), (z, sym[ord(anchor)]))]:
            if x + y not in tokens:
                tokens.append(x + y)
                merges.append(f"{x} {y}")
    types = [3, 3] + [1] * (len(tokens) - 2)
    for pre in PRE_REGEXES:
        out[f"probe-{pre[9:]}"] = _write_vocab(d / f"probe-{pre}.gguf", out["tiny-v3"],
                                               _bpe_kv(pre, tokens, types, merges))
    return out


@pytest.fixture(scope="module")
def load():
    """load(path) -> (our Tokenizer, llama.cpp vocabulary), each file loaded once; closed at the end."""
    cache = {}

    def get(path: str):
        if path not in cache:
            with GGUFFile(path) as f:
                tok = Tokenizer.from_gguf(f)
            cache[path] = tok, llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        return cache[path]
    yield get
    for _, llm in cache.values():
        llm.close()


def _llama_detokenize(llm, ids: list[int], special: bool) -> str:
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    buf = ctypes.create_string_buffer(len(ids) * 64 + 16)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, len(buf), False, special)
    assert n >= 0
    return buf.raw[:n].decode("utf-8", errors="replace")


@pytest.mark.parametrize("name", ["tiny-llm", "tiny-v3", "tiny-coder", "big-llm", "big-v3", "big-coder"])
def test_ids_match_llama_cpp(load, files, name):
    tok, llm = load(files[name])
    texts = TEXTS + _random_text(random.Random(2), 150) + ["\n".join(_random_text(random.Random(3), 60))]
    n, bad = 0, []
    for text in texts:
        for special in (True, False):
            for add_bos in (True, False):
                ours = tok.encode(text, add_bos=add_bos, special=special)
                ref = llm.tokenize(text.encode(), add_bos=add_bos, special=special)
                n += 1
                if ours != ref:
                    bad.append((text, special, add_bos, ours, ref))
    print(f"{name}: {n} encodings compared, {len(bad)} differ")
    assert not bad, bad[:3]


@pytest.mark.parametrize("name", ["tiny-llm", "tiny-v3", "big-v3", "big-coder"])
def test_decode_matches_llama_cpp_and_round_trips(load, files, name):
    tok, llm = load(files[name])
    for text in TEXTS + _random_text(random.Random(4), 50):
        ids = tok.encode(text, add_bos=True, special=True)
        for special in (True, False):
            assert tok.decode(ids, special=special) == _llama_detokenize(llm, ids, special), (text, special)
        for special in (True, False):
            assert tok.decode(tok.encode(text, add_bos=False, special=special)) == text


@pytest.mark.parametrize("pre", ["llm", "coder", "v3"])
def test_pre_tokenizer_boundaries_match_llama_cpp(load, files, pre):
    """Every ~5th codepoint of the planes in use, all of the Unicode 16.0 additions and every whitespace
    codepoint, between two anchors: llama.cpp's own Unicode tables and regex handling decide where a piece
    ends; the probe vocabulary merges an anchor with its neighbour only inside a piece."""
    tok, llm = load(files[f"probe-{pre}"])
    cps = set(range(0x80, 0x32000, 5)) | set(range(0xE0000, 0xE0080)) | {0x85, 0xA0, 0x1680, 0x180E, 0x3000}
    cps |= set(range(0x2000, 0x2060))
    for m in re.finditer(r"(.)-(.)|(.)", _UNICODE_16, re.S):          # "a-b" ranges and single characters
        a, b = (m[1], m[2]) if m[1] else (m[3], m[3])
        cps |= set(range(ord(a), ord(b) + 1))
    cps = sorted(c for c in cps if not 0xD800 <= c < 0xE000)
    for ctx in ("a{}a", ".{}.", "1{}1", " {}a", "{}{}"):
        text = "\n".join(ctx.format(chr(c), chr(c)) for c in cps)
        ours, ref = tok.encode(text, add_bos=False), llm.tokenize(text.encode(), add_bos=False, special=False)
        if ours != ref:
            bad = [hex(c) for c in cps if tok.encode(ctx.format(chr(c), chr(c)), add_bos=False)
                   != llm.tokenize(ctx.format(chr(c), chr(c)).encode(), add_bos=False, special=False)]
            pytest.fail(f"{ctx!r}: {len(bad)} codepoints split differently: {bad[:20]}")
    print(f"deepseek-{pre}: {len(cps)} codepoints x 5 contexts agree")


def test_special_tokens(load, files):
    tok, _ = load(files["big-v3"])
    user, think = tok.token_to_id(USER), tok.token_to_id("<think>")
    ids = tok.encode(f"{USER}hi<think>", add_bos=False, special=True)
    assert ids[0] == user and ids[-1] == think
    plain = tok.encode(f"{USER}hi<think>", add_bos=False, special=False)
    assert user not in plain and plain[-1] == think           # user-defined tokens match even without special
    assert tok.decode(plain) == f"{USER}hi<think>"
    assert tok.decode(ids, special=False) == "hi<think>"      # control tokens are dropped, user-defined kept
    assert tok.eot_ids == {tok.eos_id, tok.token_to_id("<|EOT|>")}
    assert tok.id_to_token(tok.bos_id) == BOS and tok.vocab_size == len(tok.tokens)


def test_bos_follows_add_bos_token(load, files, tmp_path):
    path = _replace(files["tiny-v3"], tmp_path / "nobos.gguf", add_bos_token=False, add_eos_token=True)
    tok, llm = load(path)
    for text in ("hello", f"{USER}x"):
        ours = tok.encode(text, add_bos=True)
        assert ours == llm.tokenize(text.encode(), add_bos=True, special=True)
        assert ours[0] != tok.bos_id and ours[-1] == tok.eos_id
    assert load(files["tiny-v3"])[0].encode("hi")[0] == 0


def test_streaming_decoder_never_splits_characters(load, files):
    tok, _ = load(files["tiny-v3"])   # 1024 tokens: most CJK and emoji are several byte tokens
    text = "深度求索 👨‍👩‍👧‍👦 naïve 🫩 end"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text) // 2
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert sum(p == "" for p in pieces) > 5                     # bytes held back until a character is whole
    dec = IncrementalDecoder(tok)
    assert dec.push(tok.encode("🙂", add_bos=False)[0]) == "" and dec.flush() == "\ufffd"   # cut off: replaced
    with pytest.raises(ValueError, match="outside the vocabulary"):
        IncrementalDecoder(tok).push(tok.vocab_size)


def test_unknown_tokenizer_is_a_clear_error(files, tmp_path):
    with pytest.raises(GGUFError, match="pre-tokenizer 'qwen2'"):
        with GGUFFile(_replace(files["tiny-v3"], tmp_path / "a.gguf", pre="qwen2")) as f:
            Tokenizer.from_gguf(f)
    with pytest.raises(GGUFError, match="tokenizer model 'bert'"):
        with GGUFFile(_replace(files["tiny-v3"], tmp_path / "b.gguf", model="bert")) as f:
            Tokenizer.from_gguf(f)
    with pytest.raises(GGUFError, match="without merges"):
        with GGUFFile(_replace(files["tiny-v3"], tmp_path / "c.gguf", merges=None)) as f:
            Tokenizer.from_gguf(f)


@pytest.fixture(scope="module")
def spm_file(files, tmp_path_factory):
    """A SentencePiece BPE with byte fallback trained here, as dslocal's training path writes one."""
    lines = _random_text(random.Random(5), 3000)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=1200, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=2, minloglevel=2,
        control_symbols=[USER, ASSISTANT], user_defined_symbols=["<think>", "</think>"], character_coverage=0.9995)
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i)
             else 4 if tokens[i] in ("<think>", "</think>") else 1 for i in range(n)]
    kv = [("tokenizer.ggml.model", "llama", S), ("tokenizer.ggml.tokens", tokens, S),
          ("tokenizer.ggml.scores", np.array([sp.get_score(i) for i in range(n)], np.float32), F),
          ("tokenizer.ggml.token_type", types, I), ("tokenizer.ggml.bos_token_id", sp.bos_id(), U),
          ("tokenizer.ggml.eos_token_id", sp.eos_id(), U), ("tokenizer.ggml.unknown_token_id", sp.unk_id(), U)]
    path = _write_vocab(tmp_path_factory.mktemp("spm") / "spm.gguf", files["tiny-v3"], kv)
    return path, sp


def test_sentencepiece_matches_llama_cpp_and_sentencepiece(load, spm_file):
    path, sp = spm_file
    tok, llm = load(path)
    assert tok.model == "llama" and tok.add_bos
    texts = [t for t in TEXTS + _random_text(random.Random(6), 200) if "\u2581" not in t]   # "▁" is the space
    n = 0
    for text in texts:
        for special in (True, False):
            ours = tok.encode(text, add_bos=True, special=special)
            assert ours == llm.tokenize(text.encode(), add_bos=True, special=special), (text, special)
            n += 1
        if not any(s in text for s in (USER, ASSISTANT, "<think>", "</think>")):
            ids = tok.encode(text, add_bos=False, special=False)
            assert ids == sp.encode(text), text
            assert tok.decode(ids) == sp.decode(ids) == text
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    print(f"sentencepiece vocabulary: {n} encodings compared with llama.cpp, {len(texts)} with sentencepiece")
    byte_ids = tok.encode("🫩", add_bos=False)                      # not in the training text: byte fallback
    assert [tok.id_to_token(i) for i in byte_ids[-4:]] == ["<0xF0>", "<0x9F>", "<0xAB>", "<0xA9>"]
