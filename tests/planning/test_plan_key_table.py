"""`plan` and `memory-plan` check a release's key table and shapes from its headers (issue 15, case 10)."""

from __future__ import annotations

from input_cases import assert_cli_error, model_copy, rewrite_header

KEY = "language_model.model.layers.0.mlp.down_proj.weight"


def _transposed(tmp_path):
    model = model_copy(tmp_path / "m", replace=("model.safetensors",))
    rewrite_header(model / "model.safetensors", lambda h: h[KEY].update(shape=h[KEY]["shape"][::-1]))
    return model


def _missing(tmp_path):
    model = model_copy(tmp_path / "m", replace=("model.safetensors",))
    # renamed, so the data stays covered and only the key table can tell
    rewrite_header(model / "model.safetensors",
                   lambda h: h.update({"language_model.model.nrom.weight": h.pop("language_model.model.norm.weight")}))
    return model


def test_memory_plan_refuses_a_transposed_tensor(tmp_path):
    model = _transposed(tmp_path)
    assert_cli_error(["memory-plan", "--model", model, "--task", "t2i", "--gpu-memory", "4GiB"], KEY)


def test_plan_refuses_a_transposed_tensor(tmp_path):
    assert_cli_error(["plan", _transposed(tmp_path), "--recipe", "int8-rtn"], KEY)


def test_plan_and_memory_plan_refuse_a_missing_tensor(tmp_path):
    model = _missing(tmp_path)
    assert_cli_error(["plan", model, "--recipe", "int8-rtn"], "language_model.model.norm.weight")
    assert_cli_error(["memory-plan", "--model", model, "--task", "t2i", "--gpu-memory", "4GiB"],
                     "language_model.model.norm.weight")
