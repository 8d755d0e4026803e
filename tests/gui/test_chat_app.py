"""`dslocal chat`: the page's handlers in process, then the real page in headless Chromium driven over the
DevTools protocol (a pipe: no port, no extra package)."""
import base64
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from dslocal.gui.chat_app import ChatApp
from dslocal.gui.store import Store
from dslocal.gui.worker import Worker
from dslocal.runtime.load import RunConfig, load
from dslocal.runtime.sampling import Sampling

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("tiny-v3", "q8_0")


def _last(gen):
    out = None
    for out in gen:
        pass
    return out


def test_handlers_persist_regenerate_edit_and_export(model, tmp_path):
    loaded = load(model, RunConfig(context=256), log=open(os.devnull, "w"))
    worker = Worker(loaded.engine, 4).start()
    try:
        app = ChatApp(loaded, worker, Store(tmp_path), Sampling(temperature=0))
        chat, _, conv_id, _, status = _last(app.send("Hello", None, "Be brief.", 0, 1, 6))
        assert [m["role"] for m in chat] == ["user", "assistant"] and "done" in status
        first = chat[1]["content"]
        chat, status = _last(app.regenerate(conv_id, "Be brief.", 0, 1, 6))
        assert chat[1]["content"] == first                             # temperature 0: the same answer again
        again = ChatApp(loaded, worker, Store(tmp_path), Sampling())   # a restart finds the conversation
        assert again.on_load()[0] == conv_id and again.on_load()[1] == chat
        chat, text = app.edit_last(conv_id)
        assert chat == [] and text == "Hello"
        md = open(app.export(conv_id, "md")).read()
        assert md.startswith("# Hello")

        def boom(*a, **k):
            raise RuntimeError("the model fell over")
            yield
        loaded.engine.generate = boom                                  # a crash in generation ...
        chat, _, conv_id, _, status = _last(app.send("Still here?", conv_id, "", 0, 1, 6))
        assert "generation failed" in status and "fell over" in status
        saved = Store(tmp_path).load(conv_id)                          # ... loses nothing that was typed
        assert saved["messages"][0] == {"role": "user", "content": "Still here?"}
        assert json.loads(open(app.export(conv_id, "json")).read())["id"] == conv_id
        app.delete(conv_id)
        assert Store(tmp_path).list() == []
    finally:
        worker.stop()


class Chromium:
    """Headless Chromium with --remote-debugging-pipe: commands go out on its fd 3, replies come on fd 4."""

    def __init__(self, profile):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        high_r, high_w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        self.p = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False,
            preexec_fn=lambda: (os.dup2(high_r, 3), os.dup2(high_w, 4)))
        for fd in (to_r, from_w, high_r, high_w):
            os.close(fd)
        self.out, self.inp = os.fdopen(to_w, "wb"), os.fdopen(from_r, "rb")
        self.replies, self.cond, self.next_id, self.session = {}, threading.Condition(), 0, None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while chunk := self.inp.read1(65536):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for m in messages:
                msg = json.loads(m)
                if "id" in msg:
                    with self.cond:
                        self.replies[msg["id"]] = msg
                        self.cond.notify_all()

    def send(self, method, params=None, session=True, timeout=30):
        with self.cond:
            self.next_id += 1
            i = self.next_id
        msg = {"id": i, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self.out.write(json.dumps(msg).encode() + b"\0")
        self.out.flush()
        with self.cond:
            assert self.cond.wait_for(lambda: i in self.replies, timeout), f"no reply to {method}"
            reply = self.replies.pop(i)
        assert "error" not in reply, reply
        return reply["result"]

    def open(self, url):
        target = self.send("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]

    def js(self, expression):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def wait(self, expression, timeout=60):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))

    def close(self):
        self.p.terminate()
        self.p.wait(10)


BOT = "[...document.querySelectorAll('#chat [data-testid=bot]')].map(e => e.innerText).join('\\n')"
STATUS = "document.querySelector('#status').innerText"


def _type_and_send(browser, text):
    browser.js("(() => { const t = document.querySelector('#msg textarea'); t.focus(); t.value = %s;"
               " t.dispatchEvent(new Event('input', {bubbles: true})); return true })()" % json.dumps(text))
    time.sleep(0.2)                                                  # let the page take the new value
    browser.js("document.querySelector('#send').click()")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chat_page_in_headless_chromium(model, tmp_path):
    assert CHROMIUM, "Debian's chromium is needed: apt-get install -y --no-install-recommends chromium"
    port, log = _free_port(), tmp_path / "chat.txt"
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as err:
        app = subprocess.Popen([sys.executable, "-m", "dslocal.gui.cli", "chat", "--gguf", model, "--port", str(port),
                                "--no-browser", "--ctx", "1024", "--max-tokens", "1000", "--temperature", "0",
                                "--threads", "1"], stdout=subprocess.DEVNULL, stderr=err, env=env)
    browser = None
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"at http://127\.0\.0\.1:\d+", log.read_text()):
            assert app.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        browser = Chromium(tmp_path / "profile")
        browser.open(f"http://127.0.0.1:{port}/")
        browser.wait("!!document.querySelector('#msg textarea')")
        assert "tiny-v3" in browser.js("document.querySelector('#model').innerText")

        _type_and_send(browser, "Good morning")     # a greedy answer that runs to --max-tokens
        browser.wait("document.querySelector('#chat').innerText.includes('Good morning')")
        lengths = set()                                              # the answer grows while it streams
        deadline = time.monotonic() + 60
        while len({n for n in lengths if n}) < 3:
            assert time.monotonic() < deadline, "no streamed answer"
            lengths.add(len(browser.js(BOT)))
            time.sleep(0.02)
        browser.js("document.querySelector('#stop').click()")       # stop during a long (1000-token) answer
        browser.wait(f"{STATUS}.includes('stopped')", timeout=30)
        stopped = browser.js(BOT)
        time.sleep(1.0)
        assert browser.js(BOT) == stopped                            # nothing more arrives
        tokens = int(re.search(r"context (\d+) /", browser.js(STATUS)).group(1))
        assert tokens < 900, "the stop button did not stop the generation"
        shot = tmp_path / "chat.png"
        browser.screenshot(shot)
        shutil.copy(shot, "/tmp/dslocal_chat.png")

        browser.send("Page.reload")                                  # a reload loses nothing
        browser.wait("document.querySelector('#chat') && "
                     "document.querySelector('#chat').innerText.includes('Good morning')")
        assert browser.wait(f"{BOT}.length > 0") and browser.js(BOT).strip()[:20] == stopped.strip()[:20]
        assert "Good morning" in browser.js("document.querySelector('#convs').innerText")
        browser.screenshot(tmp_path / "chat-reloaded.png")
    finally:
        if browser:
            browser.close()
        app.terminate()
        app.wait(15)
