"""The fake-CUDA rehearsal: the real pipeline, residency manager and pager at release shapes, no GPU.

The CI subset of `benchmarks/rehearse.py` (which runs all tasks x budgets x recipes): t2i 768² paged
under 5 GiB with int8 expert Linears, x2t_image all resident; every phase's rehearsed peak of live
fake-CUDA bytes within 10 % of the planner's allocated bytes. Then the checks a CPU run cannot
otherwise make: a wrong operand layout in the CUDA-only fp8 branch, and a missing stream wait in
the pager, each fail the rehearsal.
"""

from __future__ import annotations

import pytest
import torch
from golden_data import golden_root

from lance_deploy.core.units import GiB
from lance_deploy.formats import FormatSpec, PackedTensor, layout
from lance_deploy.formats import qlinear as ql
from lance_deploy.formats.qlinear import QLinear
from lance_deploy.runtime.fake_cuda import FakeCuda
from lance_deploy.runtime.fake_streams import FakeCudaEngine, StreamRace

TOLERANCE = 0.10
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The full-size release as headers only (a few KB): the rehearsal reads nothing else."""
    from lance_deploy.checkpoint.headers_only import make_header_only_release

    return make_header_only_release(tmp_path_factory.mktemp("hdr"), golden_root() / "ckpt" / "Lance_3B")


def expert_formats(spec: FormatSpec, experts=("und", "gen"), layers=range(36)) -> dict:
    """{LanceLM module path: (spec, smooth?)} for every Linear of the chosen expert layers."""
    from lance_deploy.config import FULL_LLM
    from lance_deploy.model.lance import LanceLM
    from lance_deploy.model.meta import build_on_meta
    from lance_deploy.model.tree import expert_of

    lm = build_on_meta(lambda: LanceLM(FULL_LLM, with_gen=True, with_lm_head=False), lambda m: None)
    out = {}
    for path, m in lm.named_modules():
        linear = isinstance(m, torch.nn.Linear) and expert_of(path + ".weight") in experts and ".layers." in path
        if linear and int(path.split(".layers.")[1].split(".")[0]) in layers:
            out[path] = (spec, False)
    return out


def _check(r) -> None:
    bad = [f"{x.phase}: rehearsed {x.rehearsed / GiB:.3f} GiB vs planned {x.planned / GiB:.3f} GiB ({x.ratio:.3f})"
           for x in r.rows if abs(x.ratio - 1) > TOLERANCE]
    assert not bad, f"{r.task} {r.budget}: " + "; ".join(bad)


def test_t2i_768_paged_int8_under_5gib(release):
    """int8 t2i fits 8 GiB whole (7.4 GiB with the embeddings); under 5 GiB the denoise phase
    streams 10 of the 36 packed und layers."""
    from lance_deploy.planning.rehearsal import rehearse, request

    r = rehearse(release, "t2i", "5GiB", req=request("t2i", steps=1), formats=expert_formats(FormatSpec("int8")))
    assert r.streamed and [x.phase for x in r.rows] == ["prefill", "denoise", "vae_decode"]
    _check(r)
    assert max(x.rehearsed for x in r.rows) <= 5 * GiB
    # the pager ran its stream protocol on the fake engine: prefetches waited for, slots recycled
    assert r.engine_calls.get("wait", 0) > 0 and r.engine_calls.get("record", 0) > 0
    assert all(x.ledger is not None and x.ledger <= x.rehearsed for x in r.rows)
    assert r.sdpa.get("flash", 0) > 0  # the unmasked denoise query takes flash on sm90


def test_t2i_paged_int4_tinygemm_layers(release):
    """int4 Linears repacked for tinygemm on the host while paging: the repack's host copies stay
    fake (they had become bare meta tensors once the pager pointed them at a slot: every int4 row of
    the matrix that streamed failed with a device mismatch)."""
    from lance_deploy.planning.rehearsal import rehearse, request

    r = rehearse(release, "t2i", "3GiB", req=request("t2i", steps=1),
                 formats=expert_formats(FormatSpec("int4", group_size=128)))
    assert r.streamed
    _check(r)


def test_x2t_image_all_resident(release):
    from lance_deploy.planning.rehearsal import rehearse, request

    r = rehearse(release, "x2t_image", req=request("x2t_image", max_new_tokens=1))
    assert not r.streamed and [x.phase for x in r.rows] == ["encode_vit", "prefill", "text_decode"]
    _check(r)


def test_an_understanding_task_plans_only_the_und_half_of_an_artifact(release):
    """A recipe packs both experts; x2t builds no gen expert, so its gen Linears are neither
    packed nor counted (the matrix raised AttributeError on x2t with every recipe)."""
    from lance_deploy.planning.rehearsal import planner_info

    def weights(formats=None) -> int:
        return planner_info(release, "x2t_image", formats).inventory("x2t_image", torch.bfloat16).total

    both, und = expert_formats(FormatSpec("int8")), expert_formats(FormatSpec("int8"), experts=("und",))
    assert weights(both) == weights(und) < weights()


def test_w8a8_and_smoothed_linears_add_their_input_transients_to_the_plan(release):
    """Per-token activation quantization and the smooth division hold fp32 copies of a Linear's
    input: at t2v's ~50k denoising rows the down projection's cost 2.2-3.2 GiB the planner missed
    (rehearsed 1.19-1.28x). Both W8A8 formats now hold the same at their peak, the down projection's
    input (int8's epilogue works on row slices; fp8's `_scaled_mm` writes bf16). The big call is the
    gen expert's, so und-only W8A8 changes nothing."""
    from lance_deploy.planning.rehearsal import plan_request, request

    def denoise(formats) -> int:
        plan = plan_request(release, request("t2v", steps=1), None, formats=formats).plan
        return next(p for p in plan.phases if p.name == "denoise").activations

    w8a8, weight_only = FormatSpec("int8", activations="dynamic_per_token"), FormatSpec("fp8_e4m3")
    fp8_w8a8 = FormatSpec("fp8_e4m3", activations="dynamic_per_token")
    base = denoise(expert_formats(weight_only))
    extra = denoise(expert_formats(w8a8)) - base
    assert extra > GiB // 4 and denoise(expert_formats(fp8_w8a8)) - base == extra
    mixed = expert_formats(weight_only, experts=("gen",)) | expert_formats(w8a8, experts=("und",))
    assert denoise(mixed) == base


def test_a_row_major_scaled_mm_operand_fails_the_rehearsal(release, monkeypatch):
    """The fp8 W8A8 branch runs only on an sm89+ GPU; under fake CUDA its `_scaled_mm` meta
    refuses a row-major second operand exactly as cuBLAS does on the device."""
    from lance_deploy.planning.rehearsal import rehearse, request

    good = ql._fp8_scaled_mm
    monkeypatch.setattr(ql, "_fp8_scaled_mm", lambda x, w_t, scale: good(x, w_t.contiguous(), scale))
    fp8 = FormatSpec("fp8_e4m3", activations="dynamic_per_token")
    with pytest.raises(RuntimeError, match="col_major"):
        rehearse(release, "t2i", req=request("t2i", steps=1), formats=expert_formats(fp8, ("und",), range(1)))


def test_scaled_mm_layout_at_a_release_shape():
    """The same check on one [11008, 2048] Linear: the shipped branch passes, a transposed copy fails."""
    spec = FormatSpec("fp8_e4m3", activations="dynamic_per_token")
    mode = FakeCuda()
    with mode:
        fields = {k: mode.empty(s, d, CUDA) for k, (s, d) in layout((11008, 2048), spec).items()}
        q = QLinear(PackedTensor(spec=spec, shape=(11008, 2048), **fields))
        x = mode.empty((4096, 2048), torch.bfloat16, CUDA)
        assert q.kernel(x) == "fp8_scaled_mm"
        y = q(x)
        assert y.shape == (4096, 11008) and y.dtype == torch.bfloat16 and y.device.type == "cuda"
        with pytest.raises(RuntimeError, match="col_major"):
            torch._scaled_mm(x.to(torch.float8_e4m3fn), q.qdata.t().contiguous(),
                             scale_a=torch.ones((4096, 1), device=CUDA), scale_b=torch.ones((1, 11008), device=CUDA),
                             out_dtype=torch.bfloat16)


def test_a_missing_prefetch_wait_is_a_stream_race(release, monkeypatch):
    """Without the pager's `wait(slot.ready)` compute reads a slot the side stream is still
    filling: on a GPU wrong numbers some of the time, here a StreamRace on the first layer."""
    from lance_deploy.planning.rehearsal import rehearse, request

    real_wait = FakeCudaEngine.wait

    def wait(self, event, stream=None):
        if stream is None and event.stream is not self.compute:  # compute waiting for a prefetch
            return
        real_wait(self, event, stream)

    monkeypatch.setattr(FakeCudaEngine, "wait", wait)
    with pytest.raises(StreamRace, match="stream race: compute reads"):  # 5 GiB: the prefill streams 4 und layers
        rehearse(release, "t2i", "5GiB", req=request("t2i", steps=1))


def test_memory_tracker_counts_live_blocks_per_phase():
    mode = FakeCuda()
    with mode:
        a = torch.empty(1000, dtype=torch.uint8, device=CUDA)  # 1000 B -> two 512 B blocks
        mode.memory.set_phase("one")
        b = a.float()  # 4000 B -> 4096
        del a
        mode.memory.set_phase("two")
        c = torch.empty(10, device=CUDA)  # 40 B -> 512
        del b, c
        peaks = mode.memory.peaks()
    assert peaks["load"] == 1024 and peaks["one"] == 1024 + 4096 and peaks["two"] == 4096 + 512
    assert mode.memory.current == 0


def test_host_work_is_real_and_small_device_values_have_shadows():
    """Index maths on device tensors made from host values stays exact (nonzero, masks, item)."""
    mode = FakeCuda()
    with mode:
        t = torch.arange(10).to(CUDA)
        mask = t % 3 == 0
        assert t[mask].shape == (4,)
        assert int(t.sum()) == 45
        assert torch.arange(4).sum().item() == 6  # host tensors compute for real
    assert not mode.syncs
