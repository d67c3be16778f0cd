"""The engine on its own thread, driven from asyncio.

The engine thread never awaits: it drains a thread-safe inbox of submissions and aborts between
steps, runs a step, and hands each output to its request's asyncio queue with
`loop.call_soon_threadsafe`. Validation happens in the caller, so a bad request raises there and
never reaches the engine thread.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, TypeVar

from runtime.engine import LLMEngine, Prompt
from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams

log = logging.getLogger("ember.async_engine")
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread failed; in-flight requests end with this error."""


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    tenant: str


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class _Call:
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput | BaseException]]] = {}
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._stopped = False
        self._thread.start()

    # ---- caller side (asyncio) -----------------------------------------------------------
    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None, tenant: str = "default"
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and iterate its outputs until the finished one.

        Raises ValueError at once for bad input. Leaving the iteration early aborts the request.
        """
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        token_ids = self.engine.tokenize(prompt)
        self.engine.validate_prompt(token_ids, params)
        rid = request_id or f"req-{uuid.uuid4().hex}"
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._inbox.put(_Add(rid, token_ids, params, tenant))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._inbox.put(_Abort(rid))

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between steps (the only safe place to touch the engine
        and what it owns) and return its result or raise its exception here."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._inbox.put(_Call(fn, loop, fut))
        return await fut

    def open_stream(self, request_id: str) -> None:
        """Receive the outputs of a request that a `call` will create under `request_id`
        (opened first, so no output can arrive before there is a queue for it)."""
        self._streams[request_id] = (asyncio.get_running_loop(), asyncio.Queue())

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of an opened stream until the finished one."""
        _, q = self._streams[request_id]
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Stop a request before its next step; its stream ends with finish_reason "abort"."""
        self._inbox.put(_Abort(request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._inbox.put(None)
        self._thread.join(timeout=30)

    # ---- engine thread -------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _handle(self, cmd: _Add | _Abort | _Call) -> None:
        if isinstance(cmd, _Call):
            try:
                result = cmd.fn()
            except Exception as e:  # handed to the caller, which owns the error
                cmd.loop.call_soon_threadsafe(_settle, cmd.future, None, e)
            else:
                cmd.loop.call_soon_threadsafe(_settle, cmd.future, result, None)
            return
        if isinstance(cmd, _Add):
            try:
                self.engine.add_request(cmd.token_ids, cmd.params, cmd.request_id, cmd.tenant)
            except ValueError as e:
                self._deliver(cmd.request_id, e)
        else:
            out = self.engine.abort(cmd.request_id)
            if out is not None:
                self._deliver(cmd.request_id, out)

    def _run(self) -> None:
        while True:
            try:
                # Block only when idle; otherwise take what has arrived and step.
                cmd = self._inbox.get(block=not self.engine.has_unfinished)
                while True:
                    if cmd is None:
                        return
                    self._handle(cmd)
                    cmd = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if not self.engine.has_unfinished:
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug or a device fault: fail what is in flight, keep serving
                log.exception("engine step failed")
                for rid in list(self.engine.scheduler.requests):
                    self.engine.abort(rid)
                    self._deliver(rid, EngineDeadError(f"engine step failed: {e}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
