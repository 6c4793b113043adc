"""Prompt files: the three formats, per-line errors, seed sweeps and output names (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.pipeline.batch import (
    expand,
    mark_done,
    parse_seeds,
    read_prompt_file,
    sweep,
)


def test_upstream_example_json_with_interleave_entries(tmp_path):
    pf = tmp_path / "edit.json"
    pf.write_text(json.dumps({
        "0001": {"interleave_array": ["Add snow.", "media/a.png"], "element_dtype_array": ["text", "image"],
                 "istarget_in_interleave": [0, 0]},
        "0002": {"interleave_array": ["Make it night."], "element_dtype_array": ["text", "video"]},
    }))
    a, b = read_prompt_file(pf, "image_edit")
    assert a.fields == {"prompt": "Add snow.", "image": tmp_path / "media/a.png"} and a.name == "0001"
    assert b.error and "one type per interleave_array element" in b.error

    pf.write_text(json.dumps({"0001": {"interleave_array": ["m.png", ["sys", "What colour?", "Red."]],
                                        "element_dtype_array": ["image", "text"]}}))
    (x,) = read_prompt_file(pf, "x2t_image")
    assert x.fields == {"image": tmp_path / "m.png", "system": "sys", "question": "What colour?"}


def test_jsonl_checks_keys_and_types_per_line(tmp_path):
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"prompt": "a", "seed": 1.5}\n{"prompt": "b", "out": "../x.png"}\n[1]\n{"prompt": "c", "cfg": 2}\n')
    lines = read_prompt_file(pf, "t2i")
    assert [ln.number for ln in lines] == [1, 2, 3, 4]
    assert "seed: expected an integer" in lines[0].error
    assert "expected a plain file name" in lines[1].error
    assert "expected a JSON object" in lines[2].error
    assert lines[3].error is None and lines[3].fields == {"prompt": "c", "cfg": 2}


def test_text_lines_fill_the_task_text(tmp_path):
    pf = tmp_path / "q.txt"
    pf.write_text("What is it?\n\n# skipped\nHow many?\n")
    lines = read_prompt_file(pf, "x2t_image")
    assert [(ln.number, ln.fields) for ln in lines] == [(1, {"question": "What is it?"}), (4, {"question": "How many?"})]
    assert [it.out.name for it in expand("x2t_image", lines, [42], Path("o"), None)] == ["x2t_image-0001.txt",
                                                                                      "x2t_image-0004.txt"]
    empty = tmp_path / "e.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(LanceUsageError, match="no prompts in it"):
        read_prompt_file(empty, "t2i")
    with pytest.raises(LanceUsageError, match="file not found"):
        read_prompt_file(tmp_path / "missing.txt", "t2i")


def test_seeds_and_names(tmp_path):
    assert parse_seeds("3, 1,2") == [3, 1, 2]
    assert sweep(10, None, 3) == [10, 11, 12] and sweep(10, None, None) == [10]
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"prompt": "a", "out": "boat.png"}\n{"prompt": "b", "seed": 9}\n{"prompt": "c", "out": "boat"}\n'
                  '{"prompt": "d", "frames": 1}\n')
    items = expand("t2v", read_prompt_file(pf, "t2v"), [1, 2], Path("o"), None)
    names = [(it.line, it.out.name, it.error) for it in items]
    assert names[:3] == [(1, "boat-s1.mp4", "out 'boat.png': t2v writes .mp4 files here"),
                         (1, "boat-s2.mp4", "out 'boat.png': t2v writes .mp4 files here"), (2, "t2v-0002-s9.mp4", None)]
    # line 1's bad suffix, then line 3 takes the same stems; line 4 makes stills
    assert [n for _, n, _ in names[3:]] == ["boat-s1.mp4", "boat-s2.mp4", "t2v-0004-s1.png", "t2v-0004-s2.png"]
    assert "also line 1's" in items[3].error


def test_resume_marks_existing_outputs(tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("a\nb\n")
    items = expand("t2i", read_prompt_file(pf, "t2i"), [4], tmp_path, None)
    items[0].out.write_bytes(b"png")
    assert mark_done(items) == 1 and [it.status for it in items] == ["skipped", "pending"]
