"""`dslocal run`: one-shot completion for scripts, and the interactive loop driven through its stdin."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

CLI = [sys.executable, "-m", "dslocal.gui.cli", "run"]


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("tiny-v3", "q8_0")


def _run(args, **kw):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=300, **kw)


def test_prompt_prints_only_the_completion(model, tmp_path):
    r = _run(["--gguf", model, "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    assert "runs on" in r.stderr and "runs on" not in r.stdout       # the resolved setup goes to stderr
    again = _run(["--gguf", model, "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0"])
    assert again.stdout == r.stdout and r.stdout.endswith("\n")
    raw = _run(["--gguf", model, "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0", "--raw"])
    assert raw.returncode == 0 and raw.stdout != r.stdout             # no chat template around the prompt


def test_user_mistakes_are_one_line_and_exit_2(model, tmp_path):
    long = _run(["--gguf", model, "--prompt", "word " * 400, "--ctx", "128"])
    assert long.returncode == 2 and long.stderr.strip().splitlines()[-1].startswith("dslocal run: the prompt has")
    missing = _run(["--gguf", str(tmp_path / "nope.gguf"), "--prompt", "hi"])
    assert missing.returncode == 2 and missing.stderr.strip() == f"dslocal: {tmp_path / 'nope.gguf'}: no such file"
    bad = _run(["--gguf", model, "--prompt", "hi", "--top-p", "0"])
    assert bad.returncode == 2 and "top_p" in bad.stderr and "Traceback" not in bad.stderr


class _Session:
    """The REPL in a subprocess, fed line by line; stdout is collected by a thread."""

    def __init__(self, args):
        env = dict(os.environ, XDG_DATA_HOME=args.pop())
        self.p = subprocess.Popen(CLI + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.out = []
        threading.Thread(target=lambda: self.out.extend(iter(lambda: self.p.stdout.read(1), "")),
                         daemon=True).start()

    def send(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def text(self):
        return "".join(self.out)

    def wait_for(self, needle, timeout=300):
        end = time.time() + timeout
        while needle not in self.text():
            assert time.time() < end, f"{needle!r} did not appear; output so far: {self.text()!r}"
            time.sleep(0.05)


def test_interactive_commands_and_ctrl_c(model, tmp_path):
    s = _Session(["--gguf", model, "--temperature", "0", "--max-tokens", "5", str(tmp_path)])
    try:
        s.send("/help")
        s.wait_for("/reset")
        s.send("/set temperature 0.5")
        s.wait_for("(temperature = 0.5)")
        s.send("/set top_p 7")
        s.wait_for("not set: top_p must be in (0, 1]")
        s.send("/set max_tokens 100000")
        s.wait_for("(max_tokens = 100000)")
        # Ctrl-C while an answer streams stops it. The sampled answer may also end by itself before the signal
        # lands (the reader thread lags on a loaded machine); Ctrl-C at the prompt then only says how to leave,
        # and the question is asked again
        for attempt in range(5):
            before = len(s.text())
            s.send("Tell me a long story")
            end = time.time() + 300
            while len(s.text()) < before + 40:             # the answer (up to 4096 tokens) is streaming
                assert time.time() < end, s.text()
                time.sleep(0.05)
            s.p.send_signal(signal.SIGINT)
            end = time.time() + 300
            while "[stopped]" not in s.text()[before:] and "(Ctrl-D or /quit to leave)" not in s.text()[before:]:
                assert time.time() < end, s.text()
                time.sleep(0.05)
            if "[stopped]" in s.text()[before:]:
                break
        assert "[stopped]" in s.text(), s.text()
        s.send("/stats")
        s.wait_for("tokens/s")
        s.send("/system You are terse.")
        s.wait_for("(system prompt set; conversation cleared)")
        s.send("/quit")
        assert s.p.wait(timeout=60) == 0
    finally:
        s.p.kill()


def test_out_of_memory_keeps_the_conversation(model, capsys, monkeypatch):
    """The device running out of memory for a message is one line; the conversation before it stays."""
    from dslocal.gui.repl import Repl
    from dslocal.runtime.generate import OutOfMemory
    from dslocal.runtime.load import RunConfig, load
    from dslocal.runtime.sampling import Sampling
    loaded = load(model, RunConfig(context=64))
    repl = Repl(loaded, Sampling(temperature=0.0, max_tokens=4), "")
    repl.answer("Hi")
    kept = list(repl.messages)

    def no_room(ids, sampling):
        raise OutOfMemory("the GPU ran out of memory for a prompt of 9 new tokens")
    monkeypatch.setattr(loaded.engine, "generate", no_room)
    capsys.readouterr()
    repl.answer("Tell me more")
    assert len(kept) == 2 and repl.messages == kept
    assert "dslocal: the GPU ran out of memory for a prompt of 9 new tokens" in capsys.readouterr().out
