"""An export folder's manifest.json is parsed as strictly as the artifact's: exactly what
`save_graph` / `write_manifest` write, typed, each graph named once, paths inside the folder."""

from __future__ import annotations

import json

import pytest

from lance_deploy.artifact.graph_manifest import GraphEntry, Manifest, TensorSpec, load_manifest, write_manifest
from lance_deploy.core.errors import LanceUsageError

H = "ab" * 32


def _write(root) -> dict:
    entry = GraphEntry(name="und-layer.00", part="und-layer", preset="image_256res", file="graphs/und-layer.00.onnx",
                       external_data=["graphs/und-layer.00.onnx.data"],
                       sha256={"graphs/und-layer.00.onnx": H, "graphs/und-layer.00.onnx.data": H},
                       inputs=[TensorSpec("x", "float32", ["tokens", 64])], outputs=[TensorSpec("y", "float32", ["tokens", 64])],
                       profiles={"tokens": [1, 256, 4096]}, meta={"layer": 0})
    write_manifest(root, Manifest(producer={"name": "lance-deploy"}, source={}, request={}, parts=[entry]))
    return json.loads((root / "manifest.json").read_text())


CASES = {
    "schema true": (lambda m: m.update(schema_version=True), "schema_version True is not supported (expected 1)"),
    "unknown": (lambda m: m["parts"][0].update(extra=1), "parts[0]: unknown field 'extra'; fields: name, part"),
    "missing": (lambda m: m["parts"][0].pop("meta"), "parts[0]: missing field 'meta'"),
    "sha keys": (lambda m: m["parts"][0]["sha256"].pop("graphs/und-layer.00.onnx.data"),
                 "parts[0].sha256: must hash exactly the graph's files"),
    "sha hex": (lambda m: m["parts"][0]["sha256"].update({"graphs/und-layer.00.onnx": "x"}),
                "parts[0].sha256.graphs/und-layer.00.onnx: expected 64 lower-case hex digits, got 'x'"),
    "profile": (lambda m: m["parts"][0]["profiles"].update(tokens=[8, 4, 2]),
                "parts[0].profiles.tokens: expected min <= opt <= max, got [8, 4, 2]"),
    "profile type": (lambda m: m["parts"][0]["profiles"].update(tokens="1-4096"),
                     "parts[0].profiles.tokens: expected a list of 3 integers, got '1-4096'"),
    "shape null": (lambda m: m["parts"][0]["inputs"][0]["shape"].append(None),
                   "parts[0].inputs[0].shape[2]: expected a size >= 0 or an axis name, got None"),
    "dtype": (lambda m: m["parts"][0]["outputs"][0].update(dtype=["float32"]),
              "parts[0].outputs[0].dtype: expected a numpy dtype name such as 'float32', got ['float32']"),
    "twice": (lambda m: m["parts"].append(m["parts"][0]), "parts[1].name: parts[0] already names graph 'und-layer.00'"),
    "parts": (lambda m: m.update(parts={"a": 1}), "parts: expected a list of graph entries, got {'a': 1}"),
    "outside": (lambda m: m["parts"][0].update(file="/etc/passwd"),
                "parts[0].file: path '/etc/passwd' must be relative and stay inside the folder"),
    "nesting": (lambda m: m["parts"][0]["meta"].update(x=json.loads("[" * 40 + "]" * 40)),
                "JSON nested deeper than 32 levels"),
}


def test_the_writer_output_round_trips(tmp_path):
    _write(tmp_path)
    m = load_manifest(tmp_path)
    assert m.entry("und-layer.00").profiles == {"tokens": [1, 256, 4096]}
    assert m.entry("und-layer.00").inputs[0].dynamic_axes == {0: "tokens"}


@pytest.mark.parametrize("case", CASES)
def test_graph_manifest_is_strict(tmp_path, case):
    fn, needle = CASES[case]
    m = _write(tmp_path)
    fn(m)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LanceUsageError) as e:
        load_manifest(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'manifest.json'}: "), msg
    assert needle in msg, (needle, msg)
