"""TensorRT's builder in a child process, so that Ctrl-C stops a build.

`build_serialized_network` is one long C++ call (SmolLM2: about 20 s on a CPU) that never
returns to Python until it is done, and TensorRT calls back into Python only to log, where a
KeyboardInterrupt is swallowed: in-process, Ctrl-C was ignored and the engine written anyway.
So the parse and build run in a spawned child (spawn, not fork: the parent may hold
onnxruntime's and tokenizers' threads). The child ignores SIGINT; the parent waits on a
pipe, interruptibly, forwards the child's log lines, says every PROGRESS_EVERY seconds that
the build is still going, and kills the child when it is interrupted or fails. The plan
comes back through a file beside the ONNX model (a pipe would copy it through pickle).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from llmc.errors import LlmcError

PROGRESS_EVERY = 10.0   # seconds of silence before "still building"


class RemoteTraceback(Exception):
    """The child's traceback, as the cause of the exception it raised (as in
    concurrent.futures), so `llmc --verbose` shows where the child failed."""

    def __str__(self) -> str:
        return self.args[0]


def run_builder(onnx_path: Path, shapes: dict, backend: str, options: dict[str, Any],
                log: Callable[[str], None]) -> tuple[bytes, dict[str, Any], dict[str, float]]:
    """lower.parse_and_build in a child process; returns (plan, network info, timings)."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    fd, plan_file = tempfile.mkstemp(prefix=".plan.", suffix=".partial", dir=onnx_path.parent)
    os.close(fd)
    child = ctx.Process(target=_child, name=f"llmc {backend} builder", daemon=True,
                        args=(send, str(onnx_path), shapes, backend, options, plan_file))
    try:
        with _sigint_ignored():   # a terminal's Ctrl-C reaches the child too: it ignores it
            child.start()
        send.close()   # the child holds the only writer: its death reads as end of file
        info, timings = _wait(child, receive, backend, log)
        return Path(plan_file).read_bytes(), info, timings
    finally:
        if child.is_alive():   # interrupted, or failed here: the builder stops too
            child.kill()
        child.join()
        receive.close()
        Path(plan_file).unlink(missing_ok=True)


def _wait(child, receive, backend: str, log: Callable[[str], None]):
    start = last = time.monotonic()
    while True:
        if not receive.poll(1.0):
            if time.monotonic() - last >= PROGRESS_EVERY:
                last = time.monotonic()
                log(f"{backend}: still building ({last - start:.0f} s)")
            continue
        try:
            kind, payload = receive.recv()
        except EOFError:   # it died without a word: killed, out of memory, a crash
            child.join()
            raise LlmcError(f"the {backend} builder process died (exit status "
                            f"{child.exitcode}); if it ran out of memory, lower "
                            "--max-num-tokens or --max-seq-len") from None
        last = time.monotonic()
        if kind == "log":
            log(payload)
        elif kind == "done":
            return payload
        else:   # "error": what the child raised, with its traceback as the cause
            error, remote = payload
            raise error from RemoteTraceback(remote)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while the child starts: a spawned Python keeps an ignored SIGINT, so
    the child never sees a KeyboardInterrupt. (Signal handlers belong to the main thread;
    from another thread there is no terminal's Ctrl-C to shield the child from.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved)


def _child(send, onnx_path: str, shapes, backend, options, plan_file: str) -> None:
    """The child: parse and build, the plan into `plan_file`; log lines, then the result
    or the error, go back through `send`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from llmc.backends.tensorrt import shim
    from llmc.backends.tensorrt.lower import parse_and_build

    def log(msg: str) -> None:
        send.send(("log", msg))

    try:
        trt = shim.import_trt(backend)
        with shim.capture_log(shim.get_logger(trt), log) as errors:
            plan, info, timings = parse_and_build(trt, errors, Path(onnx_path), shapes,
                                                  backend, options, log)
        Path(plan_file).write_bytes(plan)
        send.send(("done", (info, timings)))
    except Exception as e:
        send.send(("error", (_picklable(e), traceback.format_exc())))
    finally:
        send.close()


def _picklable(e: Exception) -> Exception:
    """`e` if it survives the pipe (LlmcError, ValueError, OSError do), else a RuntimeError
    that says what it was."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")
