"""Token sequences, positions and the CFG branch against the upstream golden fixtures.

Every sequence is rebuilt from the case's *inputs* only (text, target size, media
grids) and every integer tensor is compared exactly. The second half checks the
same semantics on layouts the fixtures do not contain (other aspect ratios, frame
counts, captions), against expectations derived by hand from the rules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from golden_data import GOLDEN

from lance_deploy.core.errors import CheckpointError, LanceUsageError
from lance_deploy.pipeline.positions import MOD_CAPTION, MOD_SOURCE, MOD_TARGET, MOD_VIT, apply_mape, rope_index
from lance_deploy.pipeline.prompts import SYSTEM_PROMPTS
from lance_deploy.pipeline.sequence import build_generation_sequence, build_understanding_sequence
from lance_deploy.pipeline.tokenizer import LanceTokenizer

GEN_CASES = ["t2i", "t2v", "i2v", "image_edit", "video_edit"]
UND_CASES = ["x2t_image", "x2t_video"]


def golden_root() -> Path:
    if not (GOLDEN / "cases").is_dir() or not (GOLDEN / "ckpt" / "Lance_3B" / "tokenizer.json").is_file():
        pytest.skip(f"golden fixtures not found under {GOLDEN} (set LANCE_GOLDEN)")
    return GOLDEN


def load_case(name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    root = golden_root()
    meta = json.loads((root / "cases" / f"{name}.json").read_text())
    return meta, load_file(str(root / "cases" / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def tok() -> LanceTokenizer:
    return LanceTokenizer.from_dir(golden_root() / "ckpt" / "Lance_3B")


def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    return (frames - 1) // 4 + 1, height // 16, width // 16


def assert_exact(actual, golden: torch.Tensor, what: str) -> None:
    actual = torch.as_tensor(actual)
    assert actual.dtype == golden.dtype, f"{what}: dtype {actual.dtype} != {golden.dtype}"
    assert actual.shape == golden.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(golden.shape)}"
    bad = (actual != golden).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} entries differ, first at {bad[0].tolist()}"


def case_request(meta: dict, t: dict) -> dict:
    """build_generation_sequence arguments from a case's inputs (never from its outputs)."""
    task, inputs = meta["task"], meta["inputs"]
    kw = dict(task=task, prompt=inputs["text"])
    if task in ("t2i", "t2v"):
        target = inputs["target"]
        kw["target_grid"] = latent_grid(target["num_frames"], target["H"], target["W"])
    elif task == "i2v":  # the size comes from the bucketed image = its condition latent
        _, h, w, _ = t["cond_latent_0"].shape
        kw["target_grid"] = ((inputs["target"]["num_frames"] - 1) // 4 + 1, h, w)
    else:  # edits: the target takes the source's size
        source = tuple(t["cond_latent_0"].shape[:3])
        kw.update(target_grid=source, source_grids=[source], vit_grids=[tuple(t["vit_grid_thw"][0].tolist())])
    return kw


# -- golden parity -------------------------------------------------------------------------


@pytest.mark.parametrize("case", GEN_CASES)
def test_generation_sequence_matches_golden(tok, case):
    meta, t = load_case(case)
    seq = build_generation_sequence(tok, **case_request(meta, t))
    layout = meta["sequence"]

    assert seq.rendered_prompt == layout["rendered_prompt"]
    assert seq.attn_modes == layout["attn_modes"]
    assert seq.split_lens == layout["split_lens"]
    assert_exact(torch.tensor(seq.split_lens), t["split_lens"], "split_lens")
    assert [list(g) for g in seq.rope_grids] == layout["video_grid_thw_for_rope"][0]
    vae_rope_grids = [list(g) for g, b in zip(seq.rope_grids, _kinds(seq)) if b != "vit"]
    assert vae_rope_grids == layout["vae_video_grid_thw"]
    expected = {
        "token_ids": seq.token_ids, "token_split_index": seq.token_split_index,
        "token_modality": seq.token_modality, "packed_text_indexes": seq.text_indexes,
        "packed_vae_token_indexes": seq.vae_indexes, "mse_loss_indexes": seq.target_indexes,
        "rope_pos_raw": seq.rope_pos_raw, "rope_pos": seq.rope_pos,
        "uncond_token_ids": seq.uncond_token_ids, "uncond_rope_pos": seq.uncond_rope_pos,
        "uncond_rope_pos_used": seq.uncond_rope_pos_used,
    }
    if "packed_vit_token_indexes" in t:
        expected["packed_vit_token_indexes"] = seq.vit_indexes
    else:
        assert seq.vit_indexes.numel() == 0
    for name, actual in expected.items():
        assert_exact(actual, t[name], name)


def _kinds(seq) -> list[str]:
    """Block kinds in sequence order ('vit' or the VAE role)."""
    blocks = [(b.start, "vit") for b in seq.vit_blocks] + [(b.start, b.role) for b in seq.vae_blocks]
    return [kind for _, kind in sorted(blocks)]


@pytest.mark.parametrize("case", UND_CASES)
def test_understanding_sequence_matches_golden(tok, case):
    meta, t = load_case(case)
    inputs, layout = meta["inputs"], meta["sequence"]
    seq = build_understanding_sequence(
        tok, inputs["instruction(system)"], inputs["question"], tuple(t["vit_grid_thw"][0].tolist()),
        meta["params"]["max_length"],
    )
    assert seq.rendered_prompt == layout["rendered_prompt"]
    assert seq.attn_modes == layout["attn_modes"]
    # The fixture's split list also covers the example's answer; the prompt shares all but the tail.
    assert seq.split_lens[:-1] == layout["split_lens"][:-1]
    assert sum(seq.split_lens) == layout["prompt_len"]
    assert_exact(seq.prompt_ids, t["prompt_ids"], "prompt_ids")
    assert_exact(seq.token_split_index, t["token_split_index"], "token_split_index")
    assert_exact(seq.vit_indexes, t["vit_token_indexes"], "vit_token_indexes")
    assert_exact(seq.rope_pos, t["rope_pos"], "rope_pos")


def test_uncond_kv_positions_are_cond_prefix_then_uncond_target(tok):
    """README 9.1: cached prefix at conditional positions, target query at recomputed ones."""
    meta, t = load_case("t2i")
    seq = build_generation_sequence(tok, **case_request(meta, t))
    u = seq.uncond
    assert u.prefix_splits == [0, 2] and seq.caption_split == 1
    start, stop = seq.target_range
    assert torch.equal(u.target_pos, seq.uncond_rope_pos[:, u.prefix_len : u.prefix_len + stop - start])
    caption_len = seq.split_lens[1]
    # Template split: conditional positions, i.e. shifted by the caption length vs the caption-free sequence.
    tmpl = slice(seq.split_lens[0], seq.split_lens[0] + seq.split_lens[2])
    assert torch.equal(u.rope_pos_used[:, tmpl], u.rope_pos[:, tmpl] + caption_len)


# -- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_ids_and_length(tok):
    assert len(tok) == 422
    assert (tok.endoftext, tok.im_start, tok.im_end) == (400, 401, 402)
    assert (tok.vision_start, tok.vision_end, tok.video_pad) == (409, 410, 413)
    assert tok.encode("<|im_start|>user\n") == [401, tok.token_to_id("user"), tok.token_to_id("\u010a")]
    text = "Describe the user\u2019s caf\u00e9 \u2014 42 frames!\n\n  ok"
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_fallback_vocab_merges_encodes_identically(tok, tmp_path):
    src = golden_root() / "ckpt" / "Lance_3B"
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, tmp_path / name)
    slow = LanceTokenizer.from_dir(tmp_path)
    text = SYSTEM_PROMPTS["image_edit"] + "<|im_end|>\n<|vision_start|><|video_pad|><|vision_end|>A 3-D caf\u00e9\n"
    assert len(slow) == len(tok)
    assert slow.encode(text) == tok.encode(text)


def test_tokenizer_missing_folder_names_it(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        LanceTokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        LanceTokenizer.from_dir(tmp_path / "nope")


# -- semantics beyond the fixtures -----------------------------------------------------------


def test_rope_index_by_hand():
    vs, pad, ve = 9, 8, 7
    ids = [1, 2, vs] + [pad] * 4 + [ve, 3]  # one video block of grid [2, 2, 4] -> 2 x 1 x 2 tokens
    pos = rope_index(ids, [(2, 2, 4)], vision_start_id=vs, pad_id=pad)
    base = 3  # <|vision_start|> sits at 2, the block starts one after it
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[:, 3:7].tolist() == [[base, base, base + 2, base + 2], [base] * 4, [base, base + 1] * 2]
    assert pos[:, 7:].tolist() == [[base + 3, base + 4]] * 3  # resumes at max over the block + 1


def test_mape_needs_a_clean_condition_split():
    pos = torch.arange(12).repeat(3, 1)
    modality = torch.tensor([-1, 4, 4, 4, 2, 2, 2, -1, 1, 1, 1, -1])
    assert torch.equal(apply_mape(pos, modality, ["causal", "noise"]), pos)
    shifted = apply_mape(pos, modality, ["causal", "full", "full_noise", "causal", "noise", "causal"])
    assert shifted[0, 1:4].tolist() == [1000, 1001, 1002] and shifted[1, 1:4].tolist() == [1, 2, 3]
    assert torch.equal(shifted[:, 8:11], pos[:, 4:7])
    assert torch.equal(shifted[:, 11], pos[:, 11])


@pytest.mark.parametrize("src,vit", [((1, 9, 16), (1, 10, 18)), ((3, 12, 7), (3, 14, 8))])
def test_edit_layout_other_aspect_ratios(tok, src, vit):
    caption = "Turn the red car blue, keep the street."
    seq = build_generation_sequence(tok, "video_edit" if src[0] > 1 else "image_edit", caption,
                                    target_grid=src, source_grids=[src], vit_grids=[vit])
    n_vit, n_lat = vit[0] * (vit[1] // 2) * (vit[2] // 2), src[0] * src[1] * src[2]
    assert seq.attn_modes == ["causal", "full", "full_noise", "causal", "causal", "noise", "causal"]
    assert seq.split_lens[1:3] == [n_vit + 2, n_lat + 2] and seq.split_lens[5] == n_lat + 2
    assert seq.split_lens[3] == len(tok.encode(caption)) and seq.caption_split == 3
    mod = seq.token_modality
    assert int((mod == MOD_VIT).sum()) == n_vit + 2 and int((mod == MOD_CAPTION).sum()) == seq.split_lens[3]
    assert torch.equal(seq.rope_pos[:, mod == MOD_TARGET], seq.rope_pos[:, mod == MOD_SOURCE])
    # ViT t re-anchored to 1000 at <|vision_start|>; frames 2 apart; <|vision_end|> one past the
    # block's max over all three axes (here possibly h or w), shifted along.
    vit_t = seq.rope_pos[0, mod == MOD_VIT]
    frames = vit_t[1:-1].unique().tolist()
    assert int(vit_t[0]) == 1000 and frames == [1001 + 2 * k for k in range(vit[0])]
    assert int(vit_t[-1]) == 1001 + max(2 * (vit[0] - 1), vit[1] // 2 - 1, vit[2] // 2 - 1) + 1
    src_block, tgt_block = seq.vae_blocks
    assert seq.target_indexes.tolist() == list(range(tgt_block.start, tgt_block.start + n_lat))
    assert seq.vae_indexes.numel() == 2 * n_lat and src_block.role == "source"
    assert seq.uncond_token_ids.numel() == seq.token_ids.numel() - seq.split_lens[3]
    assert seq.uncond_rope_pos_used.shape[1] == seq.token_ids.numel() - seq.split_lens[3] - 1


def test_i2v_long_video_keeps_first_latent_frame_clean(tok):
    grid = latent_grid(61, 480, 848)  # 16 latent frames of 30 x 53
    seq = build_generation_sequence(tok, "i2v", "The camera pans right.", target_grid=grid)
    (block,) = seq.vae_blocks
    assert block.clean_frames == 1 and block.grid == grid
    frame = grid[1] * grid[2]
    assert seq.target_indexes.tolist() == list(range(block.start + frame, block.start + block.n_tokens))
    # Latent frame k sits at t = base + 2k; no MaPE without a clean condition split.
    t_ids = seq.rope_pos[0, block.start : block.start + block.n_tokens : frame]
    assert (t_ids - t_ids[0]).tolist() == [2 * k for k in range(grid[0])]
    assert torch.equal(seq.rope_pos, seq.rope_pos_raw)


def test_empty_caption_has_no_caption_split(tok):
    seq = build_generation_sequence(tok, "t2i", "", target_grid=(1, 4, 4))
    assert seq.caption_split is None and int((seq.token_modality == MOD_CAPTION).sum()) == 0
    assert torch.equal(seq.uncond_token_ids, seq.token_ids)
    assert seq.uncond.prefix_splits == list(range(seq.target_split))


@pytest.mark.parametrize(
    "task,kw,match",
    [
        ("t2i", dict(target_grid=(2, 4, 4)), "t must be 1"),
        ("i2v", dict(target_grid=(1, 4, 4)), "at least 2"),
        ("image_edit", dict(target_grid=(1, 4, 4)), "one ViT grid per source"),
        ("t2v", dict(target_grid=(2, 4, 4), vit_grids=[(1, 4, 4)]), "no condition blocks"),
        ("x2v", dict(target_grid=(2, 4, 4)), "unknown generation task"),
        ("image_edit", dict(target_grid=(1, 4, 4), source_grids=[(1, 4, 4)], vit_grids=[(1, 3, 4)]), "divisible"),
    ],
)
def test_bad_requests_raise_usage_errors(tok, task, kw, match):
    with pytest.raises(LanceUsageError, match=match):
        build_generation_sequence(tok, task, "a cat", **kw)


def test_marker_in_caption_is_rejected(tok):
    with pytest.raises(LanceUsageError, match="reserved token"):
        build_generation_sequence(tok, "t2i", "a <|vision_start|> cat", target_grid=(1, 4, 4))
