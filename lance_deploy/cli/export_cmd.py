"""`lance-deploy export onnx`, `lance-deploy verify` and `lance-deploy build-engine`."""

from __future__ import annotations

from pathlib import Path

import click

from lance_deploy.cli.common import LanceCommand, LanceGroup, echo_json
from lance_deploy.core.errors import LanceError, LanceUsageError


def _layers(value: str | None) -> tuple[int, ...] | None:
    """'0,3,5-7' -> (0, 3, 5, 6, 7)."""
    if not value:
        return None
    out: list[int] = []
    try:
        for item in value.split(","):
            lo, _, hi = item.strip().partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise LanceUsageError(f"--layers {value!r}: expected indices like 0,3,5-7") from None
    return tuple(sorted(set(out)))


def _tile(value: str | None) -> tuple[int, int] | None:
    """'16' -> (16, 16); '12x20' -> (12, 20) latent cells."""
    if not value:
        return None
    try:
        parts = [int(v) for v in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise LanceUsageError(f"--vae-tile {value!r}: expected N or HxW in latent cells, e.g. 16 or 12x20")
    return (parts[0], parts[-1])


def _log(quiet: bool):
    return (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))


@click.group("export", cls=LanceGroup)
def export_group() -> None:
    """Export Lance graphs for other runtimes (ONNX; then `verify` and `build-engine`)."""


@export_group.command("onnx", epilog="""\b
Examples:
  lance-deploy export onnx --model ckpt --part gen-layer --part vae-decoder --preset image_768res \\
      --out exported/onnx-768
  lance-deploy export onnx --model ckpt --part und-layer --layers 0-3 --preset image_256res --out exported/und --json
  lance-deploy export onnx --model exported/int8-ampere --part gen-layer --preset image_512res --out exported/q-trt
  lance-deploy export onnx --model exported/int8-ampere --part gen-layer --preset image_512res --target onnxruntime \
      --out exported/q-ort
""")
@click.option("--model", "model", required=True, type=click.Path(path_type=Path),
              help="Download folder or model folder (Lance_3B / Lance_3B_Video).")
@click.option("--part", "parts", multiple=True, required=True,
              help="gen-layer, und-layer, vit, vae-decoder or vae-encoder; repeat for several.")
@click.option("--preset", required=True,
              help="image_256res, image_512res, image_768res, video_192p, video_360p, video_480p.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Export folder to create.")
@click.option("--aspect", default="1:1", show_default=True, help="Aspect bucket of the static ViT grid.")
@click.option("--layers", help="Layer indices for gen-layer/und-layer, e.g. 0,3,5-7 (default: all).")
@click.option("--vae-tile", help="VAE tile in latent cells, N or HxW (default: the aspect bucket, at most 32).")
@click.option("--target", default="tensorrt", show_default=True,
              help="tensorrt: what build-engine takes (W8A8 with the artifact's calibrated static per-tensor "
                   "activation scales, zero points 0, opset 20; 21 only for int4 weights); onnxruntime: dynamic "
                   "per-token W8A8 scales, opset 21.")
@click.option("--exporter", default="auto", show_default=True,
              help="auto: torch's dynamo exporter (needs onnxscript) for gen-layer, und-layer and vit; the deprecated "
                   "TorchScript exporter where dynamo cannot yet: the VAE chunk graphs (dynamo fails tracing their "
                   "caches) and every Q/DQ graph of a quantized artifact (our Q/DQ lowering is a TorchScript "
                   "symbolic). dynamo or torchscript force one (dynamo is refused for Q/DQ graphs).")
@click.option("--vit", type=click.Path(path_type=Path), help="Qwen2.5-VL-ViT folder (default: beside the model).")
@click.option("--vae", type=click.Path(path_type=Path), help="Wan2.2_VAE.pth (default: beside the model).")
@click.option("--force", is_flag=True, help="Replace an existing, different export in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_onnx_cmd(model, parts, preset, out, aspect, layers, vae_tile, target, exporter, vit, vae, force,
                    as_json) -> None:
    """Export graphs of PARTs at a resolution PRESET into an export folder (manifest.json + graphs/)."""
    from lance_deploy.export.onnx_export import ExportRequest, export_onnx

    req = ExportRequest(model=model, parts=tuple(parts), preset=preset, out=out, aspect=aspect,
                        layers=_layers(layers), vae_tile=_tile(vae_tile), exporter=exporter, target=target,
                        force=force, vit=vit, vae=vae)
    manifest = export_onnx(req, log=_log(as_json))
    if as_json:
        echo_json(dict(manifest.to_dict(), out=str(out)))
        return
    click.echo(f"wrote {out} ({len(manifest.parts)} graphs: {', '.join(e.name for e in manifest.parts)})")


@click.command("verify", cls=LanceCommand, epilog="""\b
Examples:
  lance-deploy verify exported/onnx-768
  lance-deploy verify exported/q-trt --model exported/int8-ampere --json
""")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), help="The checkpoint, if it moved since the export.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-graph results as JSON.")
def verify_cmd(folder: Path, model: Path | None, as_json: bool) -> None:
    """Run every graph of FOLDER in onnxruntime against PyTorch; errors go into its manifest.json.

    Also lints every graph against what TensorRT 10's ONNX parser documents (operators, opset,
    constant positive Q/DQ scales, zero points 0, int4 weight-only, no nf4, profiles for every
    dynamic axis). Exits 1 if any graph has a relative L2 error above 1e-4, or, for a
    --target tensorrt export, fails the lint.
    """
    from lance_deploy.export.verify import FP32_REL_TOL, verify_export

    result = verify_export(folder, model=model, log=_log(as_json))
    if as_json:
        echo_json({"folder": str(folder), "failed": result.failed,
                   "graphs": {e.name: e.verification for e in result.manifest.parts}})
    else:
        for e in result.manifest.parts:
            v = e.verification
            worst = max(o["rel_l2"] for o in v["outputs"].values())
            lint = v["tensorrt_lint"]
            bad = [f for f in lint["findings"] if f["severity"] == "error"]
            click.echo(f"{e.name:24s} {'ok  ' if v['passed'] else 'FAIL'} rel-L2 {worst:.2e}  ({v['provider']})  "
                       f"TensorRT lint {'ok' if not bad else f'{len(bad)} problem(s)'}"
                       f"{'' if lint['enforced'] or not bad else ' (not enforced: onnxruntime target)'}")
            for f in bad[:3]:
                click.echo(f"    node {f['node']} ({f['op']}): {f['problem']}; {f['fix']}")
    if result.failed:
        raise LanceError(f"{len(result.failed)} graph(s) exceed rel-L2 {FP32_REL_TOL:g} or fail the TensorRT lint: "
                         f"{', '.join(result.failed)} (details in {folder / 'manifest.json'})")


@click.command("build-engine", cls=LanceCommand, epilog="""\b
Examples:
  lance-deploy build-engine exported/q-trt --precision int8
  lance-deploy build-engine exported/onnx-768 --precision bf16 --graph vae-decoder.first --timing-cache tc.bin
""")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--precision", required=True, help="fp16, bf16, fp8 or int8 (fp8/int8 need a Q/DQ graph).")
@click.option("--workspace-gib", type=float, default=8.0, show_default=True, help="TensorRT workspace pool limit.")
@click.option("--tactic-dram-gib", type=float, help="Limit on device memory used while timing tactics.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Timing cache file to load and update.")
@click.option("--weight-streaming", is_flag=True, help="Build streamable engines (strongly typed graphs only).")
@click.option("--graph", "graphs", multiple=True, help="Only these graphs (e.g. vae-decoder.first); default all.")
def build_engine_cmd(folder, precision, workspace_gib, tactic_dram_gib, timing_cache, weight_streaming, graphs):
    """Build TensorRT engines for FOLDER's graphs into FOLDER/engines/<gpu>-sm<XY>/ (on the target GPU).

    Every graph is linted first (as `verify` does); one TensorRT would refuse is named, with what
    to change, before anything is built.
    """
    from lance_deploy.export.tensorrt_build import EngineRequest, build_engines

    req = EngineRequest(root=folder, precision=precision, workspace_gib=workspace_gib, tactic_dram_gib=tactic_dram_gib,
                        timing_cache=timing_cache, weight_streaming=weight_streaming, graphs=tuple(graphs) or None)
    for path in build_engines(req, log=_log(False)):
        click.echo(f"wrote {path}")
