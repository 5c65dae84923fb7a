"""One background thread drives an LLMEngine; requests come from any thread or event loop.

    loop = EngineLoop(engine)
    rid = loop.submit(prompt, params, on_output)      # thread-safe; outputs go to on_output
    loop.abort(rid)

    engine = AsyncEngine(loop)                        # asyncio
    async for out in engine.generate(prompt, params): ...

Only the loop's thread touches the engine, so a Runner shared between threads needs no lock
around a step, and requests of different threads share steps (in-flight batching).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import AsyncIterator, Callable

from llmc.errors import LlmcError
from llmc.runtime.engine import LLMEngine
from llmc.runtime.request import RequestOutput


class EngineLoop:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._callbacks: dict[str, Callable[[RequestOutput], None]] = {}
        self._lock = threading.Lock()
        self._ids = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self.error: BaseException | None = None
        # Refreshed by the loop's thread after every step: other threads read this snapshot,
        # never the engine's own structures, which only that thread touches.
        self.stats = engine.stats()

    def submit(self, prompt, params=None, on_output: Callable[[RequestOutput], None] = None,
               priority: int = 0) -> str:
        with self._lock:
            if self._closed:
                raise LlmcError("this engine is closed")
            if self.error is not None:
                raise LlmcError(f"the engine stopped: {self.error}")
            self._ids += 1
            request_id = f"req-{self._ids}"
            self._callbacks[request_id] = on_output or (lambda out: None)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llmc-engine",
                                                daemon=True)
                self._thread.start()
        self._inbox.put(("add", request_id, prompt, params, priority))
        return request_id

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def close(self) -> None:
        with self._lock:
            self._closed = True
        if self._thread is not None:
            self._inbox.put(("close",))
            self._thread.join()

    # --- the loop's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            block = not engine.has_unfinished()
            try:
                while True:
                    msg = self._inbox.get(block=block)
                    block = False
                    if msg[0] == "close":
                        return
                    if msg[0] == "add":
                        _, rid, prompt, params, priority = msg
                        engine.add_request(prompt, params, rid, priority)
                    else:
                        engine.abort(msg[1])
            except queue.Empty:
                pass
            try:
                outputs = engine.step()
            except BaseException as e:   # the session itself failed: every request errors
                self.error = e
                self._fail_all(str(e))
                return
            self.stats = self.engine.stats()
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        callback = self._callbacks.get(out.request_id)
        if callback is None:
            return
        if out.finished:
            self._callbacks.pop(out.request_id, None)
            self.engine.release(out.request_id)
        try:
            callback(out)
        except Exception:   # a failing consumer (a closed event loop, say) ends its request
            if not out.finished:
                self._callbacks.pop(out.request_id, None)
                self.engine.abort(out.request_id)

    def _fail_all(self, error: str) -> None:
        for rid, callback in list(self._callbacks.items()):
            callback(RequestOutput(rid, "", [], True, "error", error))
        self._callbacks.clear()


class AsyncEngine:
    """asyncio front of an EngineLoop: `generate` is an async iterator of a request's
    outputs; leaving it early (break, cancellation, a client gone) aborts the request."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    async def generate(self, prompt, params=None, priority: int = 0
                       ) -> AsyncIterator[RequestOutput]:
        aio = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        rid = self.loop.submit(prompt, params,
                               lambda out: aio.call_soon_threadsafe(outputs.put_nowait, out),
                               priority)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.loop.abort(rid)
