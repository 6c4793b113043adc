"""The fake-CUDA rehearsal matrix: every task at its headline size, all resident and under budgets,
bf16 and quantized, rehearsed peak per phase beside the planner's (CPU only, no GPU).

    python benchmarks/rehearse.py --model /tmp/hdr --out docs/rehearsal.json
    python benchmarks/rehearse.py --model /tmp/hdr --tasks t2i --budgets resident 8GiB --recipes int8-rtn

`--model` is a full-size release; a header-only one (`lance_deploy.checkpoint.headers_only`) is
enough, since the rehearsal reads headers and configs only. A recipe's expert Linears become
QLinears with fake packed fields of the recipe's formats (as `quantize` would store them) and
the planner is asked about the matching hypothetical `--weights` recipe.
"""

from __future__ import annotations

import argparse
import json
import time

from lance_deploy.planning.rehearsal import rehearse, request, table

TASKS = ("t2i", "image_edit", "t2v", "i2v", "video_edit", "x2t_image", "x2t_video")
PLANNER_RECIPE = {"fp8-rtn": "fp8", "fp8-ada-hopper": "fp8", "int8-rtn": "int8", "int4-rtn": "int4"}
INT4_RTN = """schema_version: 1
name: int4-rtn
rules:
  - match: "blk.*.gen.*|blk.*.und.*"
    format: int4
    group_size: 128
    algorithm: rtn
  - match: "*"
    format: bf16
"""


def recipe_formats(model: str, name: str, task: str) -> dict:
    """{module path in LanceLM: (FormatSpec, smooth?)} of the recipe's packed expert Linears."""
    from lance_deploy.checkpoint import canonical as cn
    from lance_deploy.quant.plan import plan_checkpoint
    from lance_deploy.quant.recipe import Recipe, load_recipe

    recipe = Recipe.from_yaml_text(INT4_RTN) if name == "int4-rtn" else load_recipe(name)
    variant = "video" if task in ("t2v", "i2v", "video_edit", "x2t_video") else "image"
    out = {}
    for e in plan_checkpoint(model, recipe, variant=variant).entries:
        if e.packed and e.format != "bf16" and cn.expert_of(e.name):
            out[cn.to_release(e.name).removesuffix(".weight")] = (e.spec(), e.smooth)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--budgets", nargs="+", default=["resident", "16GiB", "12GiB", "8GiB"])
    ap.add_argument("--recipes", nargs="+", default=["bf16"], help="bf16 and/or " + ", ".join(PLANNER_RECIPE))
    ap.add_argument("--steps", type=int, default=1, help="denoising steps (peaks do not depend on the count)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--out", help="write every row as JSON here")
    args = ap.parse_args()
    results, rows = [], []
    for recipe in args.recipes:
        for task in args.tasks:
            formats = None if recipe == "bf16" else recipe_formats(args.model, recipe, task)
            for b in args.budgets:
                t0 = time.perf_counter()
                req = request(task, steps=args.steps, max_new_tokens=args.max_new_tokens)
                try:
                    r = rehearse(args.model, task, None if b == "resident" else b, req=req, formats=formats,
                                 recipe=PLANNER_RECIPE.get(recipe))
                except Exception as e:  # a budget nothing fits, or a rehearsal failure: one line, go on
                    print(f"{task} {b} {recipe}: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
                    rows.append({"task": task, "budget": b, "recipe": recipe, "error": str(e).splitlines()[0]})
                    continue
                r.recipe = recipe
                results.append(r)
                secs = time.perf_counter() - t0
                print(f"{task} {b} {recipe}: {secs:.0f} s, sdpa {r.sdpa}, host syncs {r.syncs}, "
                      f"engine {r.engine_calls}", flush=True)
                for row in r.rows:
                    rows.append({"task": task, "budget": b, "recipe": recipe, "phase": row.phase,
                                 "rehearsed": row.rehearsed, "planned": row.planned,
                                 "planned_total": row.planned_total, "ledger": row.ledger,
                                 "ratio": round(row.ratio, 4), "seconds": round(secs, 1)})
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
