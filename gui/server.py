"""`dslocal serve`: an OpenAI-compatible HTTP API over the one generator.

POST /v1/chat/completions, POST /v1/completions (JSON or server-sent events), GET /v1/models, GET /health.
Built on the standard library's ThreadingHTTPServer: the API is a handful of JSON routes and an event
stream, `dslocal serve` then needs nothing beyond the base install, and each connection's thread can see
its client go away (a write fails or the socket reads EOF) and cancel its generation. One Worker thread
owns the model; handlers enqueue a Job and stream its pieces.
"""
from __future__ import annotations

import argparse
import hmac
import json
import os
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dslocal.gui.options import add_model_arguments, add_sampling_defaults, default_sampling, load_model
from dslocal.gui.worker import Job, QueueFull, Worker
from dslocal.runtime.chat import ChatTemplateError, ThinkSplitter
from dslocal.runtime.load import Loaded
from dslocal.runtime.sampling import Sampling

API_KEY_ENV = "DSLOCAL_API_KEY"
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}   # ours -> OpenAI's


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_defaults(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait for the model (default 16)")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask (default: --ctx)")
    p.add_argument("--max-body", type=int, default=8 << 20, help="largest request body in bytes (default 8 MiB)")
    p.add_argument("--name", help="the model id clients see (default: the GGUF's name)")


@dataclass(frozen=True)
class Options:
    api_key: str | None = None
    queue: int = 16
    max_tokens_limit: int | None = None   # None: the context length
    max_body: int = 8 << 20
    name: str | None = None
    defaults: Sampling = Sampling()


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Server:
    """The HTTP server and its model worker; start() serves from a thread, stop() ends both."""

    def __init__(self, loaded: Loaded, opts: Options, host: str = "127.0.0.1", port: int = 8080):
        self.loaded, self.opts = loaded, opts
        self.name = opts.name or loaded.name
        self.context = loaded.engine.context_length
        self.max_tokens_limit = min(opts.max_tokens_limit or self.context, self.context)
        self.worker = Worker(loaded.engine, opts.queue)
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Server:
        self.worker.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dslocal-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.worker.stop()
        self.httpd.server_close()

    # request -> prompt ids and settings

    def sampling(self, body: dict, n_prompt: int) -> Sampling:
        max_tokens = _get(body, "max_completion_tokens", int, _get(body, "max_tokens", int))
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {max_tokens} but this server allows at most {self.max_tokens_limit} "
                                "(--max-tokens-limit)", param="max_tokens")
        room = self.context - n_prompt
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = f" + {max_tokens} to generate" if max_tokens is not None else ""
            raise ApiError(400, f"this model's context is {self.context} tokens, but the request needs "
                                f"{n_prompt} for the prompt{asked}; shorten the messages or lower max_tokens",
                           param="messages", code="context_length_exceeded")
        stop = body.get("stop")
        stop = (stop,) if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        if _get(body, "n", int, 1) != 1:
            raise ApiError(400, "n must be 1: this server makes one answer per request", param="n")
        d = self.opts.defaults
        s = replace(d, temperature=_get(body, "temperature", float, d.temperature),
                    top_p=_get(body, "top_p", float, d.top_p), top_k=_get(body, "top_k", int, d.top_k),
                    min_p=_get(body, "min_p", float, d.min_p),
                    repetition_penalty=_get(body, "repeat_penalty", float, d.repetition_penalty),
                    seed=_get(body, "seed", int, d.seed), stop=tuple(stop or ()),
                    max_tokens=max_tokens if max_tokens is not None else min(room, self.max_tokens_limit))
        try:
            return s.check()
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def chat_prompt(self, body: dict) -> tuple[list[int], str]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
        plain = [{"role": _role(m), "content": _content(m)} for m in messages]
        t = self.loaded.template
        try:
            text = t.render(plain, add_generation_prompt=True)
            return t.encode(self.loaded.engine.tokenizer, plain, add_generation_prompt=True), text
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages", code="chat_template_error") from None

    def completion_prompt(self, body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            return self.loaded.engine.tokenizer.encode(p, add_bos=True, special=True)
        if isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            return p
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)",
                       param="prompt")


def _get(body: dict, key: str, kind: type, default=None):
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
    if not ok:
        raise ApiError(400, f"{key} must be a number{' (a whole one)' if kind is int else ''}", param=key)
    return kind(v)


def _role(m) -> str:
    role = m.get("role") if isinstance(m, dict) else None
    if role == "developer":        # OpenAI's newer name for the system role
        return "system"
    if role not in ("system", "user", "assistant"):
        raise ApiError(400, f"message role must be system, user or assistant, not {role!r}", param="messages")
    return role


def _content(m: dict) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in c):
        return "".join(str(p.get("text", "")) for p in c)
    raise ApiError(400, "message content must be text (a string or a list of text parts)", param="messages")


class _ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dslocal"
    timeout = 60          # seconds a client may take to send its request or to read what we write

    @property
    def app(self) -> Server:
        return self.server.app

    def log_message(self, fmt, *args):
        print(f"dslocal serve: {self.address_string()} {fmt % args}", file=sys.stderr)

    def do_GET(self):
        self._route({"/health": self._health, "/v1/health": self._health, "/v1/models": self._models})

    def do_POST(self):
        self._route({"/v1/chat/completions": self._chat, "/v1/completions": self._completions})

    def _route(self, routes: dict) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path not in routes:
                self.close_connection = True   # a body, if any, is left unread
                raise ApiError(404, f"no route {self.command} {path or '/'}; this server has "
                                    "/v1/chat/completions, /v1/completions, /v1/models and /health", code="not_found")
            if path not in ("/health", "/v1/health"):
                self._authorize()
            routes[path]()
        except ApiError as e:
            self._send_json(e.status, e.body())
        except _ClientGone:
            self.close_connection = True
        except Exception as e:   # a bug or a model failure: the client gets a 500 in OpenAI's shape, not a hang
            print(f"dslocal serve: error: {type(e).__name__}: {e}", file=sys.stderr)
            self._send_json(500, ApiError(500, f"the server failed: {type(e).__name__}: {e}", "server_error").body())

    def _authorize(self) -> None:
        key = self.app.opts.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            self.close_connection = True   # the body, if any, is left unread
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def _body(self) -> dict:
        self.close_connection = True       # until the body has been read
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raise ApiError(411, "send the body with a Content-Length, not chunked")
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "a Content-Length header is required") from None
        if n > self.app.opts.max_body:
            raise ApiError(413, f"the request body has {n} bytes; this server takes at most {self.app.opts.max_body}"
                                " (--max-body)")
        if self.headers.get_content_type() != "application/json":
            raise ApiError(415, "the request body must be JSON (Content-Type: application/json)")
        raw = self.rfile.read(n)
        self.close_connection = False
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _health(self) -> None:
        w = self.app.worker
        self._send_json(200, {"status": "ok", "model": self.app.name, "context": self.app.context,
                              "busy": w.current is not None, "waiting": w.waiting})

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [
            {"id": self.app.name, "object": "model", "created": 0, "owned_by": "dslocal",
             "context_length": self.app.context}]})

    def _chat(self) -> None:
        body = self._body()
        ids, text = self.app.chat_prompt(body)
        splitter = ThinkSplitter.for_prompt(text)
        self._answer(body, ids, "chat.completion", splitter)

    def _completions(self) -> None:
        body = self._body()
        self._answer(body, self.app.completion_prompt(body), "text_completion", None)

    def _answer(self, body: dict, ids: list[int], kind: str, splitter: ThinkSplitter | None) -> None:
        s = self.app.sampling(body, len(ids))
        stream = bool(body.get("stream"))
        try:
            job = self.app.worker.submit(ids, s)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_exceeded", code="rate_limit_exceeded") from None
        head = {"id": f"{'chatcmpl' if splitter else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.app.name}
        try:
            if stream:
                usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
                self._stream(job, head, kind, splitter, len(ids), bool(usage))
            else:
                self._collect(job, head, kind, splitter, len(ids))
        finally:
            job.cancel()       # a no-op once it has finished; otherwise the client left or something failed

    def _collect(self, job: Job, head: dict, kind: str, splitter, n_prompt: int) -> None:
        text, last = [], None
        for piece in job.pieces(gone=self._gone):
            text.append(piece.text)
            last = piece
        if last is None or last.finish is None:
            raise _ClientGone()
        out = "".join(text)
        if splitter:
            parts = splitter.feed(out) + splitter.flush()
            message = {"role": "assistant", "content": "".join(t for r, t in parts if not r)}
            reasoning = "".join(t for r, t in parts if r)
            if reasoning:
                message["reasoning_content"] = reasoning
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH[last.finish]}
        else:
            choice = {"index": 0, "text": out, "logprobs": None, "finish_reason": FINISH[last.finish]}
        self._send_json(200, head | {"object": kind, "choices": [choice],
                                     "usage": _usage(n_prompt, last.stats.generated_tokens)})

    def _stream(self, job: Job, head: dict, kind: str, splitter, n_prompt: int, include_usage: bool) -> None:
        obj = "chat.completion.chunk" if splitter else kind

        def chunk(delta_or_text, finish=None):
            if splitter:
                c = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish}
            self._event(head | {"object": obj, "choices": [c]})

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if splitter:
            chunk({"role": "assistant", "content": ""})
        last = None
        for piece in job.pieces(gone=self._gone):
            last = piece
            parts = splitter.feed(piece.text) + (splitter.flush() if piece.finish else []) if splitter \
                else [(False, piece.text)]
            for reasoning, t in parts:
                if t:
                    chunk({"reasoning_content" if reasoning else "content": t} if splitter else t)
            if self._gone():
                raise _ClientGone()
        if last is None or last.finish is None:
            raise _ClientGone()
        chunk({} if splitter else "", FINISH[last.finish])
        if include_usage:
            self._event(head | {"object": obj, "choices": [], "usage": _usage(n_prompt, last.stats.generated_tokens)})
        self._write(b"data: [DONE]\n\n")

    def _event(self, obj: dict) -> None:
        self._write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:            # BrokenPipeError, ConnectionResetError, a write timeout
            raise _ClientGone() from None

    def _gone(self) -> bool:
        """Whether the client closed its connection: the socket is readable and reads end-of-file."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True


def _usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def run(args: argparse.Namespace) -> int:
    if args.queue < 1:
        raise ValueError("--queue must be at least 1")
    if not _is_loopback(args.host):
        print(f"dslocal serve: warning: --host {args.host} makes the model reachable from other machines"
              + ("" if args.api_key else "; anyone who can reach this port can use it (set --api-key)"),
              file=sys.stderr)
    loaded = load_model(args)
    opts = Options(api_key=args.api_key or None, queue=args.queue, max_tokens_limit=args.max_tokens_limit,
                   max_body=args.max_body, name=args.name,
                   defaults=default_sampling(args, loaded.engine.context_length))
    try:
        server = Server(loaded, opts, args.host, args.port).start()
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    print(f"dslocal serve: {server.name} at {server.url}/v1 (OpenAI API; Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("dslocal serve: stopping", file=sys.stderr)
    finally:
        server.stop()
    return 0
