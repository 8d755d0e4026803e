"""Training data: a procedural corpus, a SentencePiece tokenizer stored as GGUF vocabulary metadata, and
token streams that batches are cut from.

- generate_corpus: short stories from a grammar (with questions about them), arithmetic facts and word
  problems, and chat dialogues ({"messages": [...]}) — no downloads. Two-digit additions whose
  (a + b) % HOLDOUT == 0... no: whose pair index is a multiple of HOLDOUT are never in the training data
  (is_held_out), so accuracy on them measures something learned, not memorized.
- train_tokenizer: SentencePiece BPE with byte fallback, digits split, identity normalization, the DeepSeek-V3
  chat markers as user-defined pieces; vocab_metadata turns it into tokenizer.ggml.* keys (model "llama"),
  and tokenizer_from_metadata gives dslocal's own Tokenizer over them, so training encodes text exactly as
  the runtime and llama.cpp will.
- TokenStream: documents (or chat turns) concatenated into one token array with a loss mask; batch(step)
  cuts random windows with a generator seeded by the step, so a resumed run sees the same batches.
"""
from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import sentencepiece
import torch

from dslocal.quant.gguf_file import ValueType
from dslocal.runtime.chat import DEEPSEEK_V3, ChatTemplate
from dslocal.runtime.tokenizer import Tokenizer

BOS, EOS, UNK = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<unk>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
HOLDOUT = 7   # every 7th two-digit addition pair is held out of all training data

# ---------------------------------------------------------------------------------------------- corpus
NAMES = ["Mia", "Leo", "Ana", "Tom", "Zoe", "Max", "Ivy", "Sam", "Eva", "Ben", "Lily", "Omar", "Nina", "Hugo",
         "Rosa", "Finn", "Yuki", "Ravi", "Ella", "Jack"]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "rabbit", "duck", "frog", "mouse", "horse", "goat", "bird"]
PLACES = ["forest", "village", "garden", "castle", "river", "farm", "city", "beach", "mountain", "school"]
OBJECTS = ["red ball", "old key", "blue hat", "small box", "golden coin", "green apple", "paper kite",
           "wooden boat", "silver bell", "yellow book"]
FRIENDS = ["a wise turtle", "a kind baker", "a little girl", "a tall giant", "a happy bee", "an old farmer"]
FEELINGS = ["happy", "surprised", "curious", "proud", "excited", "calm"]
THINGS = ["apples", "books", "coins", "cookies", "flowers", "stones", "cards", "eggs"]


def is_held_out(a: int, b: int) -> bool:
    return (a * 100 + b) % HOLDOUT == 0


def _pair(rng: random.Random, held_out: bool = False) -> tuple[int, int]:
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if is_held_out(a, b) == held_out:
            return a, b


@dataclass(frozen=True)
class Story:
    name: str
    animal: str
    place: str
    obj: str
    friend: str
    feeling: str

    def text(self) -> str:
        n = self.name
        return (f"Once upon a time, {n} the {self.animal} lived in the {self.place}. One day {n} found a "
                f"{self.obj}. {n} showed the {self.obj} to {self.friend}. {n} felt {self.feeling}.")

    def questions(self) -> list[tuple[str, str]]:
        n = self.name
        return [(f"Where did {n} live?", f"{n} lived in the {self.place}."),
                (f"What did {n} find?", f"{n} found a {self.obj}."),
                (f"What animal was {n}?", f"{n} was a {self.animal}."),
                (f"How did {n} feel?", f"{n} felt {self.feeling}.")]


def random_story(rng: random.Random) -> Story:
    return Story(rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(OBJECTS),
                 rng.choice(FRIENDS), rng.choice(FEELINGS))


def addition_question(a: int, b: int) -> tuple[str, str]:
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."


def _text_document(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.4:
        s = random_story(rng)
        q, ans = rng.choice(s.questions())
        return f"{s.text()}\nQuestion: {q}\nAnswer: {ans}"
    if kind < 0.8:
        lines = []
        for _ in range(rng.randint(4, 8)):
            a, b = _pair(rng)
            lines.append(f"{a} + {b} = {a + b}." if rng.random() < 0.7 else f"{a + b} - {b} = {a}.")
        return "\n".join(lines)
    a, b = _pair(rng)
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    return f"{n} has {a} {t}. {n} gets {b} more {t}. Now {n} has {a} + {b} = {a + b} {t}."


def _dialogue(rng: random.Random) -> dict:
    kind = rng.random()
    if kind < 0.5:
        q, ans = addition_question(*_pair(rng))
    elif kind < 0.9:
        s = random_story(rng)
        q, ans = rng.choice(s.questions())
        q = f"{s.text()} {q}"
    else:
        q, ans = rng.choice([("Hello!", "Hello! I am a small model. Ask me to add two numbers."),
                             ("Who are you?", "I am a tiny DeepSeek-style model trained by dslocal."),
                             ("Thank you!", "You are welcome.")])
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}


def generate_corpus(n_docs: int, n_dialogues: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """Plain-text documents and chat dialogues, procedurally; held-out additions never appear."""
    rng = random.Random(seed)
    return [_text_document(rng) for _ in range(n_docs)], [_dialogue(rng) for _ in range(n_dialogues)]


def held_out_questions(n: int, seed: int = 1) -> list[tuple[str, str, str]]:
    """(kind, question, expected answer substring): two-digit additions never trained on, and story Q&A."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            a, b = _pair(rng, held_out=True)
            out.append(("addition", f"What is {a} + {b}?", str(a + b)))
        else:
            s = random_story(rng)
            q, ans = rng.choice(s.questions())
            out.append(("story", f"{s.text()} {q}", ans.rstrip(".").split()[-1]))
    return out


def read_texts(paths: Iterable[str]) -> tuple[list[str], list[dict]]:
    """Documents from .txt files (blank-line separated) and .jsonl files ({"text"} or {"messages"})."""
    docs, chats = [], []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            if path.endswith(".jsonl"):
                for i, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if "messages" in rec:
                        chats.append(rec)
                    elif "text" in rec:
                        docs.append(rec["text"])
                    else:
                        raise ValueError(f"{path}:{i}: a JSONL line needs a 'text' or a 'messages' field")
            else:
                docs += [d.strip() for d in fh.read().split("\n\n") if d.strip()]
    return docs, chats


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model (serialized) trained on texts: byte fallback, digits split one by one,
    no normalization (so dslocal's and llama.cpp's SentencePiece tokenizers give the same ids)."""
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([t for text in texts for t in text.split("\n") if t]), model_writer=out,
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece=UNK, bos_piece=BOS,
        eos_piece=EOS, user_defined_symbols=[USER, ASSISTANT], hard_vocab_limit=False,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    return out.getvalue()


def vocab_metadata(sp_model: bytes) -> list[tuple[str, object, ValueType]]:
    """tokenizer.ggml.* keys for a SentencePiece model (llama-vocab.cpp, vocabulary type SPM) and the
    DeepSeek-V3 chat template."""
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(sp_model)
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece)
        scores.append(float(sp.get_score(i)))
        # llama_token_type: 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 4 if piece in (USER, ASSISTANT) else 1)
    S, U, B, I, F = ValueType.STRING, ValueType.UINT32, ValueType.BOOL, ValueType.INT32, ValueType.FLOAT32
    return [("tokenizer.ggml.model", "llama", S), ("tokenizer.ggml.tokens", tokens, S),
            ("tokenizer.ggml.scores", scores, F), ("tokenizer.ggml.token_type", types, I),
            ("tokenizer.ggml.bos_token_id", sp.bos_id(), U), ("tokenizer.ggml.eos_token_id", sp.eos_id(), U),
            ("tokenizer.ggml.unknown_token_id", sp.unk_id(), U), ("tokenizer.ggml.add_bos_token", True, B),
            ("tokenizer.ggml.add_eos_token", False, B), ("tokenizer.ggml.add_space_prefix", True, B),
            ("tokenizer.chat_template", DEEPSEEK_V3, S)]


class _Metadata(dict):
    """key -> value, read as Tokenizer.from_gguf and ChatTemplate.from_gguf read a GGUFFile (f.get)."""

    def __init__(self, kv: list[tuple[str, object, ValueType]]):
        super().__init__((k, v) for k, v, _ in kv)


def tokenizer_from_metadata(kv: list[tuple[str, object, ValueType]]) -> tuple[Tokenizer, ChatTemplate]:
    meta = _Metadata(kv)
    return Tokenizer.from_gguf(meta), ChatTemplate.from_gguf(meta)


# ---------------------------------------------------------------------------------------------- streams
@dataclass
class TokenStream:
    """Token ids (N,) int64 and a loss mask (N,) bool: mask[i] says whether predicting tokens[i] counts.
    starts: where windows may begin (conversation starts, for fine-tuning); None: anywhere."""
    tokens: np.ndarray
    mask: np.ndarray
    starts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, batch: int, window: int, seed: int, step: int, micro: int = 0):
        """batch windows of `window` tokens at offsets drawn from (seed, step, micro) -> (tokens, mask)."""
        if len(self.tokens) <= window:
            raise ValueError(f"the data holds {len(self.tokens)} tokens, fewer than one window of {window}; "
                             "give more data or a shorter --seq-len")
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + micro)
        if self.starts is None:
            starts = torch.randint(0, len(self.tokens) - window, (batch,), generator=g).numpy()
        else:
            allowed = self.starts[self.starts <= len(self.tokens) - window]
            starts = allowed[torch.randint(0, len(allowed), (batch,), generator=g).numpy()]
        idx = starts[:, None] + np.arange(window)[None, :]                        # (B, W)
        return torch.from_numpy(self.tokens[idx]), torch.from_numpy(self.mask[idx])


def text_stream(tok: Tokenizer, docs: list[str]) -> TokenStream:
    """Documents as BOS text EOS, one after another; every token is a target."""
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d, add_bos=True, special=False) + [tok.eos_id]
    arr = np.asarray(ids, np.int64)
    return TokenStream(arr, np.ones(len(arr), bool))


def chat_tokens(tok: Tokenizer, template: ChatTemplate, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """A conversation as the template renders it, with the mask on the assistant turns (and their EOS)."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = template.encode(tok, messages[:i], add_generation_prompt=True)
        full = template.encode(tok, messages[:i + 1], add_generation_prompt=False)
        if full[:len(prefix)] != prefix:
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        new_prefix = prefix[len(ids):]
        ids += new_prefix
        mask += [False] * len(new_prefix)
        answer = full[len(prefix):]
        ids += answer
        mask += [True] * len(answer)
    return ids, mask


def chat_stream(tok: Tokenizer, template: ChatTemplate, chats: list[dict]) -> TokenStream:
    """Conversations one after another; only the assistant turns are targets (supervised fine-tuning), and
    windows start where a conversation starts, as a prompt does."""
    ids: list[int] = []
    mask: list[bool] = []
    starts = []
    for c in chats:
        i, m = chat_tokens(tok, template, c["messages"])
        starts.append(len(ids))
        ids += i
        mask += m
    ids += [tok.eos_id] * 512          # so that the last conversations can start a window too
    mask += [False] * 512
    return TokenStream(np.asarray(ids, np.int64), np.asarray(mask, bool), np.asarray(starts, np.int64))


def split(stream_items: list, eval_fraction: float) -> tuple[list, list]:
    """Training and held-out evaluation items: the last eval_fraction of them (at least one) are held out."""
    n_eval = max(1, int(len(stream_items) * eval_fraction)) if eval_fraction > 0 else 0
    return stream_items[:len(stream_items) - n_eval], stream_items[len(stream_items) - n_eval:]
