"""`quantize --variant`: on a download folder it says which model it took, and takes the one asked for."""

from __future__ import annotations

import json

from click.testing import CliRunner
from golden_data import golden_root

from lance_deploy.cli import cli


def test_variant_picks_the_model_and_says_so(tmp_path):
    ckpt = golden_root() / "ckpt"  # a download folder: Lance_3B/ and Lance_3B_Video/
    res = CliRunner().invoke(cli, ["quantize", str(ckpt), "--variant", "video", "--recipe", "int8-rtn", "--out",
                                   str(tmp_path / "v"), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.stderr
    assert f"note: quantizing {ckpt / 'Lance_3B_Video'} (the video model" in res.stderr
    assert json.loads(res.stdout)["model"] == str(ckpt / "Lance_3B_Video")
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert manifest["source"]["variant"] == "video"

    res = CliRunner().invoke(cli, ["quantize", str(ckpt / "Lance_3B"), "--variant", "video", "--recipe", "int8-rtn",
                                   "--out", str(tmp_path / "w"), "--device", "cpu"])
    assert res.exit_code == 2 and "asked for the video model, but this is the image model" in res.stderr
