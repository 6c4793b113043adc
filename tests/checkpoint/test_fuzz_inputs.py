"""Fuzz corpus: mutated safetensors headers, artifact manifests, llm/ViT configs and recipes, each
run through a real entry point with a time limit. Every case must end as a clean one-line error
(exit 2) or be accepted when benign: never a traceback, a multi-line or exit-1 error, or a hang.

Deterministic: ``random.Random(SEED)`` drives a mutator of type swaps, nulls, negatives, huge ints,
deep nesting, truncation, duplicate keys, unknown keys, dtype relabels and offset shifts. The
default corpus prints its counts (run with ``-s`` to see them); the slow one is ten times larger.

    .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/checkpoint/test_fuzz_inputs.py
"""

from __future__ import annotations

import copy
import json
import random
import signal
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from input_cases import (
    ckpt,
    download_copy,
    join_safetensors,
    model_copy,
    one_line_error,
    quantized_artifact,
    run_cli,
    split_safetensors,
)

from lance_deploy.core.errors import LanceError, LanceUsageError

SEED = 15
CASE_SECONDS = 30  # a hang, not a slow case: the slowest clean case takes well under a second
DEEP, BIG, DUP = "__DEEP__", "__BIG__", "__DUP_KEY__"
VALUES = [None, True, False, "", "x", -1, 0, 1, 2**63, 10**30, 1.5, -0.0, [], {}, [1, 2], {"a": 1},
          "../../etc/passwd", "config.json", "/tmp/x", "F32", "I32", [0, 8], [[1]], "1e-6", "64"]
TAGS = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U32", "X9", ""]


class _Hang(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` in the code under test eats it."""


@contextmanager
def _time_limit(seconds: float):
    def alarm(*_):
        raise _Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- the mutator -------------------------------------------------------------------------------------

def _nodes(doc, path=()):
    yield path
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in children:
        yield from _nodes(v, path + (k,))


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


class Mutator:
    """1-3 mutations of a JSON-like document, then its text (with text-level ones applied)."""

    def __init__(self, rng: random.Random, extra_ops=()):
        self.rng, self.extra = rng, list(extra_ops)

    def _pick(self, doc, want=None):
        paths = [p for p in _nodes(doc) if want is None or isinstance(_get(doc, p), want)]
        return self.rng.choice(paths) if paths else None

    def _set(self, doc, path, value):
        if not path:
            return value
        _get(doc, path[:-1])[path[-1]] = value
        return doc

    def apply(self, doc, op: str):
        rng = self.rng
        if op in ("type", "null", "deep", "big"):
            path = self._pick(doc)
            value = {"type": lambda: copy.deepcopy(rng.choice(VALUES)), "null": lambda: None,
                     "deep": lambda: DEEP, "big": lambda: BIG}[op]()
            return self._set(doc, path, value)
        if op in ("negative", "huge", "shift"):
            path = self._pick(doc, (int, float))
            if path is None:
                return doc
            v = _get(doc, path)
            new = {"negative": -abs(v) - 1, "huge": rng.choice([2**31, 2**63, 10**18, 10**300]),
                   "shift": v + rng.choice([-8, -1, 1, 2, 8, 4096])}[op]
            return self._set(doc, path, new)
        if op in ("delete", "unknown", "duplicate"):
            path = self._pick(doc, (dict, list))
            node = _get(doc, path) if path is not None else None
            if not node:
                return doc
            if op == "delete":
                node.pop(rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node)))
            elif op == "unknown" and isinstance(node, dict):
                node["zz_unknown"] = rng.choice(VALUES)
            elif op == "unknown":
                node.append(copy.deepcopy(rng.choice(node)))  # a duplicated record
            elif isinstance(node, dict):
                node[DUP] = rng.choice(VALUES)
                self._dup_of = rng.choice([k for k in node if k != DUP])
            return doc
        if op == "string":
            path = self._pick(doc, str)
            if path is not None:
                doc = self._set(doc, path, rng.choice(["", _get(doc, path) + "x", "../" + _get(doc, path), "a" * 300]))
            return doc
        return doc

    def text(self, doc, ops) -> tuple[bytes, list[str]]:
        doc, self._dup_of, done = copy.deepcopy(doc), None, []
        for _ in range(self.rng.choice([1, 1, 2, 3])):
            op = self.rng.choice(ops)
            done.append(op)
            doc = self.apply(doc, op)
        text = json.dumps(doc)
        text = text.replace(json.dumps(DEEP), "[" * 50_000 + "]" * 50_000).replace(json.dumps(BIG), "9" * 5000)
        if self._dup_of is not None:
            text = text.replace(json.dumps(DUP), json.dumps(self._dup_of), 1)
        if self.rng.random() < 0.12:
            text = text[:self.rng.randrange(len(text))]
            done.append("truncate")
        return text.encode(), done


VALUE_OPS = ["type", "null", "negative", "huge", "shift", "delete", "unknown", "duplicate", "string", "deep", "big"]


# --- running one case ------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.counts: Counter = Counter()
        self.bad: list[str] = []

    def record(self, family: str, outcome: str, detail: str) -> None:
        self.counts[outcome] += 1
        self.counts[(family, outcome)] += 1
        if outcome not in ("clean", "benign"):
            self.bad.append(f"{family} {outcome}: {detail[:600]}")

    def cli(self, family: str, args: list, ops) -> None:
        try:
            with _time_limit(CASE_SECONDS):
                code, err, exc = run_cli(args)
        except _Hang:
            return self.record(family, "hang", f"{ops} {args}")
        if exc is not None:
            return self.record(family, "traceback", f"{ops} {type(exc).__name__}: {exc}")
        if code == 0:
            return self.record(family, "benign", "")
        ok = code == 2 and one_line_error(err) is not None
        self.record(family, "clean" if ok else "unclean", f"{ops} exit {code}: {err}")

    def call(self, family: str, fn, ops) -> None:
        try:
            with _time_limit(CASE_SECONDS):
                fn()
        except _Hang:
            return self.record(family, "hang", str(ops))
        except LanceUsageError as e:
            return self.record(family, "clean" if "\n" not in str(e) else "unclean", f"{ops} {e}")
        except LanceError as e:
            return self.record(family, "unclean", f"{ops} exit {e.exit_code}: {e}")
        except Exception as e:  # noqa: BLE001 - exactly what the corpus hunts for
            return self.record(family, "traceback", f"{ops} {type(e).__name__}: {e}")
        self.record(family, "benign", "")


# --- the families ----------------------------------------------------------------------------------

def _header_cases(t: Tally, rng: random.Random, n: int, root: Path) -> None:
    from lance_deploy.checkpoint.layout import discover
    from lance_deploy.pipeline.components import load_lm
    from lance_deploy.pipeline.tasks import SPECS

    d = model_copy(root / "hdr", replace=("model.safetensors",))
    header, data = split_safetensors(ckpt() / "Lance_3B" / "model.safetensors")
    m = Mutator(rng)

    def relabel(h):
        name = rng.choice([k for k in h if k != "__metadata__"])
        h[name]["dtype"] = rng.choice(TAGS)
        return h

    def offsets(h):
        name = rng.choice([k for k in h if k != "__metadata__"])
        h[name]["data_offsets"][rng.randrange(2)] += rng.choice([-4, -1, 1, 4, 64])
        return h

    for _ in range(n):
        kind = rng.random()
        if kind < 0.25:
            h = (relabel if rng.random() < 0.5 else offsets)(copy.deepcopy(header))
            text, ops = json.dumps(h).encode(), ["relabel/offsets"]
        else:
            text, ops = m.text(header, VALUE_OPS)
        length, body = None, data
        if rng.random() < 0.15:
            pad = len(text) + (-len(text) % 8)
            length = rng.choice([pad - 1, pad + 1, pad - 8, 0, 2**40, 2**64 - 1])
            ops.append(f"length {length}")
        if rng.random() < 0.08:
            body = data[:rng.randrange(len(data))]
            ops.append("truncated data")
        (d / "model.safetensors").write_bytes(join_safetensors(text, body, length))
        t.cli("header", ["inspect", d, "--json"], ops)
        t.call("header", lambda: load_lm(discover(d), discover(d).config(), SPECS["t2i"], torch.float32, "cpu"), ops)


def _manifest_cases(t: Tally, rng: random.Random, n: int, root: Path) -> None:
    from lance_deploy.artifact.reader import ArtifactReader

    art = quantized_artifact(root / "art")
    base = json.loads((art / "manifest.json").read_text())
    m = Mutator(rng)

    def open_and_verify():
        with ArtifactReader(art) as r:
            r.verify()

    for _ in range(n):
        text, ops = m.text(base, VALUE_OPS)
        (art / "manifest.json").write_bytes(text)
        t.cli("manifest", ["memory-plan", "--model", art, "--task", "t2i", "--gpu-memory", "16GiB"], ops)
        t.call("manifest", open_and_verify, ops)


def _config_cases(t: Tally, rng: random.Random, n_llm: int, n_vit: int, root: Path) -> None:
    m = Mutator(rng)
    dl = download_copy(root / "dl")  # with the ViT and VAE beside it, a benign config plans fine
    llm = dl / "Lance_3B" / "llm_config.json"
    llm.unlink()
    base = json.loads((ckpt() / "Lance_3B" / "llm_config.json").read_text())
    for _ in range(n_llm):
        text, ops = m.text(base, VALUE_OPS)
        llm.write_bytes(text)
        t.cli("llm_config", ["memory-plan", "--model", dl, "--task", "t2i", "--gpu-memory", "16GiB"], ops)
    llm.write_text(json.dumps(base))
    cfg = dl / "Qwen2.5-VL-ViT" / "config.json"
    base = json.loads(cfg.read_text())
    for _ in range(n_vit):
        text, ops = m.text(base, VALUE_OPS)
        cfg.write_bytes(text)
        t.cli("vit_config", ["memory-plan", "--model", dl, "--task", "x2t_image", "--gpu-memory", "16GiB"], ops)


def _recipe_cases(t: Tally, rng: random.Random, n: int, root: Path) -> None:
    from lance_deploy.quant.recipe import RECIPES_DIR

    bases = [yaml.safe_load(p.read_text()) for p in sorted(RECIPES_DIR.glob("*.yaml"))]
    m = Mutator(rng)
    path = root / "recipe.yaml"
    for _ in range(n):
        text, ops = m.text(rng.choice(bases), VALUE_OPS)  # JSON text is YAML
        path.write_bytes(text)
        t.cli("recipe", ["plan", ckpt() / "Lance_3B", "--recipe", path, "--json"], ops)


def _run_corpus(root: Path, seed: int, scale: int) -> Tally:
    t, rng = Tally(), random.Random(seed)
    _header_cases(t, rng, 60 * scale, root)
    _manifest_cases(t, rng, 50 * scale, root)
    _config_cases(t, rng, 40 * scale, 30 * scale, root)
    _recipe_cases(t, rng, 40 * scale, root)
    return t


def _report(t: Tally, capsys, label: str) -> None:
    c = t.counts
    cases = sum(v for k, v in c.items() if isinstance(k, str))
    families = sorted({k[0] for k in c if isinstance(k, tuple)})
    per = "; ".join(f"{f}: {c[(f, 'clean')]} clean / {c[(f, 'benign')]} benign" for f in families)
    with capsys.disabled():
        print(f"\n{label}: {cases} cases, {c['clean']} clean errors, {c['benign']} benign accepts, "
              f"{c['traceback']} tracebacks, {c['hang']} hangs, {c['unclean']} unclean errors ({per})")
    assert not t.bad, f"{len(t.bad)} bad cases:\n" + "\n".join(t.bad[:15])
    assert cases >= 300 and all(c[(f, "clean")] for f in families), c


def test_fuzz_corpus(tmp_path, capsys):
    _report(_run_corpus(tmp_path, SEED, 1), capsys, "fuzz corpus")


@pytest.mark.slow
def test_fuzz_corpus_large(tmp_path, capsys):
    _report(_run_corpus(tmp_path, SEED + 1, 10), capsys, "fuzz corpus (large)")
