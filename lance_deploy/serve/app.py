"""The HTTP API: OpenAI-shaped routes over a scheduler (local worker thread or Ray replicas).

    POST /v1/images/generations   t2i, waits, returns b64_json or a URL
    POST /v1/images/edits         image_edit, multipart (image file + fields), waits
    POST /v1/chat/completions     x2t_image / x2t_video, waits or streams tokens as SSE chunks
    POST /v1/videos               t2v / i2v / video_edit as an async job (202)
    GET  /v1/jobs/{id}            state; /events streams progress (SSE); DELETE cancels
    GET  /v1/results/{name}       a stored PNG / MP4 / JSON
    GET  /v1/models, /healthz

The scheduler interface: validate(req), submit(req, params) -> Job (raises QueueFull),
get(id), cancel(id), health(), model_id, tasks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from lance_deploy.api_session import request_params
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.serve import inputs, schemas
from lance_deploy.serve.guard import BodyTooLarge, Guard, error_body
from lance_deploy.serve.inputs import HTTPError
from lance_deploy.serve.jobs import CANCELLED, EXPIRED, SUCCEEDED, Job
from lance_deploy.serve.scheduler import QueueFull
from lance_deploy.serve.store import MEDIA_TYPES

MULTIPART = "multipart/form-data"
FORMS = (MULTIPART, "application/x-www-form-urlencoded")  # a form without a file is still a form


@dataclass(frozen=True)
class AppConfig:
    api_key: str | None = None
    max_upload_bytes: int = 64 << 20
    title: str = "Lance"


def create_app(scheduler, config: AppConfig = AppConfig(), *, store=None) -> FastAPI:
    """The FastAPI app; `store` (a ResultStore) serves GET /v1/results (default: the scheduler's)."""
    app = FastAPI(title=config.title, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    store = app.state.store = store or scheduler.store
    limit = config.max_upload_bytes
    _errors(app)

    def submit(req) -> Job:
        try:
            scheduler.validate(req)
        except LanceUsageError as e:
            raise HTTPError(400, inputs.usage_message(e)) from None
        try:
            return scheduler.submit(req, request_params(req))
        except QueueFull as e:
            raise HTTPError(429, str(e), "rate_limit_error", headers={"Retry-After": str(e.retry_after)}) from None

    def check_model(name: str | None) -> None:
        if name not in (None, "", "lance", scheduler.model_id):
            raise HTTPError(404, f"model {name!r} is not served here; this server runs {scheduler.model_id!r}",
                            "not_found_error", param="model")

    async def finished(job: Job, request: Request) -> Job:
        """Wait for the job; if the client goes away first, cancel it (nobody will read the result)."""
        waiter = asyncio.ensure_future(job.wait())
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=1.0)
            if not waiter.done() and await request.is_disconnected():
                scheduler.cancel(job.id)
        return waiter.result()

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        m = inputs.parse(schemas.ImageGeneration, await _json(request))
        check_model(m.model)
        job = await finished(submit(inputs.t2i(m)), request)
        return _image_response(job, m.response_format, request)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        fields, files = await _form(request)
        m = inputs.parse(schemas.ImageEdit, fields)
        check_model(m.model)
        upload = files.pop("image", None) or files.pop("image[]", None)
        if upload is None or files:
            what = "no image file part" if upload is None else f"unexpected file part '{next(iter(files))}'"
            raise HTTPError(400, f"{what}: send the picture to edit as the multipart file 'image'", param="image")
        img = await run_in_threadpool(inputs.image, upload[1], "image", upload[0])
        job = await finished(submit(inputs.image_edit(m, img)), request)
        return _image_response(job, m.response_format, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        m = inputs.parse(schemas.ChatCompletion, await _json(request))
        check_model(m.model)
        job = submit(await run_in_threadpool(inputs.chat, m, limit))
        if m.stream:
            usage = bool(m.stream_options and m.stream_options.include_usage)
            return EventSourceResponse(_chat_chunks(job, scheduler, usage), ping=15)
        job = await finished(job, request)
        _raise_for(job)
        r = job.result
        return {"id": "chatcmpl-" + job.id[4:], "object": "chat.completion", "created": int(job.created),
                "model": scheduler.model_id, "usage": r["usage"], "lance": {"job_id": job.id, "files": r["files"]},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                             "finish_reason": r["finish_reason"], "logprobs": None}]}

    @app.post("/v1/videos", status_code=202)
    async def videos(request: Request):
        if request.headers.get("content-type", "").startswith(FORMS):
            fields, files = await _form(request)
        else:
            fields, files = await _json(request), {}
        m = inputs.parse(schemas.VideoJob, fields)
        check_model(m.model)
        unknown = set(files) - {"image", "input_reference", "video"}
        if unknown:
            raise HTTPError(400, f"unexpected file part '{unknown.pop()}' (expected image or video)")
        req = await run_in_threadpool(_video_media, m, files, limit)
        job = submit(req)
        return JSONResponse(job.public(), 202, headers={"Location": f"/v1/jobs/{job.id}"})

    def job_or_404(job_id: str) -> Job:
        job = scheduler.get(job_id)
        if job is None:
            raise HTTPError(404, f"unknown job {job_id!r} (finished jobs are kept for a while, their files longer)",
                            "not_found_error")
        return job

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str):
        return job_or_404(job_id).public()

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str):
        job = job_or_404(job_id)
        if job.done:
            raise HTTPError(409, f"job {job_id} already {job.status}", "conflict_error")
        scheduler.cancel(job_id)
        return job.public()

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request, after: int = -1):
        job = job_or_404(job_id)
        last = request.headers.get("last-event-id")
        if last is not None and last.strip().lstrip("-").isdigit():
            after = int(last)

        async def stream():
            async for e in job.events(after):
                yield {"id": str(e.seq), "event": e.type,
                       "data": json.dumps({"job_id": job.id, "status": e.status, **e.data})}

        return EventSourceResponse(stream(), ping=15)

    @app.get("/v1/results/{name}")
    async def result_file(name: str):
        path = store.path(name)
        if path is None:
            raise HTTPError(404, f"no stored result named {name!r}", "not_found_error")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix[1:]])

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": scheduler.model_id, "object": "model", "created": 0,
                                            "owned_by": "bytedance", "tasks": list(scheduler.tasks)}]}

    @app.get("/healthz")
    async def healthz():
        h = scheduler.health()
        return JSONResponse(h, 200 if h["status"] == "ok" else 503)

    app.add_middleware(Guard, api_key=config.api_key, max_body=limit)
    return app


# --------------------------------------------------------------------------- helpers


def _errors(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def http_error(_req, e: HTTPError):
        return JSONResponse(error_body(e.message, e.type, e.param), e.status, headers=e.headers)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_req, e: BodyTooLarge):
        return JSONResponse(error_body(str(e), "invalid_request_error", code="request_too_large"), 413)

    @app.exception_handler(RequestValidationError)
    async def bad_params(_req, e: RequestValidationError):
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        return JSONResponse(error_body(f"{where}: {err['msg']}", "invalid_request_error"), 400)

    @app.exception_handler(404)
    async def no_route(req, _e):
        return JSONResponse(error_body(f"no route {req.method} {req.url.path}", "not_found_error"), 404)

    @app.exception_handler(405)
    async def bad_method(req, _e):
        return JSONResponse(error_body(f"{req.method} is not allowed on {req.url.path}", "invalid_request_error"), 405)


async def _json(request: Request):
    ctype = request.headers.get("content-type", "")
    if ctype and not ctype.startswith("application/json"):
        raise HTTPError(415, f"expected Content-Type application/json, got {ctype.split(';')[0]}")
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"the body is not valid JSON ({e})") from None


async def _form(request: Request) -> tuple[dict, dict]:
    """Multipart fields (str) and files (name -> (content type, bytes))."""
    ctype = request.headers.get("content-type", "")
    # a form without a file arrives urlencoded; it is read so the missing file part can be named
    if not ctype.startswith(FORMS):
        raise HTTPError(415, f"expected Content-Type {MULTIPART} (a file and fields), "
                        f"got {ctype.split(';')[0] or 'none'}")
    try:
        form = await request.form(max_files=4, max_fields=64, max_part_size=1 << 20)
    except BodyTooLarge:
        raise
    except Exception as e:  # noqa: BLE001 - the multipart parser's errors are the client's
        raise HTTPError(400, f"unreadable multipart body ({' '.join(str(e).split()) or type(e).__name__})") from None
    fields, files = {}, {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            if key in fields:
                raise HTTPError(400, f"field '{key}' given twice", param=key)
            fields[key] = value
        else:
            files[key] = (value.content_type, await value.read())
    await form.close()
    return fields, files


def _video_media(m, files: dict, limit: int):
    """Decode the input image / video of a /v1/videos request (a data: URL or a file part)."""
    img = vid = fps = None
    image_file = files.get("image") or files.get("input_reference")
    if m.image is not None or image_file is not None:
        mime, data = image_file if image_file else inputs.data_url(m.image, "image", limit)
        img = inputs.image(data, "image", mime)
    if m.video is not None or "video" in files:
        mime, data = files["video"] if "video" in files else inputs.data_url(m.video, "video", limit)
        vid, fps = inputs.video(data, "video", mime, m.fps)
    return inputs.video_job(m, img, vid, fps)


def _raise_for(job: Job) -> None:
    """A finished job's failure as the HTTP error a waiting client gets."""
    if job.status == SUCCEEDED:
        return
    if job.status == EXPIRED:
        raise HTTPError(503, job.error, "timeout_error", headers={"Retry-After": "5"})
    if job.status == CANCELLED:
        raise HTTPError(409, f"job {job.id} was {job.error}", "cancelled_error")
    if job.error_type == "invalid_request_error":
        raise HTTPError(400, job.error)
    raise HTTPError(500, job.error or "the job failed", "server_error")


def _image_response(job: Job, response_format: str, request: Request) -> dict:
    _raise_for(job)
    name = job.result["files"][0]
    if response_format == "url":
        item = {"url": str(request.base_url).rstrip("/") + "/v1/results/" + name}
    else:
        item = {"b64_json": base64.b64encode(request.app.state.store.path(name).read_bytes()).decode()}
    item["revised_prompt"] = None
    return {"created": int(job.created), "data": [item],
            "lance": {"job_id": job.id, "seed": job.result["seed"], "files": job.result["files"],
                      "notes": job.result["notes"]}}


async def _chat_chunks(job: Job, scheduler, include_usage: bool):
    """OpenAI's chat.completion.chunk stream: a role chunk, content deltas, a finish chunk, [DONE]."""
    base = {"id": "chatcmpl-" + job.id[4:], "object": "chat.completion.chunk", "created": int(time.time()),
            "model": scheduler.model_id}

    def chunk(delta: dict, finish=None) -> dict:
        return {"data": json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})}

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for e in job.events():
            if e.type == "token" and e.data.get("text"):
                yield chunk({"content": e.data["text"]})
            elif e.type == SUCCEEDED:
                yield chunk({}, job.result["finish_reason"])
                if include_usage:
                    yield {"data": json.dumps({**base, "choices": [], "usage": job.result["usage"]})}
            elif e.terminal:
                yield {"data": json.dumps(error_body(job.error or job.status, job.error_type or "server_error"))}
        yield {"data": "[DONE]"}
    finally:
        if not job.done:  # the client went away mid-answer
            scheduler.cancel(job.id)
