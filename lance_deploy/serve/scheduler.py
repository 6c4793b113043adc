"""The local scheduler: a bounded FIFO of jobs in front of ONE worker thread and the resident model.

A full queue refuses new work at once (the HTTP side answers 429 with Retry-After) instead of
letting requests pile up; a job that waited past its timeout is dropped when it reaches the front.
"""

from __future__ import annotations

import collections
import math
import os
import socket
import threading
from collections import OrderedDict

from lance_deploy.serve import store as results
from lance_deploy.serve.jobs import CANCELLED, Job
from lance_deploy.serve.worker import run_job


class QueueFull(Exception):
    def __init__(self, size: int, retry_after: int):
        super().__init__(f"the queue is full ({size} waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


def retry_after(durations, waiting: int) -> int:
    """Seconds until a slot is likely free: the mean of recent job times, times the jobs ahead."""
    mean = sum(durations) / len(durations) if durations else 1.0
    return max(1, min(3600, math.ceil(mean * max(1, waiting))))


class LocalScheduler:
    def __init__(self, engine, out, *, queue_size: int = 8, queue_timeout_s: float = 600.0, keep_jobs: int = 1000,
                 save=None, replica: str | None = None):
        """`save(job, output) -> result JSON` replaces writing under `out` (a Ray replica sends the bytes
        to the ingress instead; then `out` may be None)."""
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.engine = engine
        self.store = results.ResultStore(out) if out is not None else None
        self._save = save or self._save_files
        self.queue_size, self.queue_timeout_s, self.keep_jobs = queue_size, queue_timeout_s, keep_jobs
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._cond = threading.Condition()
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self._current: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.completed = 0

    # -- the scheduler interface the HTTP app and the UI use ------------------------------
    @property
    def model_id(self) -> str:
        return self.engine.model_id

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.engine.tasks

    def validate(self, req) -> None:
        self.engine.validate(req)

    def submit(self, req, params: dict, job_id: str | None = None) -> Job:
        job = Job(task=req.task, request=req, params=params, timeout_s=self.queue_timeout_s, replica=self.replica)
        job.id = job_id or job.id  # a Ray replica runs the ingress's job under the ingress's id
        with self._cond:
            if len(self._queue) >= self.queue_size:
                raise QueueFull(len(self._queue), retry_after(self._durations, len(self._queue) + 1))
            self._queue.append(job)
            self._remember(job)
            position = len(self._queue)
            self._cond.notify()
        job.emit("queued", position=position)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """A queued job ends now; a running one at its next step boundary."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
        job.cancel_requested.set()
        if queued:
            job.finish(CANCELLED, error="cancelled while queued", error_type="cancelled")
        return job

    def health(self) -> dict:
        alive = self._thread is not None and self._thread.is_alive()
        with self._cond:
            current = self._current.id if self._current else None
            return {"status": "ok" if alive else "worker_down", "model": self.model_id, "tasks": list(self.tasks),
                    "worker_alive": alive, "running": current, "queue": {"waiting": len(self._queue),
                    "size": self.queue_size}, "completed": self.completed, "replicas": [self.replica]}

    # -- the worker ---------------------------------------------------------------------
    def start(self) -> LocalScheduler:
        self._thread = threading.Thread(target=self._loop, name="lance-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running job's current step, cancel what waits, stop the thread."""
        with self._cond:
            self._stopping = True
            waiting, self._queue = list(self._queue), collections.deque()
            running = self._current
            self._cond.notify_all()
        for job in waiting:
            job.finish(CANCELLED, error="the server is shutting down", error_type="cancelled")
        if running is not None:
            running.cancel_requested.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        import time

        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._current = self._queue.popleft()
            start = time.perf_counter()
            try:
                run_job(self.engine, job, self._save)
            finally:
                with self._cond:
                    self._current = None
                    self.completed += 1
                    if job.started is not None:
                        self._durations.append(time.perf_counter() - start)

    def _save_files(self, job: Job, output) -> dict:
        files, result = results.encode(job, output, self.model_id, eos_id=self.engine.tokenizer.im_end)
        self.store.write(files)
        return result

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > self.keep_jobs:  # forget the oldest finished jobs (their files stay)
            old = next((j for j in self._jobs.values() if j.done), None)
            if old is None:
                break
            del self._jobs[old.id]
