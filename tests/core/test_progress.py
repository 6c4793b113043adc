"""The one progress mechanism: bars, JSON events under --json, silence under --quiet, and
ambient bars (loading, VAE tiles) that only report when a command asked for progress."""

from __future__ import annotations

import json

import pytest

from lance_deploy.core import progress


def _events(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines()]


def test_json_mode_writes_events_with_eta(capsys):
    with progress.use("json"), progress.bar(4, "t2i denoise") as b:
        for _ in range(4):
            b.update()
    ev = _events(capsys.readouterr().err)
    assert ev[0] == {"event": "progress", "phase": "t2i denoise", "done": 0, "total": 4, "unit": "step",
                     "elapsed_s": ev[0]["elapsed_s"], "eta_s": None}
    assert ev[-1]["done"] == 4 and ev[-1]["eta_s"] == 0.0
    assert len(ev) <= 3  # throttled: start, then at most one per EVENT_EVERY_S, and the end


def test_off_and_unset_modes(capsys):
    with progress.use("off"), progress.bar(3, "x") as b:
        assert b is None
    with progress.bar(3, "ambient", enabled=None) as b:  # no command chose a mode: silent
        assert b is None
    with progress.use("bar"), progress.bar(3, "y", enabled=False) as b:
        assert b is None
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="progress mode 'loud'"), progress.use("loud"):
        pass


def test_advance_moves_the_tracked_bar_and_delay_hides_short_phases(capsys):
    progress.advance()  # no tracked bar: a no-op
    with progress.use("json"):
        with progress.bar(None, "load", unit="tensor", enabled=None, track=True):
            for _ in range(5):
                progress.advance()
        with progress.bar(2, "vae decode", enabled=None, delay=60.0) as b:
            b.update(2)
    ev = _events(capsys.readouterr().err)
    assert [e["phase"] for e in ev] == ["load", "load"] and ev[-1]["done"] == 5
