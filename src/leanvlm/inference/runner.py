"""`EngineRunner`: the engine's loop on a thread of its own, and an asyncio face for a server's event loop.

The event loop never runs the model: `generate` submits a request and awaits its outputs, which the engine thread
hands over with `call_soon_threadsafe`. Leaving `generate` early (a client that disconnects) cancels the request. A
step that raises fails the requests of that batch, not the runner: the next requests start from an empty batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from leanvlm.inference.engine import Engine, Output, Request

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are waiting than the runner accepts; try again later."""


class EngineRunner:
    def __init__(self, engine: Engine, max_waiting: int = 64):
        self.engine, self.max_waiting = engine, max_waiting
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will await `generate`."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="leanvlm-engine", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    async def generate(self, request: Request) -> AsyncIterator[Output]:
        """Submit `request` and yield its outputs until the one with a finish reason; QueueFull when too many
        requests wait already."""
        if self.engine.num_waiting() >= self.max_waiting:
            raise QueueFull(f"{self.engine.num_waiting()} requests are waiting already (the limit is "
                            f"{self.max_waiting}); retry later.")
        outputs: asyncio.Queue[Output] = asyncio.Queue()
        self._queues[request.id] = outputs
        self.engine.submit(request)
        self._wake.set()
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                finished = output.finish_reason is not None
                yield output
        finally:
            if not finished:  # the consumer left early: stop spending compute on it
                self.engine.cancel(request.id)
                self._wake.set()
            self._queues.pop(request.id, None)

    def _deliver(self, outputs: list[Output]) -> None:
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _run(self) -> None:
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # a failed batch must not take the server down with it
                log.exception("An engine step failed; its requests end with finish_reason 'error'.")
                outputs = self.engine.fail_all("error")
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)
