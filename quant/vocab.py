"""A small byte-level BPE vocabulary (tokenizer.ggml.model = "gpt2") for synthetic models.

llama.cpp's gpt2 tokenizer needs all 256 byte symbols (unmatched text falls back to them), a non-empty
merge list whose parts and results are tokens, and unique token strings (llama-vocab.cpp).
"""
from __future__ import annotations

from collections import Counter

from dslocal.quant.gguf_file import ValueType

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED, TOKEN_BYTE = 1, 3, 5, 6  # tokenizer.ggml.token_type values

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
CHAT_TOKENS = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")

# Text the toy merges are learned from: enough English, code and CJK for common pairs.
_SAMPLE = """
The quick brown fox jumps over the lazy dog. A mixture of experts routes each token to a few experts.
def main(argv=None):\n    return 0\nfor i in range(10):\n    print(i)\n
The model reads the weights from memory once per token, and the speed is set by the bandwidth.
深度求索的混合专家模型在一台电脑上运行。你好，世界！
"""


def byte_symbols() -> list[str]:
    """The GPT-2 byte -> printable unicode map: printable latin-1 bytes stand for themselves, the rest
    are shifted above U+0100 so that every byte has a visible, unique symbol."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols, shifted = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over the words of `text` (spaces attach to the following word, as in GPT-2)."""
    sym = byte_symbols()
    words = Counter()
    for i, w in enumerate(text.split(" ")):
        w = (" " if i else "") + w
        words[tuple(sym[b] for b in w.encode("utf-8"))] += 1
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append((a, b))
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def synthetic_vocab(vocab_size: int, pre: str, chat_template: str | None = None
                    ) -> list[tuple[str, object, ValueType]]:
    """GGUF tokenizer metadata for a byte-level BPE vocabulary of exactly vocab_size tokens.

    Ids: 0 BOS, 1 EOS, then the chat tokens, the 256 byte symbols, merged tokens, and unused padding.
    """
    specials = [BOS, EOS, *CHAT_TOKENS]
    base = len(specials) + 256
    if vocab_size < base + 1:
        raise ValueError(f"vocab_size must be at least {base + 1} for a byte-level vocabulary")
    n_merges = min(vocab_size - base, 400)
    merges = _learn_merges(_SAMPLE * 4, n_merges)
    tokens = specials + byte_symbols()
    types = [TOKEN_CONTROL] * len(specials) + [TOKEN_NORMAL] * 256
    seen = set(tokens)
    kept_merges = []
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            types.append(TOKEN_NORMAL)
            kept_merges.append(f"{a} {b}")
    n_pad = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(n_pad)]
    types += [TOKEN_UNUSED] * n_pad
    S, U, B, I = ValueType.STRING, ValueType.UINT32, ValueType.BOOL, ValueType.INT32
    kv = [("tokenizer.ggml.model", "gpt2", S),
          ("tokenizer.ggml.pre", pre, S),
          ("tokenizer.ggml.tokens", tokens, S),
          ("tokenizer.ggml.token_type", types, I),
          ("tokenizer.ggml.merges", kept_merges, S),
          ("tokenizer.ggml.bos_token_id", 0, U),
          ("tokenizer.ggml.eos_token_id", 1, U),
          ("tokenizer.ggml.padding_token_id", 1, U),
          ("tokenizer.ggml.add_bos_token", True, B),
          ("tokenizer.ggml.add_eos_token", False, B)]
    if chat_template:
        kv.append(("tokenizer.chat_template", chat_template, S))
    return kv


# DeepSeek-V3 style chat format: BOS, system text, then <｜User｜>...<｜Assistant｜>... turns.
V3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

# DeepSeek-V2 style: "User: ...\n\nAssistant: ..." with EOS after each answer.
V2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
