"""The shipped prompt sets in calibration/ and their loader."""

from __future__ import annotations

import json
import re

import pytest

from lance_deploy.calibrate.prompt_sets import (
    FIELDS,
    MEDIA_SOURCE,
    load_prompt_set,
    media_source_index,
    normalized,
    select,
    set_path,
)
from lance_deploy.core.errors import LanceUsageError

TASKS = list(FIELDS)


def _texts(task: str, split: str) -> list[str]:
    return [e[FIELDS[task]] for e in load_prompt_set(task, split=split)]


@pytest.mark.parametrize("task", TASKS)
def test_counts_and_field(task):
    calib, held = load_prompt_set(task), load_prompt_set(task, split="heldout")
    assert len(calib) >= 64 and len(held) >= 16
    assert all(list(e) == [FIELDS[task]] for e in calib + held)


@pytest.mark.parametrize("task", TASKS)
def test_no_duplicates_and_no_overlap(task):
    calib = [normalized(t) for t in _texts(task, "calib")]
    held = [normalized(t) for t in _texts(task, "heldout")]
    assert len(set(calib)) == len(calib) and len(set(held)) == len(held)
    assert not set(calib) & set(held)
    # Nor reworded copies: word-set Jaccard below 0.7 against every calibration entry. (Short
    # questions legitimately share "what is the main subject"-style frames, so not stricter.)
    for h in held:
        hw = set(h.split())
        best = max(len(hw & set(c.split())) / len(hw | set(c.split())) for c in calib)
        assert best < 0.7, h


def test_generation_sets_cover_the_hard_cases():
    """t2i exercises text rendering, counting and spatial relations; t2v names motion or camera work."""
    t2i = _texts("t2i", "calib")
    assert sum('"' in p for p in t2i) >= 8  # quoted text to render
    counts = r"\b(two|three|four|five|six|seven|eight|exactly)\b"
    assert sum(bool(re.search(counts, p, re.IGNORECASE)) for p in t2i) >= 10
    spatial = r"\b(left|right|behind|between|above|beneath|below|on top of|next to)\b"
    assert sum(bool(re.search(spatial, p, re.IGNORECASE)) for p in t2i) >= 10
    motion = (r"\b(camera|pan|pans|tilt|tilting|dolly|push-in|orbit|tracking|zoom|zooming|drone|time-lapse|"
              r"slow motion|slow-motion|stop-motion|handheld|static|locked-off|shot|close-up|rack focus|view|filmed|"
              r"follow|following|pulling back|rising)\b")
    for split in ("calib", "heldout"):
        assert all(re.search(motion, p, re.IGNORECASE) for p in _texts("t2v", split))


def test_media_sources_have_sets():
    for source in MEDIA_SOURCE.values():
        assert FIELDS[source] == "prompt" and source in ("t2i", "t2v")
        n = len(load_prompt_set(source))
        assert [media_source_index(i, n) for i in (0, n - 1, n)] == [0, n - 1, 0]


def test_select_is_deterministic_nested_and_ordered():
    prompts = load_prompt_set("t2i")
    a, b = select(prompts, 16, seed=1), select(prompts, 16, seed=1)
    assert a == b and len(a) == 16
    assert select(prompts, 16, seed=2) != a
    assert set(map(json.dumps, select(prompts, 8, seed=1))) <= set(map(json.dumps, a))
    assert [prompts.index(e) for e in a] == sorted(prompts.index(e) for e in a)
    assert select(prompts, len(prompts), seed=5) == prompts and select(prompts, 0) == []
    with pytest.raises(LanceUsageError, match="cannot select"):
        select(prompts, len(prompts) + 1)


def _write(root, task, text, split="calib"):
    path = set_path(task, root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,match", [
    ('{"prompt": "a"}\n{"prompt": "b"\n', r"line 2: not valid JSON"),
    ('{"prompt": "a"}\n\n{"prompt": "b"}\n', r"line 2: empty line"),
    ('["a"]\n', r"line 1: expected a JSON object"),
    ('{"prompt": "a"}\n{"caption": "b"}\n', r"line 2: expected exactly the field 'prompt'"),
    ('{"prompt": "a", "tags": []}\n', r"line 1: expected exactly the field"),
    ('{"prompt": "  "}\n', r"line 1: 'prompt' must be a non-empty string"),
    ('{"prompt": "A red boat."}\n{"prompt": "a red  boat"}\n', r"line 2: duplicate of line 1"),
    ('', r"is empty"),
])
def test_loader_errors_name_file_and_line(tmp_path, text, match):
    path = _write(tmp_path, "t2i", text)
    with pytest.raises(LanceUsageError, match=match) as e:
        load_prompt_set("t2i", root=tmp_path)
    assert str(path) in str(e.value)


def test_loader_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(LanceUsageError, match=r"heldout.x2t_video\.jsonl: no heldout prompt set"):
        load_prompt_set("x2t_video", root=tmp_path, split="heldout")
    with pytest.raises(LanceUsageError, match="unknown calibration task"):
        load_prompt_set("t2a")
    with pytest.raises(LanceUsageError, match="split"):
        load_prompt_set("t2i", split="test")


def test_loader_reads_custom_root(tmp_path):
    _write(tmp_path, "image_edit", '{"instruction": "Make it night."}\n', split="heldout")
    assert load_prompt_set("image_edit", root=str(tmp_path), split="heldout") == [{"instruction": "Make it night."}]
