"""Running one job on the resident model: progress events, cancel at a step boundary, one clean end.

Whatever a request does, the worker thread survives it: every exception becomes the job's
`failed` event with a one-line message.
"""

from __future__ import annotations

import logging
import time

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.tasks import UNDERSTANDING_TASKS
from lance_deploy.serve.engine import TextStream
from lance_deploy.serve.jobs import CANCELLED, EXPIRED, FAILED, SUCCEEDED, Job, JobCancelled

log = logging.getLogger("lance_deploy.serve")


def one_line(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:limit]


def run_job(engine, job: Job, save) -> None:
    """Run `job` in this thread to exactly one terminal event. `save(job, output)` stores the
    output and returns the job's result JSON."""
    if job.cancel_requested.is_set():
        job.finish(CANCELLED, error="cancelled before it started", error_type="cancelled")
        return
    waited = time.time() - job.created
    if waited > job.timeout_s:
        job.finish(EXPIRED, error=f"dropped: waited {waited:.1f} s in the queue, over the server's "
                   f"{job.timeout_s:g} s limit; retry later", error_type="timeout")
        return
    job.emit("started", waited_s=round(waited, 3))
    stream = TextStream(engine.tokenizer) if job.task in UNDERSTANDING_TASKS else None

    def on_step(done: int, total: int) -> None:
        if job.cancel_requested.is_set():
            raise JobCancelled
        if stream is None:
            job.emit("step", step=done, total=total)

    def on_token(token_id: int) -> None:
        delta = stream.push(token_id)
        job.emit("token", step=len(stream.ids), total=job.request.max_new_tokens, text=delta)

    try:
        output = engine.run(job.request, on_step=on_step, on_token=on_token if stream else None)
        result = save(job, output)
        if stream is not None:
            tail = stream.finish(output.text)
            if tail:
                job.emit("token", step=len(stream.ids), total=job.request.max_new_tokens, text=tail)
        job.finish(SUCCEEDED, result=result)
    except JobCancelled:
        job.finish(CANCELLED, error=f"cancelled at step {job.step} of {job.total}", error_type="cancelled")
    except LanceUsageError as e:  # a check that needs the model (token caps, media shape)
        job.finish(FAILED, error=one_line(e), error_type="invalid_request_error")
    except Exception as e:  # noqa: BLE001 - the worker must outlive any request
        log.exception("job %s (%s) failed", job.id, job.task)
        job.finish(FAILED, error=f"{type(e).__name__}: {one_line(e)}", error_type="server_error")
