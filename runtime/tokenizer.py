"""Tokenizers read from GGUF metadata that give the token ids llama.cpp gives (llama-vocab.cpp).

Two vocabulary kinds (tokenizer.ggml.model):
- "gpt2": byte-level BPE (DeepSeek V2/V3/R1). The pre-tokenizer's regexes split the text into pieces, each
  piece's UTF-8 bytes become GPT-2 byte symbols, and merges apply by rank. Built as a Hugging Face
  `tokenizers` BPE with one Split pre-tokenizer per regex.
- "llama": SentencePiece (tokens, scores, token types, byte fallback <0x00>..<0xFF>). Encoded by the
  `sentencepiece` library from a model proto assembled from the GGUF arrays.

Special tokens are cut out of the text before either runs, as llama.cpp's `tokenizer_st_partition` does:
every control / unknown token (only with special=True) and every user-defined token (always), longest
first, each splitting the text fragments left to right.
"""
from __future__ import annotations

import codecs
import struct

import sentencepiece
import tokenizers
from tokenizers import pre_tokenizers

from dslocal.quant.gguf_file import GGUFError, GGUFFile
from dslocal.quant.vocab import byte_symbols

# tokenizer.ggml.token_type values (enum llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens llama.cpp makes control tokens whatever their stored type, and counts as end of generation
# (llama-vocab.cpp `special_eog_ids`); DeepSeek's are <｜end▁of▁sentence｜> and the FIM markers.
_EOG = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
        "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
        "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[")
_FORCED_CONTROL = _EOG + ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")
# DeepSeek-Coder ends an instruct answer with <|EOT|>, which llama.cpp's list does not name.
_END_OF_TURN = _EOG + ("<|EOT|>",)

# Pre-tokenizer regexes (llm_tokenizer_bpe in llama-vocab.cpp), applied one after the other to the pieces
# the previous ones left; unmatched text stays a piece (a `tokenizers` Split with behavior "isolated").
# llama.cpp runs them with its own Unicode handling (unicode.cpp unicode_regex_split): a regex with \p{..}
# sees each non-ASCII codepoint collapsed to one byte for its category, a regex without sees codepoints
# (std::wregex); in both, non-ASCII whitespace is replaced by \v. Rewritten for Oniguruma, the regex
# engine of `tokenizers`, so that they split the same (test_tokenizer checks every 5th codepoint of planes
# 0-3 in five contexts against llama.cpp):
# - \s is the same set in both (ASCII \t\n\v\f\r and space, and Unicode White_Space);
# - whitespace never matches an explicit range, so it is taken out of ranges that span some
#   (U+0800-U+4E00 in the CJK/Korean class, U+3000 in the CJK punctuation class);
# - `$` is the end of the piece (Oniguruma's `$` also matches before "\n"): `\z`;
# - category classes leave out what llama.cpp's older Unicode tables do not have (_UNICODE_16).
_WS = "\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"   # unicode.cpp whitespace above ASCII
_CJK_KOREAN = f"[[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]&&[^{_WS}]]+"
# Cased letters (Lu, Ll, Lt) of the DeepSeek-LLM tokenizer.json, as llama.cpp copies them
_CASED = ("A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
          "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
          "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
          "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
          "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
          "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
          "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
          "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
          "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
          "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
          "\U0001e900-\U0001e943")
# Characters new in Unicode 16.0 with a letter, mark, number, punctuation or symbol category. Oniguruma
# (tokenizers >= 0.21.4) knows them; llama.cpp's tables (unicode-data.cpp, Unicode 15.1) do not, so there
# they belong to no \p{..} class.
_UNICODE_16 = ("\u0897\u1b4e-\u1b4f\u1b7f\u1c89-\u1c8a\u2427-\u2429\u31e4-\u31e5\ua7cb-\ua7cd\ua7da-\ua7dc"
               "\U000105c0-\U000105f3\U00010d40-\U00010d65\U00010d69-\U00010d85\U00010d8e-\U00010d8f"
               "\U00010ec2-\U00010ec4\U00010efc\U00011380-\U00011389\U0001138b\U0001138e\U00011390-\U000113b5"
               "\U000113b7-\U000113c0\U000113c2\U000113c5\U000113c7-\U000113ca\U000113cc-\U000113d5"
               "\U000113d7-\U000113d8\U000113e1-\U000113e2\U000116d0-\U000116e3\U00011bc0-\U00011be1"
               "\U00011bf0-\U00011bf9\U00011f5a\U00013460-\U000143fa\U00016100-\U00016139\U00016d40-\U00016d79"
               "\U00018cff\U0001cc00-\U0001ccf9\U0001cd00-\U0001ceb3\U0001e5d0-\U0001e5fa\U0001e5ff"
               "\U0001f8b2-\U0001f8bb\U0001f8c0-\U0001f8c1\U0001fa89\U0001fa8f\U0001fabe\U0001fac6\U0001fadc"
               "\U0001fadf\U0001fae9\U0001fbcb-\U0001fbef")


def _cat(classes: str) -> str:
    """A class of Unicode categories as llama.cpp sees them: without the Unicode 16.0 additions."""
    return f"[[{classes}]&&[^{_UNICODE_16}]]"


_N, _L, _P = _cat(r"\p{N}"), _cat(r"\p{L}"), _cat(r"\p{P}")
_NOT_LPS = rf"[[^\r\n\p{{L}}\p{{P}}\p{{S}}]{_UNICODE_16}]"
PRE_REGEXES: dict[str, list[str]] = {
    "deepseek-llm": [r"[\r\n]", rf"\s?[{_CASED}]+", "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002]+",
                     r"\s+\z", _CJK_KOREAN, _N + "+"],
    "deepseek-coder": [r"[\r\n]", r"\s?" + _L + "+", r"\s?" + _P + "+", _CJK_KOREAN, _N],
    "deepseek-v3": [_N + "{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|""" + _NOT_LPS + "?" + _cat(r"\p{L}\p{M}")
                    + r"+| ?" + _cat(r"\p{P}\p{S}") + r"+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary; build it with Tokenizer.from_gguf(f)."""

    def __init__(self, model: str, tokens: list[str], types: list[int], bos_id: int | None, eos_id: int | None,
                 add_bos: bool, add_eos: bool, encoder, space_prefix: bool, extra_eot: tuple[int, ...] = ()):
        self.model = model                    # "gpt2" | "llama"
        self.tokens = tokens
        self.types = types
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self._encoder = encoder               # fragment str -> list[int]
        self._space_prefix = space_prefix     # SentencePiece's leading "▁" on every text fragment
        self._to_id = {t: i for i, t in enumerate(tokens)}
        special = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN, USER_DEFINED)]
        # longest first, as llama.cpp's cache_special_tokens (sorted by length in bytes)
        special.sort(key=lambda i: (-len(tokens[i].encode("utf-8", "surrogateescape")), i))
        self._special = [(tokens[i], i) for i in special]
        self._user_defined = [(t, i) for t, i in self._special if types[i] == USER_DEFINED]
        self._pieces = [self._piece(i) for i in range(len(tokens))]
        eot = {i for i in (eos_id, *extra_eot) if i is not None}
        eot |= {self._to_id[t] for t in _END_OF_TURN if t in self._to_id}
        self.eot_ids = frozenset(eot)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, f: GGUFFile) -> Tokenizer:
        """The tokenizer a GGUF file's tokenizer.ggml.* metadata describes; problems are GGUFErrors."""
        model = f.get("tokenizer.ggml.model")
        if model is None:
            raise GGUFError("has no tokenizer (metadata key 'tokenizer.ggml.model' is missing)")
        tokens = f.get("tokenizer.ggml.tokens")
        if not tokens:
            raise GGUFError("has no vocabulary (metadata key 'tokenizer.ggml.tokens' is missing)")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]   # as llama.cpp
        if len(set(tokens)) != len(tokens):
            raise GGUFError("has duplicate tokens in 'tokenizer.ggml.tokens'")
        n = len(tokens)
        raw_types = f.get("tokenizer.ggml.token_type")
        types = [NORMAL] * n if raw_types is None else [int(t) for t in raw_types[:n]]
        if len(types) < n:
            raise GGUFError(f"'tokenizer.ggml.token_type' has {len(types)} entries for {n} tokens")
        to_id = {t: i for i, t in enumerate(tokens)}
        for t in _FORCED_CONTROL:
            if t in to_id:
                types[to_id[t]] = CONTROL

        def special_id(key: str, default: int | None) -> int | None:
            """An id key, else llama.cpp's default for the vocabulary kind; ids past the end are ignored."""
            v = f.get(f"tokenizer.ggml.{key}")
            if v is not None and int(v) < n:
                return int(v)
            return default if default is not None and default < n else None

        if model == "gpt2":
            pre = f.get("tokenizer.ggml.pre")
            if pre is None:
                raise GGUFError("has a byte-level BPE vocabulary without a pre-tokenizer type (tokenizer.ggml.pre); "
                                "convert the model again with a current llama.cpp")
            if pre not in PRE_REGEXES:
                raise GGUFError(f"has pre-tokenizer {pre!r} (tokenizer.ggml.pre); dslocal supports "
                                f"{', '.join(PRE_REGEXES)}")
            encoder = _bpe_encoder(tokens, list(f.get("tokenizer.ggml.merges") or []), PRE_REGEXES[pre])
            bos, eos = special_id("bos_token_id", 11), special_id("eos_token_id", 11)
            add_bos, space_prefix = False, False
        elif model == "llama":
            scores = f.get("tokenizer.ggml.scores")
            if scores is None or len(scores) < n:
                raise GGUFError("has a SentencePiece vocabulary without 'tokenizer.ggml.scores' for every token")
            space_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
            encoder = _sentencepiece_encoder(tokens, [float(s) for s in scores[:n]], types, space_prefix)
            bos, eos, add_bos = special_id("bos_token_id", 1), special_id("eos_token_id", 2), True
        else:
            raise GGUFError(f"has tokenizer model {model!r} (tokenizer.ggml.model); dslocal supports 'gpt2' "
                            f"(byte-level BPE) and 'llama' (SentencePiece)")
        add_bos = bool(f.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(f.get("tokenizer.ggml.add_eos_token", False))
        if (add_bos and bos is None) or (add_eos and eos is None):
            raise GGUFError("asks for a BOS/EOS token to be added but does not name one")
        extra = tuple(i for i in (special_id("eot_token_id", None), special_id("eom_token_id", None)) if i is not None)
        return cls(model, tokens, types, bos, eos, add_bos, add_eos, encoder, space_prefix, extra)

    # -- encoding ------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of text. add_bos: add the BOS (and EOS) the file asks for (tokenizer.ggml.add_bos_token,
        add_eos_token), as llama.cpp's add_special. special: control tokens written in the text become their
        ids (llama.cpp's parse_special); user-defined tokens always do."""
        ids = [self.bos_id] if add_bos and self.add_bos else []
        for frag in self._partition(text, special):
            if isinstance(frag, int):
                ids.append(frag)
            else:
                ids += self._encoder(frag)
        if add_bos and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def _partition(self, text: str, special: bool) -> list[str | int]:
        """Text fragments and special-token ids in order (llama.cpp tokenizer_st_partition)."""
        frags: list[str | int] = [text] if text else []
        for tok, tid in self._special if special else self._user_defined:
            if tok not in text:
                continue
            out: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or tok not in frag:
                    out.append(frag)
                    continue
                for k, part in enumerate(frag.split(tok)):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            frags = out
        return frags

    # -- decoding ------------------------------------------------------------------------------------
    def _piece(self, i: int) -> bytes:
        """The bytes token i stands for (llama.cpp token_to_piece with special=True)."""
        text, kind = self.tokens[i], self.types[i]
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if kind == BYTE and len(text) == 6 and text.startswith("<0x"):
            return bytes([int(text[3:5], 16)])                  # "<0xAB>"
        if kind not in (NORMAL, BYTE):
            return b""                                            # unused / undefined render as nothing
        if self.model == "llama":
            return text.replace("\u2581", " ").encode("utf-8", "surrogateescape")
        # byte symbols -> bytes; a character outside the GPT-2 table (a malformed token) stands for itself
        return b"".join(bytes([_BYTE_OF[c]]) if c in _BYTE_OF else c.encode("utf-8", "surrogateescape") for c in text)

    def piece(self, i: int, special: bool = True) -> bytes:
        """The bytes of one token; control and unknown tokens are empty unless special."""
        if not special and self.types[i] in (CONTROL, UNKNOWN):
            return b""
        return self._pieces[i]

    def decode(self, ids, special: bool = True) -> str:
        """Text of token ids (invalid UTF-8 becomes U+FFFD). special=False drops control tokens (BOS, EOS,
        chat markers) as llama.cpp's token_to_piece does. For SentencePiece, the space encode() puts before
        each text fragment is taken off again."""
        ids = list(ids)
        if self._space_prefix:
            dec = IncrementalDecoder(self, special)
            return "".join(dec.push(i) for i in ids) + dec.flush()
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            raise ValueError(f"token ids must be in 0..{self.vocab_size - 1}")
        return b"".join(self.piece(i, special) for i in ids).decode("utf-8", errors="replace")

    # -- vocabulary ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._to_id.get(token)

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def is_special(self, i: int) -> bool:
        """A control, unknown or user-defined token (one matched whole in text, not by merges)."""
        return self.types[i] in (CONTROL, UNKNOWN, USER_DEFINED)


class IncrementalDecoder:
    """Streaming detokenizer: push(id) returns the text that is complete so far, never splitting a
    multi-byte UTF-8 character across pieces; flush() returns what is left at the end."""

    def __init__(self, tokenizer: Tokenizer, special: bool = True):
        self.tok = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = tokenizer._space_prefix    # the next text fragment starts with encode's "▁"

    def push(self, i: int) -> str:
        tok = self.tok
        if not 0 <= i < tok.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (0..{tok.vocab_size - 1})")
        piece = tok.piece(i, self.special)
        if tok._space_prefix:
            if tok.is_special(i):
                self._strip_space = True
            elif piece:
                if self._strip_space and piece.startswith(b" "):
                    piece = piece[1:]
                self._strip_space = False
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


_BYTE_OF = {c: b for b, c in enumerate(byte_symbols())}   # GPT-2 byte symbol -> byte


def _bpe_encoder(tokens: list[str], merges: list[str], regexes: list[str]):
    """A byte-level BPE over the GGUF vocabulary and merges, as a `tokenizers` Tokenizer."""
    if not merges:
        raise GGUFError("has a byte-level BPE vocabulary without merges (tokenizer.ggml.merges)")
    vocab = {t: i for i, t in enumerate(tokens)}
    missing = [hex(b) for c, b in _BYTE_OF.items() if c not in vocab]
    if missing:
        raise GGUFError(f"has a byte-level BPE vocabulary without the byte symbols of {', '.join(missing[:8])}")
    pairs = []
    for m in merges:
        k = m.find(" ", 1)                  # llama.cpp splits at the first space after the first character
        a, b = (m[:k], m[k + 1:]) if k > 0 else ("", "")
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise GGUFError(f"has the merge {m!r} whose parts or result are not in the vocabulary")
        pairs.append((a, b))
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, pairs))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return lambda text: tk.encode(text, add_special_tokens=False).ids


def _sentencepiece_encoder(tokens: list[str], scores: list[float], types: list[int], space_prefix: bool):
    """A SentencePiece BPE processor over the GGUF pieces (text fragments come without special tokens)."""
    proto = _sentencepiece_proto(tokens, scores, types, space_prefix)
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as e:
        raise GGUFError(f"has a SentencePiece vocabulary that sentencepiece rejects: {e}") from None
    return lambda text: sp.encode(text)


def _sentencepiece_proto(tokens: list[str], scores: list[float], types: list[int], space_prefix: bool) -> bytes:
    """A serialized sentencepiece ModelProto (sentencepiece_model.proto): the pieces, a BPE trainer spec with
    byte fallback when byte pieces exist, and a normalizer that changes nothing but spaces -> "▁"."""
    def key(field: int, wire: int) -> bytes:
        return _varint(field << 3 | wire)

    def blob(field: int, data: bytes) -> bytes:
        return key(field, 2) + _varint(len(data)) + data

    out = bytearray()
    for t, s, k in zip(tokens, scores, types):
        k = k if k in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL
        # SentencePiece {piece = 1, score = 2, type = 3}, one ModelProto.pieces (1) each
        piece = blob(1, t.encode("utf-8", "surrogateescape")) + key(2, 5) + struct.pack("<f", s)
        out += blob(1, piece + key(3, 0) + _varint(k))
    byte_fallback = BYTE in types
    trainer = key(3, 0) + _varint(2) + key(35, 0) + _varint(int(byte_fallback))  # model_type BPE, byte_fallback
    out += blob(2, trainer)
    normalizer = (blob(1, b"identity") + key(3, 0) + _varint(int(space_prefix))   # add_dummy_prefix
                  + key(4, 0) + _varint(0) + key(5, 0) + _varint(1))  # remove_extra_whitespaces, escape_whitespaces
    out += blob(3, normalizer)
    return bytes(out)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | 0x80 if v else b)
        if not v:
            return bytes(out)
