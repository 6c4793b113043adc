"""A seeded fuzz corpus over every file a user hands us: llm/ViT configs, safetensors headers,
artifact manifests and recipes.

Each case mutates one seed file, runs the real command on it in-process, and must end within its
time limit in exit 0 (a benign mutation) or exit 2 with one "Error: ..." line: never a traceback,
never a hang. The default run is a few hundred cases; LANCE_FUZZ_CASES scales it (the slow test).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from input_cases import ckpt, join_safetensors, model_copy, one_line_error, quantized_artifact, run_cli, split_safetensors

CASE_SECONDS = 20
ODD_VALUES = [None, True, "x", "", -1, 0, 1.5, 1e9, 10**12, -(10**12), [], {}, [1, 2], {"a": 1}, float("nan")]


def _deep(depth: int):
    v: object = 0
    for _ in range(depth):
        v = [v]
    return v


def _mutate_value(rng: random.Random, value):
    choice = rng.random()
    if choice < 0.6:
        return rng.choice(ODD_VALUES)
    if choice < 0.7:
        return _deep(rng.choice((50, 600)))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return rng.choice((value * 1000, -value, value + 1, int(value) // 7 if value else 3))
    if isinstance(value, str):
        return rng.choice((value[::-1], value.upper(), value + "x", "I32", "U8"))
    return rng.choice(ODD_VALUES)


def _mutate_mapping(rng: random.Random, doc: dict) -> dict:
    """Replace, delete or add one field somewhere in a JSON document (one level of nesting)."""
    doc = copy.deepcopy(doc)
    target = doc
    nested = [k for k, v in doc.items() if isinstance(v, dict) and v]
    if nested and rng.random() < 0.3:
        target = doc[rng.choice(nested)]
    keys = list(target)
    op = rng.random()
    if op < 0.75 and keys:
        k = rng.choice(keys)
        target[k] = _mutate_value(rng, target[k])
    elif op < 0.9 and keys:
        del target[rng.choice(keys)]
    else:
        target[f"unknown_{rng.randrange(100)}"] = rng.choice(ODD_VALUES)
    return doc


def _whole_document(rng: random.Random) -> bytes:
    return rng.choice([b"", b"[]", b"null", b'"text"', b"{", b"{\"a\": }", b"[" * 100000 + b"0" + b"]" * 100000,
                       b"\xff\xfe", b"1e999"])


class Corpus:
    """Counts outcomes; a traceback or a hang is recorded with the case that caused it."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.failures: list[str] = []

    def run(self, name: str, args: list) -> None:
        def timeout(signum, frame):
            raise TimeoutError(name)

        old = signal.signal(signal.SIGALRM, timeout)
        signal.alarm(CASE_SECONDS)
        start = time.perf_counter()
        try:
            code, err, exc = run_cli(args)
        except TimeoutError:
            self.counts["hangs"] += 1
            self.failures.append(f"{name}: no answer in {CASE_SECONDS} s")
            return
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        self.counts["cases"] += 1
        if isinstance(exc, TimeoutError):
            self.counts["hangs"] += 1
            self.failures.append(f"{name}: no answer in {CASE_SECONDS} s")
        elif exc is not None or "Traceback" in err:
            self.counts["tracebacks"] += 1
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}" if exc else f"{name}: {err[-300:]}")
        elif code == 0:
            self.counts["benign accepts"] += 1
        elif code == 2 and one_line_error(err):
            self.counts["clean errors"] += 1
        else:
            self.counts["other exits"] += 1
            self.failures.append(f"{name}: exit {code}: {err.strip()[-300:]}")
        self.counts["seconds"] += time.perf_counter() - start

    def report(self) -> str:
        c = self.counts
        return (f"fuzz corpus: {c['cases']} cases, {c['clean errors']} clean errors, {c['benign accepts']} benign "
                f"accepts, {c['tracebacks']} tracebacks, {c['hangs']} hangs, {c['other exits']} other exits, "
                f"{c['seconds']:.1f} s")


def _configs(corpus: Corpus, rng: random.Random, root: Path, n: int) -> None:
    model = model_copy(root / "cfg", replace=("llm_config.json",))
    seed = json.loads((model / "llm_config.json").read_text())
    for i in range(n):
        text = _whole_document(rng) if rng.random() < 0.1 else json.dumps(_mutate_mapping(rng, seed)).encode()
        (model / "llm_config.json").write_bytes(text)
        corpus.run(f"llm_config #{i}", ["inspect", model])


def _headers(corpus: Corpus, rng: random.Random, root: Path, n: int) -> None:
    model = model_copy(root / "hdr", replace=("model.safetensors",))
    path = model / "model.safetensors"
    header, data = split_safetensors(path)
    names = [k for k in header if k != "__metadata__"]
    for i in range(n):
        h = copy.deepcopy(header)
        length = None
        op = rng.random()
        if op < 0.15:
            text = json.dumps(h).encode()
            length = len(text) + (-len(text) % 8) + rng.choice((-1, 1, -8, 8, 10**9))
        elif op < 0.25:
            text = _whole_document(rng)
        else:
            entry = h[rng.choice(names)]
            field = rng.choice(("dtype", "shape", "data_offsets"))
            if field == "dtype" and rng.random() < 0.5:
                entry["dtype"] = rng.choice(("I32", "U32", "F16", "F64", "U8", "BOOL", "XX"))
            elif field == "data_offsets" and rng.random() < 0.5:
                a, b = entry["data_offsets"]
                entry["data_offsets"] = rng.choice(([a + 1, b + 1], [b, a], [a, b - 4], [a - 4, b], [0, b]))
            else:
                entry[field] = _mutate_value(rng, entry[field])
            text = json.dumps(h).encode()
        path.write_bytes(join_safetensors(text, data, length))
        corpus.run(f"safetensors header #{i}", ["inspect", model])


def _manifests(corpus: Corpus, rng: random.Random, root: Path, n: int) -> None:
    sealed = quantized_artifact(root / "art-seed", "int8-rtn")
    art = root / "art"
    shutil.copytree(sealed, art)
    seed = json.loads((sealed / "manifest.json").read_text())
    for i in range(n):
        doc = copy.deepcopy(seed)
        op = rng.random()
        if op < 0.1:
            (art / "manifest.json").write_bytes(_whole_document(rng))
        else:
            if op < 0.55 and doc.get("tensors"):
                j = rng.randrange(len(doc["tensors"]))
                doc["tensors"][j] = _mutate_mapping(rng, doc["tensors"][j])
            elif op < 0.65 and doc.get("tensors"):
                doc["tensors"].append(copy.deepcopy(rng.choice(doc["tensors"])))  # a duplicate record
            else:
                doc = _mutate_mapping(rng, doc)
            (art / "manifest.json").write_text(json.dumps(doc))
        args = rng.choice((["inspect", art], ["memory-plan", "--model", art, "--task", "t2i", "--gpu-memory", "4GiB"]))
        corpus.run(f"manifest #{i} ({args[0]})", args)




def _recipes(corpus: Corpus, rng: random.Random, root: Path, n: int) -> None:
    import yaml

    model = root / "cfg"  # the config corpus's folder, its config restored
    shutil.copyfile(ckpt() / "Lance_3B" / "llm_config.json", model / "llm_config.json")
    seed = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "int8-rtn.yaml").read_text())
    path = root / "recipe.yaml"
    for i in range(n):
        op = rng.random()
        if op < 0.15:
            path.write_text(rng.choice(("rules: [", "!!python/object:os.system {}", "a: b: c", "\t- x", "{{{",
                                        "name: [1, 2", "default: !!binary AAAA")))
        else:
            doc = copy.deepcopy(seed)
            if op < 0.6:
                j = rng.randrange(len(doc["rules"]))
                doc["rules"][j] = _mutate_mapping(rng, doc["rules"][j])
            else:
                doc = _mutate_mapping(rng, doc)
            path.write_text(json.dumps(doc))  # JSON is YAML, and it writes deep nesting
        corpus.run(f"recipe #{i}", ["plan", model, "--recipe", path])


def _corpus(tmp_path: Path, per_kind: int) -> Corpus:
    corpus, rng = Corpus(), random.Random(20261202)
    _configs(corpus, rng, tmp_path, per_kind)
    _headers(corpus, rng, tmp_path, per_kind)
    _manifests(corpus, rng, tmp_path, per_kind)
    _recipes(corpus, rng, tmp_path, per_kind)
    return corpus


def test_fuzz_corpus_gives_clean_errors(tmp_path):
    corpus = _corpus(tmp_path, 80)
    print(corpus.report())
    assert corpus.counts["cases"] >= 300
    assert not corpus.failures, corpus.report() + "\n" + "\n".join(corpus.failures[:25])
    assert corpus.counts["clean errors"] > corpus.counts["cases"] // 3  # the mutations really reach the checks


@pytest.mark.slow
def test_fuzz_corpus_large(tmp_path):
    corpus = _corpus(tmp_path, int(os.environ.get("LANCE_FUZZ_CASES", "500")))
    print(corpus.report())
    assert not corpus.failures, corpus.report() + "\n" + "\n".join(corpus.failures[:25])
