"""Save and load recorded calibration programs as one safetensors step of a job."""

from __future__ import annotations

import json

import torch

from lance_deploy.calibrate.record import Call, Program


def save_programs(programs: list[Program]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (tensors, metadata) for `JobState.save_step`."""
    tensors, index = {}, []
    for p, program in enumerate(programs):
        calls = []
        for c, call in enumerate(program.calls):
            key = f"p{p}.c{c}"
            tensors[f"{key}.x"], tensors[f"{key}.pos"] = call.x.contiguous(), call.pos.contiguous()
            if call.gen_rows is not None:
                tensors[f"{key}.gen_rows"] = call.gen_rows.contiguous()
            calls.append({"cache": call.cache, "causal": call.causal, "update": call.update_cache,
                          "step": call.step, "gen": call.gen_rows is not None})
        index.append({"task": program.task, "calls": calls})
    return tensors, {"programs": json.dumps(index)}


def load_programs(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> list[Program]:
    programs = []
    for p, entry in enumerate(json.loads(meta["programs"])):
        program = Program(entry["task"])
        for c, call in enumerate(entry["calls"]):
            key = f"p{p}.c{c}"
            program.calls.append(Call(call["cache"], tensors[f"{key}.x"], tensors[f"{key}.pos"], call["causal"],
                                      tensors[f"{key}.gen_rows"] if call["gen"] else None, call["update"],
                                      call["step"]))
        programs.append(program)
    return programs
