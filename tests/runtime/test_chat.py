"""Chat templates: the built-in DeepSeek formats against llama.cpp's own (llama_chat_apply_template), the
sandbox against template injection (CVE-2024-34359), and R1 reasoning / answer splitting."""
import ctypes
import random

import llama_cpp
import pytest

from dslocal.quant.gguf_file import GGUFFile
from dslocal.quant.gguf_writer import write_gguf
from dslocal.runtime.chat import (BUILTIN, DEEPSEEK_R1, DEEPSEEK_V2, DEEPSEEK_V3, ChatTemplate, ChatTemplateError,
                                  ThinkSplitter, split_reasoning)
from dslocal.runtime.tokenizer import Tokenizer

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


def _m(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    [_m("user", "Hi")],
    [_m("user", "Hi"), _m("assistant", "Hello! How can I help?"), _m("user", "2+2?")],
    [_m("user", "多行\n文本 🙂"), _m("assistant", "  spaced  \n"), _m("user", ""), _m("assistant", "ok")],
    [_m("system", "Be brief."), _m("user", "Hi")],
    [_m("system", "One."), _m("system", "Two."), _m("user", "Hi"), _m("assistant", "Yo"), _m("user", "Bye")],
]


def _llama_cpp_chat(source: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """llama.cpp's rendering: it recognises the template by its text and formats with its C++ code."""
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(source.encode(), chat, len(messages), add_generation_prompt, buf, len(buf))
    assert n >= 0, "llama.cpp did not recognise the template"
    return buf.raw[:n].decode()


def _render(source, messages, add_generation_prompt=True):
    # llama.cpp's formats write no BOS (it is added when tokenizing)
    return ChatTemplate(source).render(messages, add_generation_prompt, bos_token="", eos_token=EOS)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_v2_matches_llama_cpp(messages, add_generation_prompt):
    assert _render(DEEPSEEK_V2, messages, add_generation_prompt) == \
        _llama_cpp_chat(DEEPSEEK_V2, messages, add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [c for c in CONVERSATIONS if c[0]["role"] != "system"])
def test_v3_and_r1_match_llama_cpp(messages, add_generation_prompt):
    ref = _llama_cpp_chat(DEEPSEEK_V3, messages, add_generation_prompt)
    assert _render(DEEPSEEK_V3, messages, add_generation_prompt) == ref
    # llama.cpp has no R1 format (it renders R1 templates as V3): R1 only adds the opened think block
    assert _render(DEEPSEEK_R1, messages, add_generation_prompt) == ref + ("<think>\n" if add_generation_prompt else "")


def test_v3_system_prompt_and_r1_history_follow_the_published_format():
    # DeepSeek's published V3/R1 template joins system messages with a blank line and puts nothing between
    # them and the first turn (llama.cpp's built-in format adds "\n\n" there).
    msgs = CONVERSATIONS[4]
    assert ChatTemplate(DEEPSEEK_V3).render(msgs, bos_token=BOS) == \
        f"{BOS}One.\n\nTwo.{USER}Hi{ASSISTANT}Yo{EOS}{USER}Bye{ASSISTANT}"
    r1 = [_m("user", "Hi"), _m("assistant", "<think>\nlet me see\n</think>\n\nHello"), _m("user", "More")]
    assert ChatTemplate(DEEPSEEK_R1).render(r1, bos_token=BOS) == \
        f"{BOS}{USER}Hi{ASSISTANT}\n\nHello{EOS}{USER}More{ASSISTANT}<think>\n"
    with pytest.raises(ChatTemplateError, match="no role tool"):
        ChatTemplate(DEEPSEEK_V3).render([_m("tool", "{}")])


def _without_template(path, out) -> str:
    with GGUFFile(path) as f:
        kv = [x for x in f.items() if x[0] != "tokenizer.chat_template"]
    write_gguf(out, kv, [])
    return str(out)


def test_template_comes_from_the_file_or_the_vocabulary(tiny_gguf, tmp_path):
    for preset, builtin in (("tiny-v2", "deepseek-v2"), ("tiny-v3", "deepseek-v3")):
        with GGUFFile(tiny_gguf(preset)) as f:
            assert ChatTemplate.from_gguf(f).source == f.get("tokenizer.chat_template")
            assert ChatTemplate.from_gguf(f, "deepseek-r1").source == DEEPSEEK_R1
            assert ChatTemplate.from_gguf(f, "{{ bos_token }}").render([]) == BOS
        with GGUFFile(_without_template(tiny_gguf(preset), tmp_path / f"{preset}.gguf")) as f:
            assert ChatTemplate.from_gguf(f).source == BUILTIN[builtin]


def test_prompt_ids_have_one_bos_and_single_special_tokens(tiny_gguf):
    path = tiny_gguf("tiny-v3")
    with GGUFFile(path) as f:
        tok = Tokenizer.from_gguf(f)
        tmpl = ChatTemplate.from_gguf(f)
    msgs = CONVERSATIONS[1]
    text = tmpl.render(msgs)
    ids = tmpl.encode(tok, msgs)
    assert text.startswith(BOS) and ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids.count(tok.token_to_id(USER)) == 2 and ids.count(tok.token_to_id(ASSISTANT)) == 2
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    try:
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    no_bos = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert no_bos.encode(tok, msgs)[0] == tok.bos_id            # BOS added when the template writes none


def test_hugging_face_template_variables(tiny_gguf):
    src = ("{{ bos_token }}|{{ eos_token }}|{{ messages | tojson }}|{{ add_generation_prompt }}|"
           "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
           "{{ strftime_now('%Y') | length }}|{{ tools is defined }}|{{ thinking }}")
    with GGUFFile(tiny_gguf("tiny-v3")) as f:
        tmpl = ChatTemplate.from_gguf(f, src)              # BOS / EOS texts from the file's vocabulary
    out = tmpl.render([_m("user", "é"), _m("assistant", "x")], False, thinking=True)
    assert out == f'{BOS}|{EOS}|[{{"role": "user", "content": "é"}}, {{"role": "assistant", "content": "x"}}]|False|' \
                  "user|4|False|True"


MALICIOUS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c(['touch', 'CANARY']) }}{% endif %}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.popen('touch CANARY').read() }}",
    "{{ joiner.__init__.__globals__['os'].system('touch CANARY') }}",
    "{{ lipsum.__globals__['os'].system('touch CANARY') }}",
    "{{ self.__init__.__globals__.__builtins__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ '{0.__class__.__base__}'.format(1) }}",
    "{% set f = '{0.__class__.__mro__}'.format %}{{ f(1) }}",          # CVE-2024-56326 (Jinja < 3.1.5)
    "{{ ('{0.__class__}' | attr('format'))(1) }}",                    # CVE-2025-27516 (Jinja < 3.1.6)
    "{{ messages | map(attribute='__class__') | list }}",
    "{{ messages.__class__ }}",
    "{{ messages.append('x') }}",
    "{{ 'A' * 1000000000 }}",
]


@pytest.mark.parametrize("source", MALICIOUS)
def test_sandbox_blocks_python_internals(source, tmp_path):
    canary = tmp_path / "canary"                      # what the template would create if it escaped
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        ChatTemplate(source.replace("CANARY", str(canary))).render([_m("user", "hi")])
    assert not canary.exists()


@pytest.mark.parametrize("source,message", [
    ("{% if %}", "does not compile"),
    ("{{ raise_exception('only user and assistant') }}", "rejected the conversation: only user and assistant"),
    ("{{ messages[0]['content'] + 1 }}", "failed: TypeError"),
    ("{{ range(10000000) | list }}", "failed: OverflowError"),
    ("{{ nothing.attribute }}", "failed: UndefinedError"),
])
def test_template_errors_are_chat_template_errors(source, message):
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate(source).render([_m("user", "hi")])


SPLITS = [
    ("<think>\nI should add.\n</think>\n\n4", False, ("I should add.", "4")),
    ("I should add.\n</think>\n\nIt is 4.", True, ("I should add.", "It is 4.")),
    ("  <think>a</think>b", False, ("a", "b")),
    ("Just an answer with </think> and <think> in it", False, ("", "Just an answer with </think> and <think> in it")),
    ("<think>never closed", False, ("never closed", "")),
    ("open in prompt, never closed", True, ("open in prompt, never closed", "")),
    ("<think></think>", False, ("", "")),
    ("<thinking> is not the tag", False, ("", "<thinking> is not the tag")),
    ("<think>x</think>answer <think>y</think>", False, ("x", "answer <think>y</think>")),
    ("", True, ("", "")),
]


@pytest.mark.parametrize("text,in_think,expected", SPLITS)
def test_split_reasoning(text, in_think, expected):
    assert split_reasoning(text, in_think) == expected


@pytest.mark.parametrize("text,in_think,expected", SPLITS)
def test_think_splitter_streams_like_the_whole(text, in_think, expected):
    rng = random.Random(0)
    for trial in range(20):
        s = ThinkSplitter(in_think)
        parts, i = [], 0
        states = []
        while i < len(text):
            n = 1 if trial == 0 else rng.randint(1, 6)
            parts += s.feed(text[i:i + n])
            states.append(s.in_think)
            i += n
        parts += s.flush()
        assert all(t for _, t in parts)
        got = ("".join(t for r, t in parts if r).strip(), "".join(t for r, t in parts if not r).strip())
        assert got == expected
        if expected[1] and parts and not parts[-1][0]:
            assert not s.in_think


def test_think_splitter_for_r1_prompt():
    prompt = ChatTemplate(DEEPSEEK_R1, BOS, EOS).render([_m("user", "2+2?")])
    s = ThinkSplitter.for_prompt(prompt)
    assert s.in_think
    assert s.feed("Two and two.</th") == [(True, "Two and two.")] and s.in_think
    assert s.feed("ink>\n\n") == [] and not s.in_think
    assert s.feed("Four.") == [(False, "Four.")]
    assert not ThinkSplitter.for_prompt(ChatTemplate(DEEPSEEK_V3, BOS, EOS).render([_m("user", "2+2?")])).in_think
