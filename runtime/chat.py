"""Chat prompts and R1-style output.

- ChatTemplate: the file's Jinja chat template (tokenizer.chat_template) rendered in Jinja's immutable
  sandbox with the variables Hugging Face templates expect. A template cannot reach Python internals:
  llama-cpp-python rendered templates unsandboxed and a GGUF file could run code (CVE-2024-34359).
- Built-in DeepSeek V2, V3 and R1 templates, written after the published chat formats, for files without one.
- ThinkSplitter / split_reasoning: R1 output is "<think>reasoning</think>answer"; split it, also while
  streaming.
"""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dslocal.quant.gguf_file import GGUFFile
from dslocal.runtime.tokenizer import Tokenizer


class ChatTemplateError(ValueError):
    """A chat template that does not compile, fails while rendering, or tries something the sandbox forbids."""


# DeepSeek-V2 (and V2-Lite, Coder-V2): "User: ...\n\nAssistant: ...<eos>", system text first.
DEEPSEEK_V2 = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{%- else %}{{ raise_exception('the DeepSeek-V2 chat format has no role ' ~ message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# DeepSeek-V3: BOS, the system messages joined by blank lines, then <｜User｜>... / <｜Assistant｜>...<｜end▁of▁sentence｜>.
_V3_HEAD = (
    "{%- set ns = namespace(system='') %}"
    "{%- for message in messages if message['role'] == 'system' %}"
    "{%- set ns.system = ns.system + ('' if loop.first else '\\n\\n') + message['content'] %}"
    "{%- endfor %}"
    "{{ bos_token + ns.system }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
)
_V3_TAIL = (
    "{%- elif message['role'] != 'system' %}"
    "{{ raise_exception('the DeepSeek chat format has no role ' ~ message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
)
DEEPSEEK_V3 = (
    _V3_HEAD
    + "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    + _V3_TAIL
    + "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
# DeepSeek-R1: as V3, but earlier answers lose their <think>...</think> part, and the generation prompt opens one.
DEEPSEEK_R1 = (
    _V3_HEAD
    + "{%- set content = message['content'] %}"
      "{%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
      "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    + _V3_TAIL
    + "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
BUILTIN = {"deepseek-v2": DEEPSEEK_V2, "deepseek-v3": DEEPSEEK_V3, "deepseek-r1": DEEPSEEK_R1}

_MAX_SEQUENCE = 1 << 24   # longest string / list a template may build with * (a repeat bomb is an error)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (no attributes starting with "_", no mutation of lists and dicts, no
    unsafe str.format), where an unsafe attribute is an error at once (Jinja renders it as an empty
    Undefined), and sequence repetition is bounded too."""
    intercepted_binops = frozenset(["*", "**"])

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_SEQUENCE:
                    raise jinja2.exceptions.SecurityError("the template builds a sequence that is too long")
        if operator == "**" and isinstance(right, int) and right > 1024:
            raise jinja2.exceptions.SecurityError("the template raises a number to a power above 1024")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message):
    raise ChatTemplateError(f"the chat template rejected the conversation: {message}")


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    # transformers' tojson: non-ASCII kept as is (Jinja's own filter escapes it for HTML)
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template and the BOS / EOS texts it is given."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "template"):
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template ({name}) does not compile: {e.message} (line {e.lineno})") \
                from None

    @classmethod
    def from_gguf(cls, f: GGUFFile, override: str | None = None) -> ChatTemplate:
        """The file's tokenizer.chat_template, else the built-in DeepSeek template for its vocabulary.
        override: a built-in name (deepseek-v2, deepseek-v3, deepseek-r1) or Jinja source to use instead."""
        tokens = f.get("tokenizer.ggml.tokens") or []

        def text(key: str) -> str:
            i = f.get(f"tokenizer.ggml.{key}")
            return tokens[int(i)] if i is not None and int(i) < len(tokens) else ""

        special = dict(bos_token=text("bos_token_id"), eos_token=text("eos_token_id"))
        if override is not None:
            if override in BUILTIN:
                return cls(BUILTIN[override], **special, name=override)
            return cls(override, **special, name="given template")
        source = f.get("tokenizer.chat_template")
        if source:
            return cls(source, **special, name="tokenizer.chat_template")
        name = builtin_name(f.get("tokenizer.ggml.pre"), tokens)
        return cls(BUILTIN[name], **special, name=name)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text. messages: [{"role": "system" | "user" | "assistant", "content": str}, ...];
        extra: more template variables (tools, thinking, ...; bos_token / eos_token override the file's)."""
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token} | extra
        variables |= {"messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**variables)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"the chat template ({self.name}) tried something the sandbox forbids: {e}") \
                from None
        except Exception as e:   # anything a template can raise (TypeError, KeyError, UndefinedError, ...)
            raise ChatTemplateError(f"the chat template ({self.name}) failed: {type(e).__name__}: {e}") from None

    def encode(self, tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
               **extra) -> list[int]:
        """Token ids of the rendered prompt: special tokens parsed, BOS added only if the template wrote none."""
        ids = tokenizer.encode(self.render(messages, add_generation_prompt, **extra), add_bos=False, special=True)
        if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_id):
            ids.insert(0, tokenizer.bos_id)
        return ids


def builtin_name(pre: str | None, tokens: list[str]) -> str:
    """The built-in template for a vocabulary: V3 for deepseek-v3 (or a vocabulary with the V3 chat tokens),
    V2 otherwise. R1 shares V3's vocabulary, so it is chosen only by name."""
    if pre == "deepseek-v3":
        return "deepseek-v3"
    if pre in ("deepseek-llm", "deepseek-coder"):
        return "deepseek-v2"
    return "deepseek-v3" if {"<｜User｜>", "<｜Assistant｜>"} <= set(tokens) else "deepseek-v2"


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_START, _THINK, _ANSWER = 0, 1, 2


class ThinkSplitter:
    """Splits streamed R1 output into reasoning and answer. feed(text) returns [(is_reasoning, text), ...]
    for what can be told so far (a tag cut between two pieces is held back); flush() returns the rest.
    A "<think>" opens the block only at the start of the output; in_think says whether we are inside.
    Whitespace right after either tag is dropped."""

    def __init__(self, in_think: bool = False):
        self._state = _THINK if in_think else _START
        self._buf = ""
        self._skip_ws = in_think

    @classmethod
    def for_prompt(cls, prompt: str) -> ThinkSplitter:
        """A splitter for output that continues prompt (R1 prompts end inside an open <think>)."""
        return cls(in_think=prompt.rstrip().endswith(THINK_OPEN))

    @property
    def in_think(self) -> bool:
        return self._state == _THINK

    def feed(self, text: str) -> list[tuple[bool, str]]:
        self._buf += text
        out: list[tuple[bool, str]] = []
        while self._buf:
            if self._state == _START:
                head = self._buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self._buf, self._state, self._skip_ws = head[len(THINK_OPEN):], _THINK, True
                    continue
                if THINK_OPEN.startswith(head):
                    break                                   # maybe the start of "<think>": wait
                self._state = _ANSWER
            elif self._state == _THINK:
                k = self._buf.find(THINK_CLOSE)
                if k >= 0:
                    self._emit(out, True, self._buf[:k])
                    self._buf, self._state, self._skip_ws = self._buf[k + len(THINK_CLOSE):], _ANSWER, True
                    continue
                keep = _partial_tag(self._buf, THINK_CLOSE)
                self._emit(out, True, self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            else:
                self._emit(out, False, self._buf)
                self._buf = ""
        return out

    def flush(self) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        self._emit(out, self._state == _THINK, self._buf)
        self._buf = ""
        return out

    def _emit(self, out: list, reasoning: bool, text: str) -> None:
        if self._skip_ws:
            text = text.lstrip()
            self._skip_ws = not text
        if text:
            out.append((reasoning, text))


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper beginning of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_reasoning(text: str, in_think: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole R1 output; in_think: the prompt opened the <think> block."""
    s = ThinkSplitter(in_think)
    parts = s.feed(text) + s.flush()
    return ("".join(t for r, t in parts if r).strip(), "".join(t for r, t in parts if not r).strip())
