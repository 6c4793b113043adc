"""The fake-CUDA rehearsal matrix: every task at its headline size, all resident and under budgets,
bf16 and each shipped recipe, rehearsed peak per phase beside the planner's (CPU only, no GPU).

    python benchmarks/rehearse.py --model /tmp/hdr --json docs/rehearsal.json --markdown /tmp/rehearsal.md
    python benchmarks/rehearse.py --model /tmp/hdr --tasks t2i --budgets resident 8GiB --recipes bf16 int8-rtn

`--model` is a full-size release; a header-only one (`lance_deploy.checkpoint.headers_only`) is
enough, since the rehearsal reads headers and configs only. A recipe's expert Linears become
QLinears with fake packed fields of the formats the recipe resolves to on this release (as
`quantize` would store them), and the planner plans exactly those stored bytes.

Two shortcuts, both exact: a budget whose plan keeps everything resident runs the same code as
the all-resident run, so its row repeats that run ("= resident"); recipes whose formats are the
same tensor by tensor (int8-rtn and budget-16gb: the algorithm differs, not the layout) share a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from lance_deploy.core.fsutil import publish_bytes
from lance_deploy.core.units import GiB
from lance_deploy.planning.rehearsal import (
    parse_task,
    plan_request,
    planned_peaks,
    rehearse,
    request,
)

TASKS = ("t2i", "image_edit", "t2v", "i2v", "video_edit", "x2t_image", "x2t_video")
BUDGETS = ("resident", "16GiB", "12GiB", "8GiB")
TOLERANCE = 0.10


def shipped() -> list[str]:
    from lance_deploy.quant.recipe import shipped_recipes

    return shipped_recipes()


def recipe_formats(model: str, name: str, task: str) -> dict:
    """{module path in LanceLM: (FormatSpec, smooth?)} of the recipe's packed expert Linears."""
    from lance_deploy.checkpoint import canonical as cn
    from lance_deploy.pipeline.tasks import VIDEO_TASKS
    from lance_deploy.quant.plan import plan_checkpoint
    from lance_deploy.quant.recipe import load_recipe

    variant = "video" if task in VIDEO_TASKS else "image"
    out = {}
    for e in plan_checkpoint(model, load_recipe(name), variant=variant).entries:
        if e.packed and e.format != "bf16" and cn.expert_of(e.name):
            out[cn.to_release(e.name).removesuffix(".weight")] = (e.spec(), e.smooth)
    return out


def _signature(formats: dict | None) -> tuple:
    return () if not formats else tuple(sorted((p, s.label, s.activations, sm) for p, (s, sm) in formats.items()))


def _resident_plan(model: str, budget: str, req, formats: dict | None) -> bool:
    """Whether the plan under `budget` keeps everything resident (the run is the all-resident one)."""
    mp = plan_request(model, req, budget, formats=formats)
    return mp.fits and not mp.needs_residency()


def run_matrix(args) -> list[dict]:
    """Rehearse every recipe x task x budget; one row per phase (or one error row per run)."""
    rows, runs = [], {}
    for recipe in args.recipes or ["bf16", *shipped()]:
        for spec in args.tasks:
            task, h, w, f = parse_task(spec)
            formats = None if recipe == "bf16" else recipe_formats(args.model, recipe, task)
            req = request(task, h, w, f, steps=args.steps, max_new_tokens=args.max_new_tokens)
            for b in args.budgets:
                budget = None if b == "resident" else b
                if budget is not None and _resident_plan(args.model, budget, req, formats):
                    key, note = (spec, _signature(formats), None), "= resident"
                else:
                    key, note = (spec, _signature(formats), budget), None
                r = runs.get(key)
                t0 = time.perf_counter()
                if r is None:
                    try:
                        r = runs[key] = rehearse(args.model, task, budget, req=req, formats=formats, label=recipe)
                    except Exception as e:  # noqa: BLE001 - a budget nothing fits, or a rehearsal failure: one line, go on
                        msg = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                        print(f"{task} {b} {recipe}: {msg}", flush=True)
                        rows.append({"task": task, "spec": spec, "budget": b, "recipe": recipe, "error": msg})
                        continue
                elif r.recipe != recipe:
                    note = f"= {r.recipe}" + (" resident" if key[2] is None and budget else "")
                secs = time.perf_counter() - t0
                print(f"{task} {b} {recipe}: {secs:.0f} s{' (' + note + ')' if note else ''}, sdpa {r.sdpa}, "
                      f"host syncs {r.syncs}, engine {r.engine_calls}", flush=True)
                rows += [{"task": task, "spec": spec, "budget": b, "recipe": recipe, "phase": x.phase, "same_as": note,
                          "streamed": r.streamed, "rehearsed": x.rehearsed, "planned": x.planned,
                          "planned_total": x.planned_total, "ledger": x.ledger, "ratio": round(x.ratio, 4),
                          "seconds": round(secs, 1), "sdpa": r.sdpa} for x in r.rows]
                if args.json_out:  # after every run: a matrix cut short keeps what it finished
                    publish_bytes(Path(args.json_out), json.dumps(rows, indent=1).encode())
    return rows


def replan(rows: list[dict], args) -> list[dict]:
    """The same rows with the planner's side recomputed by the planner as it is now (the rehearsed
    bytes are the run's own and do not depend on it): a planner fix is re-checked in seconds."""
    plans = {}
    for r in rows:
        if "phase" not in r:
            continue
        key = (r["spec"], r["recipe"], r["budget"])
        if key not in plans:
            task, h, w, f = parse_task(r["spec"])
            req = request(task, h, w, f, steps=args.steps, max_new_tokens=args.max_new_tokens)
            formats = None if r["recipe"] == "bf16" else recipe_formats(args.model, r["recipe"], task)
            mp = plan_request(args.model, req, None if r["budget"] == "resident" else r["budget"], formats=formats)
            plans[key] = planned_peaks(mp, r.get("streamed", r["ledger"] is not None))  # older rows: the ledger
        r["planned"], r["planned_total"] = plans[key][r["phase"]]
        r["ratio"] = round(r["rehearsed"] / r["planned"], 4)
    return rows


def markdown(rows: list[dict]) -> str:
    """task x budget x weights, per phase: rehearsed / planned (allocated) and their ratio."""
    lines = ["| task | budget | weights | phase | rehearsed GiB | planned GiB | ratio | planner total GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        weights = r["recipe"] + (f" ({r['same_as']})" if r.get("same_as") else "")
        if "error" in r:
            lines.append(f"| {r['spec']} | {r['budget']} | {weights} | - | {r['error']} | | | |")
            continue
        lines.append(f"| {r['spec']} | {r['budget']} | {weights} | {r['phase']} | {r['rehearsed'] / GiB:.2f} | "
                     f"{r['planned'] / GiB:.2f} | {r['ratio']:.3f} | {r['planned_total'] / GiB:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a full-size release (headers only will do)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), help="task[:HxW[xFRAMES]] (default: every task "
                    "at its headline size)")
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), help="'resident' and/or sizes such as 8GiB")
    ap.add_argument("--recipes", nargs="+", default=None, help="bf16 and/or shipped recipes (default: all of them)")
    ap.add_argument("--steps", type=int, default=1, help="denoising steps (peaks do not depend on the count)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--json", dest="json_out", help="write every row as JSON here")
    ap.add_argument("--markdown", help="write the markdown table here")
    ap.add_argument("--replan", nargs="+", metavar="JSON",
                    help="instead of rehearsing, reload these --json outputs and recompute the planner's side")
    args = ap.parse_args()
    if args.replan:
        rows = replan([r for p in args.replan for r in json.loads(Path(p).read_text())], args)
    else:
        rows = run_matrix(args)
    md = markdown(rows)
    print(md)
    bad = [r for r in rows if "error" in r or abs(r["ratio"] - 1) > TOLERANCE]
    print(f"{len(rows) - len(bad)} of {len(rows)} rows within ±{TOLERANCE:.0%}")
    if args.json_out:
        publish_bytes(Path(args.json_out), json.dumps(rows, indent=1).encode())
    if args.markdown:
        publish_bytes(Path(args.markdown), (md + "\n").encode())


if __name__ == "__main__":
    main()
