"""`negative_prompt`: the CFG branch runs the same template with the negative text as the caption.

Without one (None or "") the sequence, the uncond branch and the output are upstream's exactly
(test_golden_tasks covers the numbers); with one, the branch's tokens are the rendered template's
and the image changes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden_data import golden_root, load_case
from golden_requests import request_from_case

from lance_deploy.core.errors import LanceUsageError
from lance_deploy.pipeline.layout import expand_blocks, generation_blocks
from lance_deploy.pipeline.prompts import render_generation_prompt
from lance_deploy.pipeline.sampler import SamplerConfig
from lance_deploy.pipeline.sequence import build_generation_sequence
from lance_deploy.pipeline.tasks import TaskRequest
from lance_deploy.pipeline.tokenizer import LanceTokenizer

NEG = "blurry, low quality"


@pytest.fixture(scope="module")
def tok():
    return LanceTokenizer.from_dir(golden_root() / "ckpt" / "Lance_3B")


@pytest.fixture(scope="module")
def t2i_pipe():
    from lance_deploy.pipeline.pipeline import LancePipeline

    return LancePipeline.from_path(golden_root() / "ckpt" / "Lance_3B", "t2i", device="cpu", dtype="float32")


def test_no_negative_prompt_keeps_upstream_sequence(tok):
    a = build_generation_sequence(tok, "t2i", "a red boat", target_grid=(1, 2, 2))
    for empty in (None, ""):
        b = build_generation_sequence(tok, "t2i", "a red boat", target_grid=(1, 2, 2), negative_prompt=empty)
        assert b.negative is None
        assert torch.equal(a.uncond_token_ids, b.uncond_token_ids)
        assert torch.equal(a.uncond_rope_pos_used, b.uncond_rope_pos_used)


@pytest.mark.parametrize("task,grids", [("t2i", {}), ("image_edit", {"vit_grids": [(1, 2, 2)],
                                                                     "source_grids": [(1, 1, 1)]})])
def test_negative_sequence_is_the_template_with_the_negative_caption(tok, task, grids):
    seq = build_generation_sequence(tok, task, "a red boat", target_grid=(1, 2, 2), negative_prompt=NEG, **grids)
    neg = seq.negative
    blocks = generation_blocks(task, (1, 2, 2), grids.get("vit_grids", ()), grids.get("source_grids", ()), 2)
    rendered = render_generation_prompt(task, NEG, len(blocks) - 1)
    expected, _ = expand_blocks(tok, tok.encode(rendered), blocks)
    assert neg.rendered_prompt == rendered
    assert neg.token_ids.tolist() == expected
    # the caption split holds exactly the negative text's tokens; the rest is the conditional template
    start = sum(neg.split_lens[: neg.caption_split])
    assert neg.token_ids[start : start + neg.split_lens[neg.caption_split]].tolist() == tok.encode(NEG)
    keep_c, keep_n = seq.token_modality != 0, neg.token_modality != 0
    assert torch.equal(seq.token_ids[keep_c], neg.token_ids[keep_n])
    assert neg.target_range[1] - neg.target_range[0] == seq.target_range[1] - seq.target_range[0]


def test_negative_prompt_changes_the_output_and_only_with_cfg(t2i_pipe):
    meta, g = load_case("t2i")
    base = t2i_pipe(request_from_case(meta, g), progress=False, trace=True)
    req = request_from_case(meta, g)
    req.negative_prompt = NEG
    neg = t2i_pipe(req, progress=False, trace=True)
    assert torch.equal(base.trace.v_cond[0], neg.trace.v_cond[0])  # the conditional branch is untouched
    assert not torch.equal(base.trace.v_uncond[0], neg.trace.v_uncond[0])
    assert not np.array_equal(base.frames, neg.frames)
    off = request_from_case(meta, g)
    off.negative_prompt, off.sampler = NEG, SamplerConfig(steps=off.sampler.steps, cfg_scale=1.0)
    plain = request_from_case(meta, g)
    plain.sampler = off.sampler
    out_off = t2i_pipe(off, progress=False)
    assert np.array_equal(out_off.frames, t2i_pipe(plain, progress=False).frames)
    assert any("--negative-prompt has no effect" in n for n in out_off.notes)


@pytest.mark.parametrize("value,needle", [(["a"], "expected text"), ("x" * 9000, "characters"),
                                          ("<|vision_start|>", "reserved token")])
def test_bad_negative_prompt_is_one_line(value, needle, t2i_pipe):
    req = TaskRequest(task="t2i", prompt="a boat", negative_prompt=value, height=32, width=32,
                      sampler=SamplerConfig(steps=1))
    with pytest.raises(LanceUsageError, match=needle) as e:
        t2i_pipe(req, progress=False)
    assert "\n" not in str(e.value)


def test_understanding_refuses_a_negative_prompt():
    req = TaskRequest(task="x2t_image", question="what?", negative_prompt="no")
    with pytest.raises(LanceUsageError, match="no CFG branch"):
        req.validate(media=False)
