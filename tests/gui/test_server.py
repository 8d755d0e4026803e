"""`dslocal serve` driven by the official openai client and by raw sockets: the API, the queue, disconnects."""
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from dslocal.gui.server import Options, Server
from dslocal.quant import synthetic
from dslocal.runtime.load import RunConfig, load

KEY = "sk-dslocal-test"
QUEUE = 8
CTX = 4096
LIMIT = 4000     # --max-tokens-limit: long answers that keep the server busy for seconds at ~1 ms a token


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    """A running `dslocal serve` subprocess on a free port; yields its base URL, stopped at the end."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "dslocal.gui.cli", "serve", "--gguf", tiny_gguf("tiny-v3", "q8_0"),
                              "--port", "0", "--ctx", str(CTX), "--queue", str(QUEUE), "--max-tokens-limit", str(LIMIT),
                              "--max-body", "65536", "--threads", "1"],
                             stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ, DSLOCAL_API_KEY=KEY))
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log.read_text())):
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield m.group(1)
    finally:
        p.terminate()
        p.wait(10)


def _client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _ask(url, prompt, max_tokens=8):
    r = _client(url).chat.completions.create(model="tiny-v3", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content


def _health(url):
    with _raw(url) as c:
        c.request("GET", "/health")
        return json.loads(c.getresponse().read())


class _raw(http.client.HTTPConnection):
    def __init__(self, url):
        super().__init__(url.removeprefix("http://"), timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _start_long_stream(url, max_tokens=LIMIT):
    """A streaming request left open after its first event; returns the response (close it to leave: with
    'Connection: close' the response owns the socket)."""
    c = _raw(url)
    c.request("POST", "/v1/chat/completions", json.dumps({
        "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True}), {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    r = c.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    return r


def _wait_until(cond, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_openai_client_chat_completions_models_and_key(server):
    c = _client(server)
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny-v3"]

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    r = c.chat.completions.create(model="tiny-v3", messages=msgs, max_tokens=6, temperature=0, seed=1)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("length", "stop") and r.choices[0].message.content
    assert r.usage.completion_tokens <= 6 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(c.chat.completions.create(model="tiny-v3", messages=msgs, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content                     # streaming and plain agree at temperature 0
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason

    done = c.completions.create(model="tiny-v3", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 5
    streamed = "".join(x.choices[0].text for x in c.completions.create(
        model="tiny-v3", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True))
    assert streamed == done.choices[0].text

    with pytest.raises(openai.AuthenticationError) as e:
        _client(server, "wrong-key").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert _health(server)["status"] == "ok"                          # the health check needs no key


def test_refusals_say_why(server):
    c = _client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-v3", messages=[{"role": "user", "content": "word " * (CTX + 100)}])
    assert f"context is {CTX} tokens" in e.value.body["message"] and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-v3", messages=[{"role": "user", "content": "hi"}], max_tokens=LIMIT + 1)
    assert "--max-tokens-limit" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-v3", messages=[{"role": "tool", "content": "hi"}])
    assert "role" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-v3", messages=[{"role": "user", "content": "hi"}], top_p=0)
    assert "top_p" in e.value.body["message"]

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    for body, status in ((b"{not json", 400), (b"x" * 70000, 413)):
        with _raw(server) as h:
            h.request("POST", "/v1/chat/completions", body, headers)
            r = h.getresponse()
            assert r.status == status and set(json.loads(r.read())["error"]) == {"message", "type", "param", "code"}
    with _raw(server) as h:
        h.request("GET", "/v1/nothing", headers=headers)
        assert h.getresponse().status == 404


def test_eight_clients_at_once_get_what_each_gets_alone(server):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]
    alone = [_ask(server, p) for p in prompts]
    got = [None] * 8

    def ask(i):
        got[i] = _ask(server, prompts[i])
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == alone and all(alone)


def test_a_client_that_leaves_mid_stream_does_not_stall_the_others(server):
    alone = _ask(server, "Still there?")
    t0 = time.monotonic()
    _ask(server, "Tell me everything.", max_tokens=40)
    t40 = time.monotonic() - t0                                      # what 40 tokens cost on this machine
    c = _start_long_stream(server)
    after = []
    t = threading.Thread(target=lambda: after.append(_ask(server, "Still there?")))
    t.start()
    _wait_until(lambda: _health(server)["waiting"] == 1)
    t0 = time.monotonic()
    c.close()                                                        # leaves after its first token
    t.join(120)
    waited = time.monotonic() - t0
    assert after == [alone]
    assert waited < 2 * t40, f"{waited:.1f} s: the other client waited for the one that left ({t40:.1f} s / 40 tokens)"
    _wait_until(lambda: not _health(server)["busy"], timeout=30)


def test_queue_full_is_429_and_leaving_clients_are_dropped(server):
    running = _start_long_stream(server)                             # several seconds even on a fast machine
    waiting = [_start_long_request(server) for _ in range(QUEUE)]
    _wait_until(lambda: _health(server)["waiting"] == QUEUE)
    with pytest.raises(openai.RateLimitError) as e:
        _ask(server, "one too many")
    assert e.value.status_code == 429 and "waiting" in e.value.body["message"]
    for s in waiting + [running]:
        s.close()
    _wait_until(lambda: (h := _health(server))["waiting"] == 0 and not h["busy"])
    assert _ask(server, "Hello")                                     # served at once again


def _start_long_request(url):
    """A non-streaming request whose answer is never read (a raw socket, closed by the test)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 200}).encode()
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
              b"\r\n\r\n" + body)
    return s


def test_a_template_that_reaches_for_python_internals_is_a_clear_error(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = ("{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
            "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr(synthetic, "V3_CHAT_TEMPLATE", evil)
    path = str(tmp_path / "evil.gguf")
    synthetic.build(path, synthetic.preset("tiny-v3"), "q8_0")
    srv = Server(load(path, RunConfig(context=64), log=open(os.devnull, "w")), Options(queue=1), port=0).start()
    try:
        with pytest.raises(openai.BadRequestError) as e:
            _client(srv.url, "none").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert "sandbox forbids" in e.value.body["message"] and e.value.body["code"] == "chat_template_error"
        assert not marker.exists()
    finally:
        srv.stop()
