"""The one thread that owns the model: it loads adapters, steps the engine, and feeds the requests.

    HTTP handlers (asyncio) ──submit(Ticket)──► command queue ──┐
                                                               ▼  between steps, on this thread only:
    events ◄──call_soon_threadsafe── notify ◄── engine.step()    run commands (new tickets, adapter
    (text delta, finish)                                         load/unload), pin adapters, admit rows

A ticket waits in `pending` until its adapter is in memory (loaded on first use, evicting the
least recently used unpinned one); then its row goes to the engine, which prefills it at its next
step. Nothing a request does can stop the thread: a failed step fails the rows it held and the
loop carries on; a damaged adapter fails only the requests that name it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..engine import CANCELLED, ERROR, Engine, Row
from .metrics import Metrics
from .protocol import APIError
from .registry import Registry

log = logging.getLogger("lorakit.serve")


@dataclass
class Event:
    """What a request learns after a step: new text, and how it ended."""

    delta: str
    finish: str | None = None
    tokens: int = 0
    error: APIError | None = None


@dataclass(eq=False)
class Ticket:
    """One request in flight: its row and the asyncio queue its handler reads events from."""

    row: Row
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    sent: int = 0  # characters of the visible text already sent

    def push(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the client's event loop is gone
            self.row.cancelled = True


class Scheduler:
    """Owns `engine` (and so the model) on one thread; everything else talks to it by commands."""

    def __init__(self, engine: Engine, registry: Registry, metrics: Metrics) -> None:
        self.engine, self.registry, self.metrics = engine, registry, metrics
        registry.on_change = lambda name: engine.forget([name])     # before an adapter loads or goes
        self.commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.pending: deque[Ticket] = deque()
        self.tickets: dict[Row, Ticket] = {}
        self._counted = (0, 0)  # registry loads and evictions already in the metrics
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="lorakit-scheduler", daemon=True)
        self.thread.start()

    def submit(self, ticket: Ticket) -> None:
        self.commands.put(lambda: self.pending.append(ticket))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the scheduler thread between steps; its result (or error) comes in the future."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

        self.commands.put(run)
        return future

    def stop(self) -> None:
        self._stop.set()
        self.commands.put(lambda: None)
        self.thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    # --- the loop -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_commands(block=self.engine.idle and not self.pending)
                self._place_pending()
                if not self.engine.idle:
                    self._step()
                self._gauges()
            except Exception:  # never let the thread die: log, and serve the next request
                log.exception("scheduler step failed")

    def _run_commands(self, block: bool) -> None:
        try:
            command = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return

    def _place_pending(self) -> None:
        """Hand tickets whose adapter is (or can be) in memory to the engine, in arrival order per adapter."""
        blocked: set[str | None] = set()
        for ticket in list(self.pending):
            row = ticket.row
            if row.cancelled:
                self.pending.remove(ticket)
                self._close(ticket, CANCELLED)
                continue
            if row.adapter in blocked:
                continue
            try:
                if not self.registry.acquire(row.adapter):
                    blocked.add(row.adapter)                         # every slot pinned: wait for a row to end
                    continue
            except Exception as e:  # a damaged adapter (400), or one unloaded meanwhile (404)
                self._refuse(ticket, e)
                continue
            self.pending.remove(ticket)
            try:
                self.engine.add(row)
            except Exception as e:  # the engine refused the row: answer it, never leave it hanging
                self.registry.release(row.adapter)
                self._refuse(ticket, e, pending=False)
                continue
            self.tickets[row] = ticket
            self.metrics.prompt_tokens.inc(len(row.prompt))

    def _refuse(self, ticket: Ticket, error: Exception, pending: bool = True) -> None:
        if pending:
            self.pending.remove(ticket)
        if not isinstance(error, APIError):
            error = APIError(400 if isinstance(error, ValueError) else 500, str(error))
        ticket.row.finish_reason = ERROR
        ticket.push(Event("", ERROR, error=error))
        self.metrics.requests.labels(ERROR).inc()

    def _step(self) -> None:
        self.metrics.batch_size.observe(min(len(self.engine.running) + len(self.engine.waiting),
                                            self.engine.max_batch_size))
        reused = self.engine.reused_tokens
        try:
            changed = self.engine.step()
        except Exception as e:  # e.g. out of memory: fail the rows in the batch, keep the server up
            log.exception("engine step failed")
            changed = self.engine.abort(f"generation failed: {type(e).__name__}: {e}")
        self.metrics.prefix_cache_tokens.inc(self.engine.reused_tokens - reused)   # before anyone hears back
        for row in changed:
            ticket = self.tickets.get(row)
            if ticket is not None:
                self._notify(ticket)

    def _notify(self, ticket: Ticket) -> None:
        row = ticket.row
        if row.tokens and ticket.first_token is None:
            ticket.first_token = time.monotonic()
            self.metrics.ttft.observe(ticket.first_token - ticket.arrived)
        text = row.visible_text()
        delta, ticket.sent = text[ticket.sent:], max(ticket.sent, len(text))
        if row.done:
            self._close(ticket, row.finish_reason, delta)
        elif delta:
            ticket.push(Event(delta, None, len(row.tokens)))

    def _close(self, ticket: Ticket, reason: str, delta: str = "") -> None:
        row = ticket.row
        row.finish_reason = row.finish_reason or reason
        if self.tickets.pop(row, None) is not None:
            self.registry.release(row.adapter)
        self.metrics.generation_tokens.inc(len(row.tokens))
        self.metrics.requests.labels(row.finish_reason).inc()
        error = APIError(500, row.error or "generation failed") if row.finish_reason == ERROR else None
        ticket.push(Event(delta, row.finish_reason, len(row.tokens), error=error))

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.engine.running))
        self.metrics.waiting.set(len(self.engine.waiting) + len(self.pending))
        self.metrics.loaded_adapters.set(len(self.registry.loaded))
        loads, evictions = self.registry.loads, self.registry.evictions
        self.metrics.adapter_loads.inc(loads - self._counted[0])
        self.metrics.evictions.inc(evictions - self._counted[1])
        self._counted = (loads, evictions)
