"""Jobs: one request's state and its event log, shared by the worker thread and the HTTP side.

The worker thread appends events (`emit`); async readers (`events`, `wait`) get them through an
asyncio queue fed with `call_soon_threadsafe`, so nothing blocks the event loop or a thread pool.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, CANCELLED, EXPIRED = "succeeded", "failed", "cancelled", "expired"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
MAX_EVENTS = 10_000  # per job; decode steps and tokens of the largest request fit


class JobCancelled(Exception):
    """Raised from the step callback: the pipeline stops at that step boundary."""


@dataclass(frozen=True)
class Event:
    seq: int
    type: str  # queued | started | step | token | retrying | succeeded | failed | cancelled | expired
    data: dict
    status: str = QUEUED  # the job's status right after this event

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


@dataclass
class Job:
    task: str
    request: Any  # pipeline.tasks.TaskRequest, validated
    params: dict  # api_session.request_params(request): what the results record
    timeout_s: float  # the longest a job may wait in the queue before it is dropped
    id: str = field(default_factory=lambda: "job_" + uuid.uuid4().hex[:20])
    created: float = field(default_factory=time.time)
    status: str = QUEUED
    step: int = 0
    total: int = 0
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    error_type: str | None = None  # invalid_request_error | server_error | timeout | cancelled
    result: dict | None = None  # files, text, usage
    replica: str | None = None  # which worker ran it (Ray scale-out)
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)
    _events: list = field(default_factory=list, repr=False)
    _seq: int = field(default=0, repr=False)
    _listeners: list = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- writing (worker side) --------------------------------------------------------------
    def emit(self, type_: str, **data) -> Event:
        with self._lock:
            if self.status in TERMINAL:  # a job ends once; late events (a cancel racing the end) drop
                return self._events[-1]
            if type_ == "started":
                self.status, self.started = RUNNING, time.time()
            elif type_ in ("step", "token"):
                self.step, self.total = data.get("step", self.step), data.get("total", self.total)
            elif type_ in TERMINAL:
                self.status, self.finished = type_, time.time()
                self.error, self.error_type = data.get("error"), data.get("error_type")
                self.result = data.get("result")
            event = Event(self._seq, type_, data, self.status)
            self._seq += 1
            if len(self._events) < MAX_EVENTS or event.terminal:
                self._events.append(event)
            listeners = list(self._listeners)
        for notify in listeners:
            notify(event)
        return event

    def finish(self, status: str, **data) -> Event:
        return self.emit(status, **data)

    # -- reading (async side) ---------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    async def events(self, after: int = -1) -> AsyncIterator[Event]:
        """Every event with seq > `after`, then new ones as they come, until the terminal one."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def notify(e: Event) -> None:
            loop.call_soon_threadsafe(q.put_nowait, e)

        with self._lock:
            past = [e for e in self._events if e.seq > after]
            if not past and self.status in TERMINAL:
                return  # the reader has seen the end already (Last-Event-ID of the last event)
            if not (past and past[-1].terminal):
                self._listeners.append(notify)
        try:
            for e in past:
                yield e
                if e.terminal:
                    return
            last = past[-1].seq if past else after
            while True:
                e = await q.get()
                if e.seq <= last:
                    continue
                last = e.seq
                yield e
                if e.terminal:
                    return
        finally:
            with self._lock:
                if notify in self._listeners:
                    self._listeners.remove(notify)

    async def wait(self) -> Job:
        async for _ in self.events():
            pass
        return self

    def public(self) -> dict:
        """The JSON of GET /v1/jobs/{id}."""
        return {
            "id": self.id, "object": "job", "task": self.task, "status": self.status,
            "created_at": self.created, "started_at": self.started, "finished_at": self.finished,
            "progress": {"step": self.step, "total": self.total}, "error": self._error_json(),
            "result": self.result, "params": self.params, "replica": self.replica,
            "cancel_requested": self.cancel_requested.is_set(),
        }

    def _error_json(self) -> dict | None:
        if self.error is None:
            return None
        return {"message": self.error, "type": self.error_type}
