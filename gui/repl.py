"""`dslocal run`: chat with a model in the terminal, or complete one prompt for a script (--prompt)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from dslocal.runtime.chat import ThinkSplitter
from dslocal.runtime.generate import ContextFull, OutOfMemory, Stats
from dslocal.gui.options import add_model_arguments, load_model
from dslocal.runtime.load import Loaded
from dslocal.runtime.sampling import Sampling

HELP = """commands:
  /help                 this text
  /reset                forget the conversation (the system prompt stays)
  /system TEXT          set the system prompt and start over
  /set KEY VALUE        sampling: temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens
  /stats                prompt and generation speed of the last answer
  /quit                 leave (or Ctrl-D); Ctrl-C stops an answer"""

SETTABLE = {"temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
            "min_p": ("min_p", float), "repeat_penalty": ("repetition_penalty", float),
            "repetition_penalty": ("repetition_penalty", float), "seed": ("seed", int),
            "max_tokens": ("max_tokens", int)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", help="complete this one prompt, print only the completion and exit")
    p.add_argument("--raw", action="store_true", help="with --prompt: no chat template, plain completion")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=Sampling.top_k)
    p.add_argument("--top-p", type=float, default=Sampling.top_p)
    p.add_argument("--min-p", type=float, default=Sampling.min_p)
    p.add_argument("--repeat-penalty", type=float, default=Sampling.repetition_penalty)
    p.add_argument("--seed", type=int)


def run(args: argparse.Namespace) -> int:
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repetition_penalty=args.repeat_penalty, seed=args.seed,
                        max_tokens=args.max_tokens).check()
    loaded = load_model(args)
    if args.prompt is not None:
        return _complete_once(loaded, args, sampling)
    return Repl(loaded, sampling, args.system).loop()


def _prompt_ids(loaded: Loaded, messages: list[dict]) -> list[int]:
    return loaded.template.encode(loaded.engine.tokenizer, messages, add_generation_prompt=True)


def _complete_once(loaded: Loaded, args, sampling: Sampling) -> int:
    tok = loaded.engine.tokenizer
    if args.raw:
        ids = tok.encode(args.prompt, add_bos=True, special=True)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        ids = _prompt_ids(loaded, messages)
    for piece in loaded.engine.generate(ids, sampling):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        if piece.finish == "context":
            print(f"\ndslocal: the context of {loaded.engine.context_length} tokens is full", file=sys.stderr)
    sys.stdout.write("\n")
    return 0


class Repl:
    """The interactive loop: a conversation, its sampling settings and the last answer's speed."""

    def __init__(self, loaded: Loaded, sampling: Sampling, system: str):
        self.loaded, self.sampling, self.system = loaded, sampling, system
        self.messages: list[dict] = []
        self.stats: Stats | None = None

    def loop(self) -> int:
        _readline_history()
        print(f"dslocal: chatting with {self.loaded.name}. /help for commands, Ctrl-D to leave.", file=sys.stderr)
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print("\n(Ctrl-D or /quit to leave)")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "quit":
                    return 0
                continue
            self.answer(line)

    def command(self, line: str) -> str | None:
        cmd, _, rest = line.partition(" ")
        rest = rest.strip()
        if cmd in ("/quit", "/exit", "/bye"):
            return "quit"
        if cmd == "/help":
            print(HELP)
        elif cmd == "/reset":
            self.messages = []
            print("(conversation cleared)")
        elif cmd == "/system":
            self.system, self.messages = rest, []
            print("(system prompt set; conversation cleared)")
        elif cmd == "/stats":
            print(_format_stats(self.stats) if self.stats else "(no answer yet)")
        elif cmd == "/set":
            self.set(rest)
        else:
            print(f"unknown command {cmd}; /help lists them")
        return None

    def set(self, rest: str) -> None:
        key, _, value = rest.partition(" ")
        if key not in SETTABLE or not value.strip():
            print(f"usage: /set KEY VALUE with KEY one of {', '.join(sorted(SETTABLE))}")
            return
        name, cast = SETTABLE[key]
        try:
            self.sampling = dataclasses.replace(self.sampling, **{name: cast(value.strip())}).check()
        except ValueError as e:
            print(f"not set: {e}")
            return
        print(f"({name} = {getattr(self.sampling, name)})")

    def answer(self, text: str) -> None:
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = system + self.messages + [{"role": "user", "content": text}]
        try:
            ids = _prompt_ids(self.loaded, messages)
            self.loaded.engine.check_prompt(len(ids))
        except ContextFull as e:
            print(f"dslocal: {e}. Type /reset to start a new conversation.")
            return
        reply, finish = [], None
        # R1-style reasoning (<think>...</think>) is shown dimmed on a terminal, apart from the answer
        split = ThinkSplitter.for_prompt(self.loaded.template.render(messages, add_generation_prompt=True))
        try:
            for piece in self.loaded.engine.generate(ids, self.sampling):
                _show(split.feed(piece.text))
                reply.append(piece.text)
                finish, self.stats = piece.finish, piece.stats
            _show(split.flush())
        except KeyboardInterrupt:
            finish = "interrupted"
            _show(split.flush())
            print(" [stopped]", end="")
        except OutOfMemory as e:         # the conversation stays as it was: the message can be sent again
            print(f"\ndslocal: {e}")
            return
        print()
        if finish == "context":
            print(f"(the context of {self.loaded.engine.context_length} tokens is full: /reset to start over)")
        self.messages = messages[len(system):] + [{"role": "assistant", "content": "".join(reply)}]


def _show(parts: list[tuple[bool, str]]) -> None:
    dim = sys.stdout.isatty()
    for reasoning, text in parts:
        print(f"\033[2m{text}\033[0m" if reasoning and dim else text, end="", flush=True)


def _format_stats(s: Stats) -> str:
    cached = s.prompt_tokens - s.prefilled_tokens
    return (f"prompt: {s.prompt_tokens} tokens ({cached} from the cache), {s.prefill_tps:.1f} tokens/s; "
            f"answer: {s.generated_tokens} tokens, {s.decode_tps:.1f} tokens/s")


def _readline_history() -> None:
    """Line editing and a persistent history where the readline module exists."""
    try:
        import readline
    except ImportError:
        return
    import atexit
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    path = os.path.join(data, "dslocal", "repl_history")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        readline.read_history_file(path)
    except OSError:
        pass   # no history yet, or a read-only home: editing still works
    readline.set_history_length(1000)
    atexit.register(_save_history, readline, path)


def _save_history(readline, path: str) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass   # history is a convenience; a read-only home must not make leaving fail
