"""TensorRT's builder in a child process, so that Ctrl-C stops a build.

`build_serialized_network` is one long C++ call (SmolLM2: about 20 s on a CPU) that never
returns to Python until it is done, and TensorRT calls back into Python only to log, where a
KeyboardInterrupt is swallowed: in-process, Ctrl-C was ignored and the engine written anyway.
So the parse and build (lower.build_in_child) run in a child, `python -m
llmc.backends.tensorrt` (not multiprocessing: its spawn re-runs the caller's main script in
the child, and fork would copy onnxruntime's and tokenizers' threads). The child starts with
SIGINT ignored; the parent waits on a pipe, interruptibly, forwards the child's log lines,
says after PROGRESS_EVERY seconds of silence that the build is still going, and kills the
child when it is interrupted or fails. Messages are length-prefixed pickles on a pipe of
their own (TensorRT may print to stdout). This module is the process plumbing only; what the
child does is lower.py's.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from llmc.errors import LlmcError

PROGRESS_EVERY = 10.0   # seconds of silence before "still building"
_LEN = struct.Struct("<Q")


class RemoteTraceback(Exception):
    """The child's traceback, as the cause of the exception it raised (as in
    concurrent.futures), so `llmc --verbose` shows where the child failed."""

    def __str__(self) -> str:
        return self.args[0]


def run_child(request: Any, backend: str, log: Callable[[str], None]) -> Any:
    """Run `request` (picklable) through the child's work (lower.build_in_child); returns
    what it returned, raises what it raised, forwards what it logged."""
    receive, send = os.pipe()
    child = None
    try:
        with _sigint_ignored():   # a terminal's Ctrl-C reaches the child too: it ignores it
            child = subprocess.Popen([sys.executable, "-m", __package__, str(send)],
                                     stdin=subprocess.PIPE, pass_fds=(send,))
        os.close(send)   # the child holds the only writer: its end reads as end of file
        send = None
        child.stdin.write(pickle.dumps(request))
        child.stdin.close()
        return _wait(child, receive, backend, log)
    finally:
        if child is not None:
            if child.poll() is None:   # interrupted, or failed here: the builder stops too
                child.kill()
            child.wait()
        for end in (receive, send):
            if end is not None:
                os.close(end)


def _wait(child: subprocess.Popen, receive: int, backend: str, log: Callable[[str], None]):
    start = last = time.monotonic()
    while True:
        if not select.select([receive], [], [], min(1.0, PROGRESS_EVERY))[0]:
            if time.monotonic() - last >= PROGRESS_EVERY:
                last = time.monotonic()
                log(f"{backend}: still building ({last - start:.0f} s)")
            continue
        message = _read_message(receive)
        if message is None:   # it ended without a word: killed, out of memory, a crash
            raise LlmcError(f"the {backend} builder process died (exit status "
                            f"{child.wait()}); if it ran out of memory, lower "
                            "--max-num-tokens or --max-seq-len")
        last = time.monotonic()
        kind, payload = message
        if kind == "log":
            log(payload)
        elif kind == "done":
            return payload
        else:   # "error": what the child raised, with its traceback as the cause
            error, remote = payload
            raise error from RemoteTraceback(remote)


def _read_message(fd: int):
    """One length-prefixed pickle, or None at the end of the pipe."""
    head = _read_exactly(fd, _LEN.size)
    if head is None:
        return None
    body = _read_exactly(fd, _LEN.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while the child starts: a Python started with SIGINT ignored keeps it
    so, and never raises KeyboardInterrupt. (Signal handlers belong to the main thread; from
    another thread there is no terminal's Ctrl-C to shield the child from.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


def serve(work: Callable[[Any, Callable[[str], None]], Any], send_fd: int) -> None:
    """The child's side: the request from stdin, `work(request, log)`, then its result or
    its error, log lines before them, through `send_fd`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # already so, unless started by hand
    out = os.fdopen(send_fd, "wb")

    def send(message) -> None:
        body = pickle.dumps(message)
        out.write(_LEN.pack(len(body)) + body)
        out.flush()

    try:
        send(("done", work(pickle.load(sys.stdin.buffer), lambda msg: send(("log", msg)))))
    except Exception as e:
        send(("error", (_picklable(e), traceback.format_exc())))
    finally:
        out.close()


def _picklable(e: Exception) -> Exception:
    """`e` if it survives the pipe (LlmcError, ValueError, OSError do), else a RuntimeError
    that says what it was."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")

