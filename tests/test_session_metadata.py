"""EditSession turns carry the same `lance-deploy` / `parameters` chunks as `run`'s PNGs."""

from __future__ import annotations

import numpy as np
from golden_data import golden_root

from lance_deploy.api import EditSession
from lance_deploy.media.metadata import A1111_KEY, read_metadata, read_png_text


def test_turn_png_carries_the_run_format(tmp_path):
    from lance_deploy.pipeline.pipeline import LancePipeline

    pipe = LancePipeline.from_path(golden_root() / "ckpt" / "Lance_3B", "image_edit", device="cpu", dtype="float32")
    src = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    s = EditSession.create(tmp_path / "s", src)
    turn = s.edit(pipe, "add snow", steps=1, vae_area_side=64, vit_area_side=64)
    meta = read_metadata(s.path(turn.index))
    assert meta["task"] == "image_edit" and meta["prompt"] == "add snow" and meta["steps"] == 1
    assert meta["model"]["name"] == "Lance_3B" and meta["request"]["vae_area_side"] == 64
    text = read_png_text(s.path(turn.index))
    assert text["lance_session_turn"] == "1" and text[A1111_KEY].startswith("add snow\nSteps: 1")
    # a turn recorded by a front end without the pipeline's output still says what the request was
    req = s.request("darker", parent=0, steps=1, vae_area_side=64, vit_area_side=64)
    t2 = s.record(req, s.media(turn.index), parent=0)
    assert read_metadata(s.path(t2.index))["prompt"] == "darker"
    assert read_metadata(s.path(t2.index))["model"] == {"name": None, "fingerprint": None}
