"""Gather one `benchmarks/device_suite.sh` run into OUT/device_suite.json and OUT/device_suite.md.

    python benchmarks/device_report.py bench-out/device-20261202T120000Z

Reads what the suite's steps left in OUT: steps.jsonl, env.json, memory-*.json
(benchmarks/memory.py), rehearse.json (benchmarks/rehearse.py), kernels.json
(benchmarks/kernels.py) and the quantize logs. The markdown puts, per task x budget x weights x
phase, the measured `max_memory_allocated` beside the planner's and the rehearsal's prediction,
and paged against resident seconds per step: the table that goes into docs/benchmarks.md.
A step that failed or never ran leaves its rows out and its line in the steps table says why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from lance_deploy.core.fsutil import publish_bytes

GiB = 1 << 30


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_json(path: Path):
    """The last line of a log that parses as a JSON object (`quantize --json` prints one)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def gather(out: Path) -> dict:
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x.strip()] \
        if (out / "steps.jsonl").is_file() else []
    memory = []
    for p in sorted(out.glob("memory-*.json")):
        memory += _load(p) or []
    quantize = {}
    for p in sorted((out / "logs").glob("quant-*.log")):
        rec = next((s for s in steps if s["step"] == p.stem), {})
        quantize[p.stem.removeprefix("quant-")] = {"seconds": rec.get("seconds"), "rc": rec.get("rc"),
                                                   "result": _last_json(p)}
    return {"env": _load(out / "env.json"), "steps": steps, "memory": memory,
            "rehearsal": _load(out / "rehearse.json") or [], "kernels": _load(out / "kernels.json"),
            "quantize": quantize}


UNIT = {"GiB": GiB}  # memory_table switches to MiB for the tiny model of the dry run


def _gib(v) -> str:
    size = next(iter(UNIT.values()))
    return "-" if v is None else f"{v / size:.2f}"


def _ratio(a, b) -> str:
    return "-" if not a or not b else f"{a / b:.3f}"


def memory_table(data: dict) -> list[str]:
    rehearsed = {(r["task"], r["budget"], r["recipe"], r["phase"]): r["rehearsed"]
                 for r in data["rehearsal"] if "phase" in r}
    biggest = max((r.get("planned_total") or 0 for r in data["memory"]), default=0)
    UNIT.clear()
    UNIT.update({"GiB": GiB} if biggest >= GiB else {"MiB": 1 << 20})
    u = next(iter(UNIT))
    lines = [(f"| task | weights | budget | phase | measured alloc {u} | planner alloc {u} | planner / measured | "
              f"rehearsed {u} | rehearsed / measured | peak reserved {u} | planner total {u} | s/step | vs resident |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["memory"]:
        if "error" in r:
            lines.append(f"| {r['spec']} | {r['label']} | {r['budget']} | - | does not fit: {r['error']} "
                         "| | | | | | | | |")
            continue
        per = r.get("s_per_step") or r.get("s_per_token") or r.get("seconds")
        for i, (phase, p) in enumerate(r["phases"].items()):
            got, reh = p["measured_alloc"], rehearsed.get((r["task"], r["budget"], r["label"], phase))
            tail = (f"{_gib(r['peak_reserved'])} | {_gib(r['planned_total'])} | {per:.3f} | {r['vs_resident']}"
                    if i == 0 else " | | | ")
            lines.append(f"| {r['spec']} | {r['label']} | {r['budget']} | {phase} | {_gib(got)} | "
                         f"{_gib(p['planned_alloc'])} | {_ratio(p['planned_alloc'], got)} | {_gib(reh)} | "
                         f"{_ratio(reh, got)} | {tail} |")
    return lines


def generic_table(rows) -> list[str]:
    """A markdown table of a list of flat dicts (kernels.json is benchmarks/kernels.py's to shape)."""
    if isinstance(rows, dict):
        rows = rows.get("rows") or rows.get("results") or [rows]
    rows = [r for r in rows or [] if isinstance(r, dict)]
    if not rows:
        return ["(no rows)"]
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + \
        ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]


def markdown(data: dict) -> str:
    env = data["env"] or {}
    out = [(f"Device: {env.get('device', '?')} (capability {env.get('capability')}), torch {env.get('torch')}, "
           f"CUDA {env.get('cuda')}."), "", "| step | rc | seconds | note |", "|---|---|---|---|"]
    out += [f"| {s['step']} | {s.get('rc')} | {s.get('seconds')} | {s.get('note', '')} |" for s in data["steps"]]
    out += ["", "Peak allocated bytes per phase: measured, planned, rehearsed; paged vs resident s/step", ""]
    out += memory_table(data)
    if data["quantize"]:
        out += ["", "| quantize (image model) | seconds | rc |", "|---|---|---|"]
        out += [f"| {k} | {v['seconds']} | {v['rc']} |" for k, v in data["quantize"].items()]
    out += ["", "Kernels (benchmarks/kernels.py)", ""]
    out += generic_table(data["kernels"]) if data["kernels"] is not None else ["(kernels.json missing: see logs/kernels.log)"]
    return "\n".join(out) + "\n"


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        raise SystemExit("usage: python benchmarks/device_report.py OUT  (the folder device_suite.sh wrote)")
    out = Path(sys.argv[1])
    data = gather(out)
    publish_bytes(out / "device_suite.json", json.dumps(data, indent=1).encode())
    md = markdown(data)
    publish_bytes(out / "device_suite.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
