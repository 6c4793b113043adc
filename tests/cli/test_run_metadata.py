"""`run` outputs carry their parameters, and default names are unique and never overwrite.

The proof: the PNG metadata round-trips — reading the chunk back and re-running with those
parameters gives an identical image on CPU.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.cli import cli
from lance_deploy.media.metadata import A1111_KEY, FORMAT, PNG_KEY, read_metadata, read_png_text, sidecar_path

NAME = re.compile(r"^lance-(?P<task>[a-z0-9_]+)-s(?P<seed>\d+)-\d{8}-\d{6}(-\d+)?\.(png|mp4|txt)$")


def _run(*args):
    res = CliRunner().invoke(cli, ["run", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _t2i(out, *extra):
    ckpt = golden_root() / "ckpt" / "Lance_3B"
    return ["t2i", "--model", ckpt, "--prompt", "a red boat, at dusk", "--height", "32", "--width", "48",
            "--steps", "3", "--seed", "7", "--device", "cpu", "--quiet", "--json", "--out", out, *extra]


def test_png_metadata_round_trips_to_an_identical_image(tmp_path):
    from lance_deploy.media.io import read_image
    from lance_deploy.pipeline.pipeline import LancePipeline
    from lance_deploy.pipeline.provenance import request_from_metadata

    summary = _run(*_t2i(f"{tmp_path}/", "--negative-prompt", "blurry"))
    out = tmp_path / summary["output"].rsplit("/", 1)[-1]
    assert NAME.match(out.name) and NAME.match(out.name)["seed"] == "7", out.name
    meta = read_metadata(out)
    assert meta["format"] == FORMAT
    assert (meta["task"], meta["prompt"], meta["negative_prompt"], meta["seed"], meta["steps"]) == \
        ("t2i", "a red boat, at dusk", "blurry", 7, 3)
    assert (meta["width"], meta["height"], meta["frames"], meta["backend"]) == (48, 32, 1, "torch")
    assert meta["model"]["name"] == "Lance_3B" and len(meta["model"]["fingerprint"]) == 64
    assert meta["version"].startswith("lance-deploy ")
    params = read_png_text(out)[A1111_KEY].splitlines()
    assert params[0] == "a red boat, at dusk" and params[1] == "Negative prompt: blurry"
    assert "Steps: 3, Sampler: Euler (flow), Schedule: shift 3.5, CFG scale: 4, Seed: 7, Size: 48x32" in params[2]
    assert f"Model hash: {meta['model']['fingerprint'][:10]}, Model: Lance_3B" in params[2]

    pipe = LancePipeline.from_path(golden_root() / "ckpt" / "Lance_3B", "t2i", device="cpu", dtype="float32")
    again = pipe(request_from_metadata(meta), progress=False)
    assert np.array_equal(again.frames[0], read_image(out))
    assert again.meta["model"] == meta["model"]


def test_default_names_never_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    first = _run(*_t2i(tmp_path / "sub"))  # same task, seed and (likely) second: the name must still differ
    second = _run(*_t2i(tmp_path / "sub"))
    assert first["output"] != second["output"]
    names = sorted(p.name for p in (tmp_path / "sub").iterdir())
    assert len(names) == 2 and all(NAME.match(n) for n in names), names
    third = CliRunner().invoke(cli, ["run", *map(str, _t2i(tmp_path / "sub")[:-2])], catch_exceptions=False)
    assert third.exit_code == 0, third.output  # no --out at all: a default name in the current folder
    made = [p.name for p in tmp_path.iterdir() if p.is_file()]
    assert len(made) == 1 and NAME.match(made[0]), made


def test_default_name_taken_meanwhile_moves_on(tmp_path):
    from lance_deploy.cli.out_names import resolve_out
    from lance_deploy.cli.run_request import write_outputs
    from lance_deploy.pipeline.pipeline import GenerationOutput

    target = resolve_out("t2i", tmp_path, 3, None, now=0)
    taken = target.path
    taken.write_bytes(b"someone else's")  # another process took the name after it was chosen
    frame = np.zeros((1, 16, 16, 3), np.uint8)
    summary = write_outputs("t2i", GenerationOutput(frames=frame, latents=[]), target, None)
    assert taken.read_bytes() == b"someone else's"
    assert summary["output"].endswith("-2.png") and NAME.match(summary["output"].rsplit("/", 1)[-1])


def test_out_folder_must_exist(tmp_path):
    res = CliRunner().invoke(cli, ["run", *map(str, _t2i(f"{tmp_path}/missing/"))])
    assert res.exit_code == 2 and "the folder does not exist" in res.output


@pytest.mark.slow
def test_mp4_carries_the_json_in_its_comment_and_a_sidecar(tmp_path):
    ckpt = golden_root() / "ckpt" / "Lance_3B_Video"
    summary = _run("t2v", "--model", ckpt, "--prompt", "waves", "--height", "32", "--width", "32", "--frames", "5",
                   "--steps", "1", "--device", "cpu", "--quiet", "--json", "--out", tmp_path)
    out = tmp_path / summary["output"].rsplit("/", 1)[-1]
    assert out.suffix == ".mp4" and NAME.match(out.name)
    meta = read_metadata(out)
    assert meta["task"] == "t2v" and meta["frames"] == 5 and meta["prompt"] == "waves"
    assert read_metadata(sidecar_path(out)) == meta
    assert summary["sidecar"] == str(sidecar_path(out))


def test_png_without_parameters_is_one_line(tmp_path):
    from lance_deploy.core.errors import LanceUsageError
    from lance_deploy.media.io import write_image

    write_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "plain.png")
    with pytest.raises(LanceUsageError, match="carries no lance-deploy parameters"):
        read_metadata(tmp_path / "plain.png")
    assert PNG_KEY not in read_png_text(tmp_path / "plain.png")
