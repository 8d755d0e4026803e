"""One thread owns the Engine: generation requests wait in a bounded queue and are served in order.

The chat window and the HTTP server submit a Job and read its pieces; cancelling a Job (a stop button, a
client that went away) closes the generator between two tokens, so the next request starts at once.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from dslocal.runtime.generate import Engine, Piece
from dslocal.runtime.sampling import Sampling

_END = object()   # the last event of every job


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds."""


class Job:
    """One generation request: its prompt, its settings, and the pieces the worker hands back."""

    def __init__(self, prompt: list[int], sampling: Sampling):
        self.prompt, self.sampling = prompt, sampling
        self.events: queue.Queue = queue.Queue()   # Piece ..., then an exception or nothing, then _END
        self.cancelled = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def pieces(self, poll: float = 0.25, gone=lambda: False) -> Iterator[Piece]:
        """The pieces as they come; every `poll` seconds without one, gone() is asked whether the reader
        left, and if so the job is cancelled and the iteration ends. A generation error is raised here."""
        while True:
            try:
                event = self.events.get(timeout=poll)
            except queue.Empty:
                if gone():
                    self.cancel()
                    return
                continue
            if event is _END:
                return
            if isinstance(event, Exception):
                raise event
            yield event


class Worker:
    """The engine's owner thread and the queue of waiting jobs (at most max_waiting; one more runs)."""

    def __init__(self, engine: Engine, max_waiting: int):
        if max_waiting < 1:
            raise ValueError("--queue must be at least 1")
        self.engine = engine
        self._waiting: queue.Queue = queue.Queue(maxsize=max_waiting)
        self._thread: threading.Thread | None = None
        self.current: Job | None = None

    def start(self) -> Worker:
        self._thread = threading.Thread(target=self._loop, name="dslocal-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what runs and what waits, and end the thread."""
        while True:
            try:
                job = self._waiting.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                _finish(job)
        if self.current is not None:
            self.current.cancel()
        self._waiting.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def submit(self, prompt: list[int], sampling: Sampling) -> Job:
        job = Job(prompt, sampling)
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._waiting.maxsize} requests are already waiting for the model; "
                            "try again when one has finished") from None
        return job

    def _loop(self) -> None:
        while True:
            job = self._waiting.get()
            if job is None:
                return
            if not job.cancelled.is_set():
                self.current = job
                self._run(job)
                self.current = None
            _finish(job)

    def _run(self, job: Job) -> None:
        gen = self.engine.generate(job.prompt, job.sampling)
        try:
            for piece in gen:
                job.events.put(piece)
                if job.cancelled.is_set():
                    break
        except Exception as e:   # ContextFull, a bad setting, or a failure in the model: the reader reports it
            job.events.put(e)
        finally:
            gen.close()          # stops the generation between two tokens; the engine's cache stays consistent


def _finish(job: Job) -> None:
    job.events.put(_END)
    job.done.set()
