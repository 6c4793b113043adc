"""`lance-deploy serve`: the OpenAI-style HTTP API and the web UI (the `serve` floor does the work)."""

from __future__ import annotations

from pathlib import Path

import click

from lance_deploy.core.units import parse_size


@click.command("serve", epilog="""\b
Examples:
  lance-deploy serve --model ckpt                      # API on 127.0.0.1:8000, web UI at /ui
  lance-deploy serve --model ckpt/Lance_3B --gpu-memory 12GiB --api-key "$KEY"
  lance-deploy serve --model ckpt --ray --replicas 2   # one replica per GPU behind Ray Serve
""")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="Download folder (serves its video model: all seven tasks), a model folder or an artifact.")
@click.option("--variant", type=click.Choice(("image", "video")), help="Which model of a download folder to serve.")
@click.option("--gpu-memory", help="Device budget per process, e.g. 12GiB (plans residency as `run` does).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port to listen on.")
@click.option("--api-key", envvar="LANCE_API_KEY", help="Require Authorization: Bearer KEY (env LANCE_API_KEY).")
@click.option("--queue-size", type=click.IntRange(1, 10_000), default=8, show_default=True,
              help="Jobs that may wait; beyond it requests get 429 with Retry-After.")
@click.option("--queue-timeout", type=click.FloatRange(0.1), default=600.0, show_default=True,
              help="Seconds a job may wait in the queue before it is dropped.")
@click.option("--max-upload", default="64MiB", show_default=True, help="Largest request body (an upload).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("lance-serve"), show_default=True,
              help="Folder for results (results/) and edit sessions (sessions/).")
@click.option("--device", default="auto", show_default=True, help="cuda, cuda:N or cpu.")
@click.option("--dtype", default="auto", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--no-ui", is_flag=True, help="Serve the API only (no web UI at /ui).")
@click.option("--ray", "use_ray", is_flag=True, help="Scale out on Ray Serve: one model replica per GPU.")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True, help="With --ray: replicas to start.")
@click.option("--min-replicas", type=click.IntRange(1), help="With --ray: autoscaling floor (default --replicas).")
@click.option("--max-replicas", type=click.IntRange(1), help="With --ray: autoscaling ceiling (default --replicas).")
@click.option("--ray-address", help="With --ray: join this cluster (e.g. HEAD_IP:6379; default: start a local Ray).")
def serve_cmd(model_path, variant, gpu_memory, host, port, api_key, queue_size, queue_timeout, max_upload, out,
              device, dtype, no_ui, use_ray, replicas, min_replicas, max_replicas, ray_address):
    """Serve Lance over HTTP: OpenAI-style endpoints, async video jobs and a web UI."""
    from lance_deploy.core.errors import LanceUsageError

    if gpu_memory is not None:
        parse_size(gpu_memory)  # a bad size fails before anything loads
    if not use_ray and (replicas != 1 or min_replicas or max_replicas or ray_address):
        raise LanceUsageError("--replicas, --min-replicas, --max-replicas and --ray-address need --ray")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use the model",
                   err=True)
    out.mkdir(parents=True, exist_ok=True)
    upload = parse_size(max_upload, "--max-upload")
    if use_ray:
        from lance_deploy.serve.ray_app import RayConfig, serve_ray

        lo, hi = min_replicas or replicas, max_replicas or replicas
        if not lo <= replicas <= hi:
            raise LanceUsageError(f"--replicas {replicas} is outside --min-replicas {lo} .. --max-replicas {hi}")
        serve_ray(RayConfig(model=model_path, out=out.resolve(), host=host, port=port, api_key=api_key,
                            queue_size=queue_size, queue_timeout_s=queue_timeout,
                            max_upload_bytes=upload, gpu_memory=gpu_memory, device=device,
                            dtype=dtype, variant=variant, replicas=replicas, min_replicas=lo, max_replicas=hi,
                            address=ray_address),
                  log=lambda s: click.echo(s, err=True))
        return
    from lance_deploy.serve.server import ServeConfig, serve

    serve(ServeConfig(model=model_path, out=out, host=host, port=port, api_key=api_key, queue_size=queue_size,
                      queue_timeout_s=queue_timeout, max_upload_bytes=upload, gpu_memory=gpu_memory,
                      device=device, dtype=dtype, variant=variant, ui=not no_ui),
          log=lambda s: click.echo(s, err=True))
