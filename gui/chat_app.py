"""`dslocal chat`: a chat window (a Gradio page on 127.0.0.1, opened as a desktop window) over the one generator.

Every page event that generates submits a Job to the one Worker thread that owns the engine, and streams its
pieces into the page; the stop button cancels the Job, which closes the generator between two tokens.
Conversations live in a Store on disk: the user's message is written before generation starts and the
answer is written while it streams, so a reload, a restart or a crash loses nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import webbrowser

from dslocal.gui.options import add_model_arguments, add_sampling_defaults, default_sampling, load_model
from dslocal.gui.store import Store, to_json, to_markdown
from dslocal.gui.worker import Job, QueueFull, Worker
from dslocal.runtime.chat import ChatTemplateError, ThinkSplitter
from dslocal.runtime.generate import ContextFull
from dslocal.runtime.load import Loaded
from dslocal.runtime.sampling import Sampling

CHROMIUM_FAMILY = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "brave-browser",
                   "microsoft-edge", "microsoft-edge-stable")
CSS = "#status {font-size: 0.85em; opacity: 0.8} footer {display: none !important}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_defaults(p)
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default 7860)")
    p.add_argument("--no-browser", action="store_true", help="do not open a window; just print the address")
    p.add_argument("--max-tokens", type=int, default=1024, help="default answer length limit (default 1024)")
    p.add_argument("--data-dir", help="where conversations are kept "
                                      "(default $XDG_DATA_HOME/dslocal/conversations or ~/.local/share/...)")


class ChatApp:
    """The page's event handlers: a conversation store, the engine's worker and the running job of each
    conversation."""

    def __init__(self, loaded: Loaded, worker: Worker, store: Store, defaults: Sampling):
        self.loaded, self.worker, self.store, self.defaults = loaded, worker, store, defaults
        self.context = loaded.engine.context_length
        self.jobs: dict[str, Job] = {}

    # what the page shows

    def view(self, conv: dict | None) -> list[dict]:
        out = []
        for m in conv["messages"] if conv else []:
            if m.get("reasoning"):
                out.append({"role": "assistant", "content": m["reasoning"],
                            "metadata": {"title": "Reasoning", "status": "done" if m.get("finish") else "pending"}})
            if m["content"] or m["role"] == "user" or not m.get("reasoning"):
                out.append({"role": m["role"], "content": m["content"]})
        return out

    def conversations(self, selected: str | None):
        import gradio as gr
        return gr.update(choices=[(c["title"], c["id"]) for c in self.store.list()], value=selected)

    def status(self, used: int = 0, tps: float = 0.0, state: str = "") -> str:
        return f"context {used} / {self.context} tokens · {tps:.1f} tokens/s" + (f" · {state}" if state else "")

    # events

    def on_load(self):
        convs = self.store.list()
        conv = self.store.load(convs[0]["id"]) if convs else None
        return self.open(conv["id"] if conv else None)

    def open(self, conv_id: str | None):
        conv = self.store.load(conv_id) if conv_id else None
        return (conv_id if conv else None, self.view(conv), self.conversations(conv_id if conv else None),
                conv["system"] if conv else "", self.status())

    def new(self):
        return None, [], self.conversations(None), "", self.status()

    def delete(self, conv_id: str | None):
        if conv_id:
            self.stop(conv_id)
            self.store.delete(conv_id)
        return self.on_load()

    def clear(self, conv_id: str | None):
        conv = self.store.load(conv_id) if conv_id else None
        if conv:
            self.stop(conv_id)
            conv["messages"] = []
            self.store.save(conv)
        return self.view(conv), self.status()

    def stop(self, conv_id: str | None) -> None:
        job = self.jobs.get(conv_id or "")
        if job is not None:
            job.cancel()

    def edit_last(self, conv_id: str | None):
        """Take the last user message back into the input box, dropping it and the answer after it."""
        conv = self.store.load(conv_id) if conv_id else None
        text = ""
        if conv:
            self.stop(conv_id)
            users = [i for i, m in enumerate(conv["messages"]) if m["role"] == "user"]
            if users:
                text = conv["messages"][users[-1]]["content"]
                conv["messages"] = conv["messages"][:users[-1]]
                self.store.save(conv)
        return self.view(conv), text

    def send(self, text: str, conv_id: str | None, system: str, temperature: float, top_p: float, max_tokens: int):
        if not text.strip():
            conv = self.store.load(conv_id) if conv_id else None
            yield self.view(conv), "", conv_id, self.conversations(conv_id), self.status()
            return
        conv = (self.store.load(conv_id) if conv_id else None) or self.store.new()
        conv["system"] = system
        conv["messages"].append({"role": "user", "content": text})
        self.store.save(conv)                      # before generating: a crash must not lose what was typed
        yield self.view(conv), "", conv["id"], self.conversations(conv["id"]), self.status(state="waiting…")
        for chat, status in self._answer(conv, temperature, top_p, max_tokens):
            yield chat, "", conv["id"], self.conversations(conv["id"]), status

    def regenerate(self, conv_id: str | None, system: str, temperature: float, top_p: float, max_tokens: int):
        conv = self.store.load(conv_id) if conv_id else None
        if not conv or not conv["messages"]:
            yield self.view(conv), self.status()
            return
        while conv["messages"] and conv["messages"][-1]["role"] == "assistant":
            conv["messages"].pop()
        conv["system"] = system
        self.store.save(conv)
        yield from self._answer(conv, temperature, top_p, max_tokens)

    def _answer(self, conv: dict, temperature: float, top_p: float, max_tokens: int):
        """Generate the next assistant message of conv, yielding (chat view, status) as it streams."""
        messages = ([{"role": "system", "content": conv["system"]}] if conv["system"] else []) + \
            [{"role": m["role"], "content": m["content"]} for m in conv["messages"]]
        t, engine = self.loaded.template, self.loaded.engine
        try:
            prompt_text = t.render(messages)
            ids = t.encode(engine.tokenizer, messages)
            engine.check_prompt(len(ids))
            s = Sampling(temperature=float(temperature), top_p=float(top_p), top_k=self.defaults.top_k,
                         min_p=self.defaults.min_p, max_tokens=max(1, min(int(max_tokens), self.context - len(ids))))
            job = self.worker.submit(ids, s.check())
        except (ChatTemplateError, ContextFull, QueueFull, ValueError) as e:
            yield self.view(conv), self.status(state=f"not answered: {e}")
            return
        self.jobs[conv["id"]] = job
        reply = {"role": "assistant", "content": "", "reasoning": ""}
        conv["messages"].append(reply)
        splitter = ThinkSplitter.for_prompt(prompt_text)
        shown = saved = time.monotonic()
        used, tps, state = len(ids), 0.0, "stopped"
        try:
            for piece in job.pieces():
                for reasoning, part in splitter.feed(piece.text) + (splitter.flush() if piece.finish else []):
                    reply["reasoning" if reasoning else "content"] += part
                used, tps = len(ids) + piece.stats.generated_tokens, piece.stats.decode_tps
                if piece.finish:
                    state = {"context": "the context is full"}.get(piece.finish, "done")
                    reply["finish"] = piece.finish
                now = time.monotonic()
                if now - saved > 2.0:
                    self.store.save(conv)
                    saved = now
                if now - shown > 0.08 or piece.finish:
                    shown = now
                    yield self.view(conv), self.status(used, tps, "generating…" if not piece.finish else state)
        except Exception as e:      # a failure in generation: keep the conversation, say what happened
            state = f"generation failed: {type(e).__name__}: {e}"
        finally:
            job.cancel()
            self.jobs.pop(conv["id"], None)
            for reasoning, part in splitter.flush():
                reply["reasoning" if reasoning else "content"] += part
            reply.setdefault("finish", "stopped")
            if not reply["reasoning"]:
                del reply["reasoning"]
            self.store.save(conv)
        yield self.view(conv), self.status(used, tps, state)

    def export(self, conv_id: str | None, kind: str):
        conv = self.store.load(conv_id) if conv_id else None
        if not conv:
            return None
        folder = tempfile.mkdtemp(prefix="dslocal-export-")
        path = os.path.join(folder, f"conversation-{conv['id']}.{'md' if kind == 'md' else 'json'}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(to_markdown(conv) if kind == "md" else to_json(conv))
        return path


def build(app: ChatApp):
    """The page: conversations and settings on the left, the chat on the right."""
    import gradio as gr
    d = app.defaults
    with gr.Blocks(title=f"dslocal · {app.loaded.name}", analytics_enabled=False) as page:
        conv_id = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                gr.Markdown(f"### {app.loaded.name}\n{app.context} tokens of context", elem_id="model")
                new_btn = gr.Button("New conversation", elem_id="new")
                convs = gr.Radio(label="Conversations", choices=[], elem_id="convs")
                del_btn = gr.Button("Delete conversation", variant="stop", size="sm", elem_id="delete")
                system = gr.Textbox(label="System prompt", lines=3, elem_id="system")
                temperature = gr.Slider(0, 2, value=d.temperature, step=0.05, label="Temperature", elem_id="temp")
                top_p = gr.Slider(0.05, 1, value=d.top_p, step=0.05, label="Top-p", elem_id="top_p")
                max_tokens = gr.Slider(1, app.context, value=min(d.max_tokens, app.context), step=1,
                                       label="Max tokens", elem_id="max_tokens")
                with gr.Row():
                    md_btn = gr.Button("Export Markdown", size="sm", elem_id="export_md")
                    json_btn = gr.Button("Export JSON", size="sm", elem_id="export_json")
                exported = gr.File(label="Export", interactive=False, elem_id="exported")
            with gr.Column(scale=4):
                chat = gr.Chatbot(elem_id="chat", height=560, buttons=["copy"], group_consecutive_messages=False)
                status = gr.Markdown(app.status(), elem_id="status")
                msg = gr.Textbox(placeholder="Message (Enter sends, Shift+Enter for a new line)", show_label=False,
                                 lines=1, max_lines=10, elem_id="msg", autofocus=True)
                with gr.Row():
                    send_btn = gr.Button("Send", variant="primary", elem_id="send")
                    stop_btn = gr.Button("Stop", elem_id="stop")
                    regen_btn = gr.Button("Regenerate", elem_id="regen")
                    edit_btn = gr.Button("Edit last", elem_id="edit")
                    clear_btn = gr.Button("Clear", elem_id="clear")

        opened = [conv_id, chat, convs, system, status]
        settings = [system, temperature, top_p, max_tokens]
        page.load(app.on_load, None, opened)
        for trigger in (send_btn.click, msg.submit):
            trigger(app.send, [msg, conv_id] + settings, [chat, msg, conv_id, convs, status])
        regen_btn.click(app.regenerate, [conv_id] + settings, [chat, status])
        stop_btn.click(app.stop, conv_id, None, queue=False)
        edit_btn.click(app.edit_last, conv_id, [chat, msg])
        clear_btn.click(app.clear, conv_id, [chat, status])
        new_btn.click(app.new, None, opened)
        convs.input(app.open, convs, opened)
        del_btn.click(app.delete, conv_id, opened)
        md_btn.click(lambda c: app.export(c, "md"), conv_id, exported)
        json_btn.click(lambda c: app.export(c, "json"), conv_id, exported)
    return page


def open_window(url: str) -> str:
    """Open url as an app window of a Chromium-family browser if there is one, else in the default browser."""
    for name in CHROMIUM_FAMILY:
        exe = shutil.which(name)
        if exe:
            subprocess.Popen([exe, f"--app={url}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
            return name
    webbrowser.open(url)
    return "the default browser"


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no calls home: this runs offline
    try:
        import gradio as gr
    except ImportError:
        raise ValueError("the chat window needs Gradio: pip install 'dslocal[gui]'") from None
    loaded = load_model(args)
    worker = Worker(loaded.engine, max_waiting=8).start()
    app = ChatApp(loaded, worker, Store(args.data_dir), default_sampling(args, args.max_tokens))
    page = build(app)
    page.queue(default_concurrency_limit=None)     # the worker orders the generations; the page never blocks
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],   # no web fonts: offline
                              font_mono=["ui-monospace", "monospace"])
    try:
        page.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True, quiet=True,
                    ssr_mode=False, theme=theme, css=CSS, footer_links=[], show_error=True)
    except OSError as e:
        worker.stop()
        raise ValueError(f"cannot serve the chat page on port {args.port}: {e}; try another --port") from None
    url = page.local_url
    print(f"dslocal chat: {loaded.name} at {url} (conversations in {app.store.root}; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    if not args.no_browser:
        print(f"dslocal chat: opening it in {open_window(url)}", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("dslocal chat: stopping", file=sys.stderr)
    finally:
        worker.stop()
        page.close()
    return 0
