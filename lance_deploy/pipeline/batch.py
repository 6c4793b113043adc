"""Batches for `run`: read a prompt file, expand seed sweeps, name each output.

A prompt file is one of three formats, told apart by its suffix:

* `.jsonl`: one JSON object per line; `prompt` (or `question` for x2t) plus any of `OVERRIDES`.
* `.json`: upstream's example file, an object of output name -> caption, or -> an
  `interleave_array` entry (texts and media, as in upstream's `config/examples/*.json`).
* anything else: one prompt per line (blank lines and lines starting with `#` skipped).

Media paths are relative to the prompt file's folder. Every line is checked on its own: a bad one
becomes a `BatchItem` with `error` set (named by its line number) and the others still run.
Output names are deterministic, so a rerun finds what exists and skips it (resume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lance_deploy.core import jsonio
from lance_deploy.core.errors import LanceUsageError
from lance_deploy.core.schema import show
from lance_deploy.core.tasks import UNDERSTANDING_TASKS, output_extension
from lance_deploy.pipeline import limits

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_ITEMS = 100_000
TEXTS = ("prompt", "question", "system", "negative_prompt")
INTS = ("seed", "height", "width", "frames", "steps")
FLOATS = ("shift", "cfg", "fps")
PATHS = ("image", "video")
OVERRIDES = TEXTS + INTS + FLOATS + PATHS + ("out",)
"""JSONL keys: the `run` option names without dashes (`negative_prompt` is `--negative-prompt`);
`out` is the output's file name inside the batch's `--out` folder."""


@dataclass
class BatchLine:
    """One entry of a prompt file: its option overrides and, if it names one, its output stem."""

    number: int  # 1-based line (JSONL, text) or entry (JSON) number, for messages
    fields: dict = field(default_factory=dict)
    name: str | None = None
    error: str | None = None


@dataclass
class BatchItem:
    """One output to make: a line at one seed."""

    line: int
    seed: int
    out: Path
    fields: dict
    error: str | None = None
    status: str = "pending"  # pending | ok | skipped | invalid (refused before loading) | failed (while running)

    def to_dict(self) -> dict:
        d = {"line": self.line, "seed": self.seed, "output": str(self.out), "status": self.status}
        if self.error:
            d["error"] = self.error
        return d


def read_prompt_file(path: Path, task: str) -> list[BatchLine]:
    """The entries of `path` (see the module docstring); unreadable files raise, bad lines do not."""
    path = Path(path)
    if not path.is_file():
        raise LanceUsageError(f"--prompt-file {path}: file not found")
    raw = path.read_bytes()
    if len(raw) > MAX_FILE_BYTES:
        raise LanceUsageError(f"--prompt-file {path}: {len(raw):,} bytes, more than the {MAX_FILE_BYTES:,} allowed")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LanceUsageError(f"--prompt-file {path}: not UTF-8 text (byte {e.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        lines = _upstream_json(text, path, task)
    elif suffix == ".jsonl":
        lines = _jsonl(text, path, task)
    else:
        key = "question" if task in UNDERSTANDING_TASKS else "prompt"
        lines = [BatchLine(i, {key: s.strip()}) for i, s in enumerate(text.splitlines(), 1)
                 if s.strip() and not s.lstrip().startswith("#")]
    if not lines:
        raise LanceUsageError(f"--prompt-file {path}: no prompts in it")
    if len(lines) > MAX_ITEMS:
        raise LanceUsageError(f"--prompt-file {path}: {len(lines):,} entries, more than the {MAX_ITEMS:,} allowed")
    return lines


def _jsonl(text: str, path: Path, task: str) -> list[BatchLine]:
    out = []
    for i, s in enumerate(text.splitlines(), 1):
        if not s.strip():
            continue
        line = BatchLine(i)
        try:
            obj = jsonio.loads(s, f"line {i}", max_bytes=MAX_FILE_BYTES, error=LanceUsageError)
            line.fields, line.name = _overrides(obj, path.parent)
        except LanceUsageError as e:
            line.error = str(e).removeprefix(f"line {i}: ")
        out.append(line)
    return out


def _overrides(obj, base: Path) -> tuple[dict, str | None]:
    """Check one JSONL object's keys and types; media paths resolved against `base`."""
    if not isinstance(obj, dict):
        raise LanceUsageError(f"expected a JSON object, got {type(obj).__name__}")
    fields = {}
    for k, v in obj.items():
        if k not in OVERRIDES:
            raise LanceUsageError(f"unknown key {k!r}; allowed: {', '.join(OVERRIDES)}")
        if v is None:
            continue
        if k in INTS:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif k in FLOATS:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        else:
            ok = isinstance(v, str)
        if not ok:
            kind = "an integer" if k in INTS else "a number" if k in FLOATS else "a string"
            raise LanceUsageError(f"{k}: expected {kind}, got {show(v)}")
        fields[k] = base / v if k in PATHS else v
    name = fields.pop("out", None)
    if name is not None and (Path(name).name != name or name in (".", "..")):
        raise LanceUsageError(f"out {name!r}: expected a plain file name (outputs go in the --out folder)")
    return fields, name


def _upstream_json(text: str, path: Path, task: str) -> list[BatchLine]:
    """Upstream's example file: {name: caption} or {name: {interleave_array, element_dtype_array}}."""
    doc = jsonio.loads(text, f"--prompt-file {path}", max_bytes=MAX_FILE_BYTES, error=LanceUsageError)
    if not isinstance(doc, dict):
        raise LanceUsageError(f"--prompt-file {path}: expected an object of output name -> prompt "
                              f"(upstream's example format), got {type(doc).__name__}; one object per line is .jsonl")
    key = "question" if task in UNDERSTANDING_TASKS else "prompt"
    out = []
    for i, (name, entry) in enumerate(doc.items(), 1):
        line = BatchLine(i, name=Path(str(name)).stem or None)
        if isinstance(entry, str):
            line.fields = {key: entry}
        elif isinstance(entry, dict) and isinstance(entry.get("interleave_array"), list):
            try:
                line.fields = _interleave(entry, path.parent, task)
            except LanceUsageError as e:
                line.error = f"{name!r}: {e}"
        else:
            line.error = f"{name!r}: expected a caption string or an object with interleave_array"
        out.append(line)
    return out


def _interleave(entry: dict, base: Path, task: str) -> dict:
    values, kinds = entry["interleave_array"], entry.get("element_dtype_array")
    if not isinstance(kinds, list) or len(kinds) != len(values):
        raise LanceUsageError("element_dtype_array must list one type per interleave_array element")
    fields: dict = {}
    for v, kind in zip(values, kinds):
        if kind == "text" and isinstance(v, str):
            fields["question" if task in UNDERSTANDING_TASKS else "prompt"] = v
        elif kind == "text" and isinstance(v, list) and len(v) >= 2 and all(isinstance(x, str) for x in v[:2]):
            fields["system"], fields["question"] = v[0], v[1]  # x2t: [system, question, answer]
        elif kind in PATHS and isinstance(v, str):
            fields[kind] = base / v
        else:
            raise LanceUsageError(f"element of type {kind!r} not understood ({str(v)[:60]!r})")
    return fields


def parse_seeds(text: str) -> list[int]:
    """`--seeds 1,2,3` as a list of distinct seeds in the model's range."""
    seeds = []
    for part in text.split(","):
        try:
            seed = int(part.strip())
        except ValueError:
            raise LanceUsageError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
        seeds.append(limits.integer("--seeds", seed, 0, limits.MAX_SEED, "a seed"))
    if len(set(seeds)) != len(seeds):
        raise LanceUsageError(f"--seeds {text!r}: a seed is repeated (it would make the same output twice)")
    return seeds


def sweep(base: int, seeds: str | None, num_images: int | None) -> list[int]:
    """The seeds of each prompt: `--seeds`, or `--num-images N` counting up from `--seed`, or `--seed`."""
    if seeds is not None and num_images is not None:
        raise LanceUsageError("--seeds and --num-images both pick the seeds; give one")
    if seeds is not None:
        return parse_seeds(seeds)
    if num_images is not None:
        n = limits.integer("--num-images", num_images, 1, 10_000, "an image count")
        if base + n - 1 > limits.MAX_SEED:
            raise LanceUsageError(f"--num-images {n} from --seed {base} passes the largest seed {limits.MAX_SEED}")
        return list(range(base, base + n))
    return [base]


def expand(task: str, lines: list[BatchLine], seeds: list[int], out_dir: Path, frames: int | None) -> list[BatchItem]:
    """One item per line and seed. A line's own `seed` replaces the sweep. Names: the line's
    `out` (or upstream key) when it makes one output, else `<stem>-s<seed>`; unnamed lines use
    `<task>-<line:04d>` (x2t names carry no seed). Two items with one name: the later one is an error."""
    items, taken = [], {}
    for line in lines:
        line_seeds = [line.fields["seed"]] if "seed" in line.fields else seeds
        greedy = task in UNDERSTANDING_TASKS  # x2t decodes greedily: the seed changes nothing, names omit it
        suffix = "." + output_extension(task, line.fields.get("frames", frames))
        given = Path(line.name).suffix.lower() if line.name else ""
        error = line.error or (f"out {line.name!r}: {task} writes {suffix} files here"
                               if given and given != suffix else None)
        for seed in line_seeds:
            if line.name and len(line_seeds) == 1:
                name = line.name if given else line.name + suffix
            else:
                stem = Path(line.name).stem if line.name else f"{task}-{line.number:04d}"
                name = f"{stem}{'' if greedy else f'-s{seed}'}{suffix}"
            item = BatchItem(line.number, seed, out_dir / name, {**line.fields, "seed": seed}, error)
            if item.error is None and name in taken:
                item.error = f"output {name} is also line {taken[name]}'s"
            taken.setdefault(name, line.number)
            items.append(item)
    return items


def mark_done(items: list[BatchItem]) -> int:
    """Resume: items whose output already exists are `skipped` (writes are atomic, so a file that
    exists is complete). Returns how many."""
    n = 0
    for it in items:
        if it.error is None and it.out.is_file() and it.out.stat().st_size > 0:
            it.status, n = "skipped", n + 1
    return n
