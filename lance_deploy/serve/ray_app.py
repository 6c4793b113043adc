"""Scale-out on Ray Serve: N model replicas (one per GPU) behind one ingress with the same routes.

    LanceIngress (1 replica, no GPU)          LanceModel (N replicas, 1 GPU each)
      the FastAPI app of `serve.app`    -->     Engine + LocalScheduler (bounded queue, one worker)
      RayScheduler: job table, retries          `run` streams a job's events back

Ray Serve's router spreads calls over the model replicas (each takes at most queue_size + 1). The
ingress owns every job: when a replica dies, its calls fail at the ingress, which runs each job
again once on another replica (seeded, so the same result) or ends it with a one-line error.
Results come back as bytes and are stored by the ingress, so machines need no shared folder.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lance_deploy.api_session import request_from_params
from lance_deploy.serve.jobs import CANCELLED, FAILED, SUCCEEDED, TERMINAL, Job
from lance_deploy.serve.scheduler import QueueFull
from lance_deploy.serve.worker import one_line

APP_NAME, MODEL, INGRESS = "lance", "LanceModel", "LanceIngress"
ATTEMPTS = 2  # a job whose replica died runs once more elsewhere
log = logging.getLogger("lance_deploy.serve")


@dataclass(frozen=True)
class RayConfig:
    model: Path
    out: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    queue_size: int = 8
    queue_timeout_s: float = 600.0
    max_upload_bytes: int = 64 << 20
    gpu_memory: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    variant: str | None = None
    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 1
    address: str | None = None  # an existing cluster (ray start --head); None = a local Ray on loopback


# --------------------------------------------------------------------------- the model replica


class LanceModel:
    """One resident model with its own bounded queue; `run` streams one job's events."""

    def __init__(self, config: RayConfig):
        from ray import serve

        from lance_deploy.serve.engine import Engine
        from lance_deploy.serve.scheduler import LocalScheduler
        from lance_deploy.serve.store import encode

        self.id = serve.get_replica_context().replica_id.to_full_id_str()  # the actor's name
        _share_cpu(config)
        engine = Engine.load(config.model, variant=config.variant, gpu_memory=config.gpu_memory,
                             device=config.device, dtype=config.dtype)
        eos = engine.tokenizer.im_end

        def save(job, output):  # the bytes go back to the ingress, which stores them
            files, result = encode(job, output, engine.model_id, eos_id=eos)
            return {**result, "_files": files}

        self.scheduler = LocalScheduler(engine, None, queue_size=config.queue_size,
                                        queue_timeout_s=config.queue_timeout_s, save=save, replica=self.id).start()

    async def run(self, payload: dict):
        req = request_from_params(payload["params"], image=payload.get("image"), video=payload.get("video"))
        try:
            job = self.scheduler.submit(req, payload["params"], job_id=payload["job_id"])
        except QueueFull as e:
            yield {"type": "rejected", "data": {"error": str(e)}, "replica": self.id}
            return
        try:
            async for e in job.events():
                yield {"type": e.type, "data": e.data, "replica": self.id}
        finally:  # the ingress cancelled the call (DELETE, or the client left): stop at the next step
            if not job.done:
                self.scheduler.cancel(job.id)

    def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        if not self.scheduler.health()["worker_alive"]:
            raise RuntimeError("the worker thread is not running")


def _share_cpu(config: RayConfig) -> None:
    """On CPU, replicas split the cores instead of each starting a thread per core."""
    if config.device == "cpu" or (config.device == "auto" and not _has_cuda()):
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, config.replicas)))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- the ingress


class RayScheduler:
    """The scheduler interface of `serve.app` over the model replicas."""

    def __init__(self, handle, config: RayConfig):
        from lance_deploy.core.tasks import TASKS
        from lance_deploy.serve.engine import IMAGE_TASKS, model_variant
        from lance_deploy.serve.store import ResultStore

        self.handle, self.config = handle, config
        self.variant = model_variant(Path(config.model).expanduser(), config.variant)[1]
        self.tasks = TASKS if self.variant == "video" else IMAGE_TASKS
        self.model_id = "lance-3b-video" if self.variant == "video" else "lance-3b"
        self.store = ResultStore(config.out)
        self.capacity = config.max_replicas * (config.queue_size + 1)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._calls: dict[str, object] = {}
        self._running: set[asyncio.Task] = set()
        self._durations: list[float] = []

    def validate(self, req) -> None:
        from lance_deploy.serve.engine import check_task

        check_task(req.task, self.tasks, self.variant)
        req.validate()  # the replica checks the token caps too, with the tokenizer

    def submit(self, req, params: dict) -> Job:
        from lance_deploy.serve.scheduler import retry_after

        active = sum(1 for j in self._jobs.values() if not j.done)
        if active >= self.capacity:
            raise QueueFull(active, retry_after(self._durations[-20:], active // max(1, self.config.replicas)))
        job = Job(task=req.task, request=req, params=params, timeout_s=self.config.queue_timeout_s)
        self._jobs[job.id] = job
        while len(self._jobs) > 1000 and (old := next((j for j in self._jobs.values() if j.done), None)):
            del self._jobs[old.id]
        job.emit("queued", position=active + 1)
        task = asyncio.get_running_loop().create_task(self._drive(job, req))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        job.cancel_requested.set()
        call = self._calls.get(job_id)
        if call is not None:
            call.cancel()
        elif not job.done:
            job.finish(CANCELLED, error="cancelled while queued", error_type="cancelled")
        return job

    def health(self) -> dict:
        from ray import serve

        try:
            states = serve.status().applications[APP_NAME].deployments[MODEL].replica_states
        except Exception as e:  # noqa: BLE001 - a health probe reports, it does not raise
            states = {"UNKNOWN": one_line(e)}
        running = int(states.get("RUNNING", 0))
        active = sum(1 for j in self._jobs.values() if not j.done)
        return {"status": "ok" if running else "no_replica", "model": self.model_id, "tasks": list(self.tasks),
                "worker_alive": running > 0, "replicas": {str(k): v for k, v in states.items()},
                "queue": {"waiting": active, "size": self.capacity}}

    async def _drive(self, job: Job, req) -> None:
        """Run the job on some replica, once more on another if that replica dies."""
        from ray.serve.exceptions import RequestCancelledError

        payload = {"job_id": job.id, "params": job.params, "image": req.image, "video": req.video}
        start = time.perf_counter()
        for attempt in range(1, ATTEMPTS + 1):
            if job.cancel_requested.is_set():
                break
            call = self.handle.options(stream=True).run.remote(payload)
            self._calls[job.id] = call
            try:
                async for ev in call:
                    if self._forward(job, ev):
                        break
                if job.done:
                    self._durations.append(time.perf_counter() - start)
                    return
                raise RuntimeError("the replica's stream ended without a result")
            except (RequestCancelledError, asyncio.CancelledError):
                break
            except Exception as e:  # noqa: BLE001 - a dead replica, a lost connection
                if job.cancel_requested.is_set():
                    break
                reason = f"{type(e).__name__}: {one_line(e, 200)}"
                log.warning("job %s: replica %s failed (%s), attempt %d", job.id, job.replica, reason, attempt)
                if attempt < ATTEMPTS:
                    job.emit("retrying", attempt=attempt + 1, reason=reason)
                    await asyncio.sleep(1.0)  # let the router learn the replica is gone
                    continue
                job.finish(FAILED, error=f"the replica running it failed twice; last: {reason}",
                           error_type="server_error")
                return
            finally:
                self._calls.pop(job.id, None)
        if not job.done:
            job.finish(CANCELLED, error=f"cancelled at step {job.step} of {job.total}", error_type="cancelled")

    def _forward(self, job: Job, ev: dict) -> bool:
        """Replay a replica event on the ingress's job; True at the end."""
        kind, data = ev["type"], dict(ev["data"])
        job.replica = ev["replica"]
        if kind == "queued":
            return False  # the ingress said it already
        if kind == "rejected":  # the router sent more than the replica's queue holds (rare)
            job.finish(FAILED, error=data["error"], error_type="rate_limit_error")
            return True
        if kind == SUCCEEDED:
            files = data["result"].pop("_files")
            self.store.write(files)
        job.emit(kind, **data)
        return kind in TERMINAL


class LanceIngress:
    def __init__(self, model_handle, config: RayConfig):
        self.scheduler = RayScheduler(model_handle, config)
        self.config = config

    def __serve_build_asgi_app__(self):
        from lance_deploy.serve.app import AppConfig, create_app

        return create_app(self.scheduler, AppConfig(api_key=self.config.api_key,
                                                    max_upload_bytes=self.config.max_upload_bytes))


# --------------------------------------------------------------------------- deploying


def build(config: RayConfig):
    """The Ray Serve application (bind graph) for `config`."""
    from ray import serve

    gpus = 1 if config.device != "cpu" and _has_cuda() else 0
    scaling = ({"num_replicas": config.replicas} if config.min_replicas == config.max_replicas else
               {"autoscaling_config": {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                       "initial_replicas": config.replicas,
                                       "target_ongoing_requests": max(1, config.queue_size // 2)}})
    model = serve.deployment(LanceModel, name=MODEL, max_ongoing_requests=config.queue_size + 1,
                             ray_actor_options={"num_gpus": gpus, "num_cpus": 1}, health_check_period_s=2,
                             health_check_timeout_s=30, graceful_shutdown_timeout_s=10, **scaling)
    ingress = serve.deployment(serve.ingress()(LanceIngress), name=INGRESS, num_replicas=1,
                               max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
    return ingress.bind(model.bind(config), config)


def start(config: RayConfig, log_fn=print):
    """Connect to (or start) Ray, start Serve's HTTP proxy on host:port, deploy; returns when it is up."""
    from lance_deploy.core.optional import require

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports usage over the network unless told not to
    ray = require("ray")
    from ray import serve

    if not ray.is_initialized():
        if config.address:
            ray.init(address=config.address, include_dashboard=False, log_to_driver=False)
        else:  # a local single-node Ray that talks over loopback only
            ray.init(num_cpus=config.max_replicas + 1, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False)
    serve.start(http_options={"host": config.host, "port": config.port})
    log_fn(f"deploying {config.replicas} replica(s) of {config.model} on Ray Serve ...")
    serve.run(build(config), name=APP_NAME, route_prefix="/", blocking=False)
    return serve


def serve_ray(config: RayConfig, log=print) -> None:
    """`lance-deploy serve --ray`: deploy, then wait until Ctrl-C and shut Serve down."""
    serve = start(config, log)
    log(f"serving on http://{config.host}:{config.port} ({config.replicas} replica(s); Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
