"""Fake CUDA on a CPU-only machine: the real runtime at release shapes, no arithmetic, seconds.

`FakeCuda()` is a dispatch mode. Inside it, work on CPU tensors runs for real (tokenising,
sequence building, index maths), and anything on a `cuda` tensor runs under torch's
`FakeTensorMode`: the CUDA kernels' own meta functions check shapes, dtypes and layouts
(`torch._scaled_mm` refuses a row-major second operand) and nothing is computed. On top:

* live bytes of fake CUDA storages, rounded like the caching allocator (512 B), with a peak per
  phase (`memory`);
* streams and events through `runtime.fake_streams.FakeCudaEngine`, which the pager uses via
  `runtime.copy_engine` and which raises `StreamRace` on an unordered access (`engine`);
* SDPA dispatched as CUDA would on an sm80+ GPU (flash without a mask, memory-efficient with
  one, math otherwise) instead of the math decomposition the meta device gets (`sdpa`);
* real "shadow" values of small device tensors computed from host data (index maths), so
  `nonzero`, boolean indexing and `.item()` on them work; other device reads (a latent's NaN
  check, an argmax) read as zero / True and are counted in `syncs`.

Facts this rests on (torch 2.13 CPU build, checked by tests/runtime/test_rehearsal.py):
torch 2.13's `_ensureCUDADeviceGuardSet` only patches CUDA builds without devices, so on a
CPU-only build `copy_`, `contiguous` and indexing of a fake cuda tensor fail in the Python
bindings' device guard; `install_device_guard` registers the same no-op guard torch already
uses for the meta device. `_int_mm`'s meta does not check cuBLAS's > 16 rows; the
`_scaled_mm`, `_weight_int8pack_mm`, `_weight_int4pack_mm` and flash / efficient / cuDNN SDPA
metas exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from lance_deploy.core.errors import LanceError
from lance_deploy.formats.qlinear import assume_capability
from lance_deploy.runtime.copy_engine import use_engine
from lance_deploy.runtime.fake_streams import FakeCudaEngine

aten = torch.ops.aten
ALLOC_ROUND = 512  # the CUDA caching allocator's block granularity
SHADOW_LIMIT = 1 << 22  # elements: larger device tensors never get a host value
_CUDA, _META = 1, 14  # c10::DeviceType
_INDEX_OPS = (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._unsafe_index_put.default)


class FakeCudaError(LanceError):
    """The rehearsal met something it cannot fake (a device value the host needs to know)."""


def install_device_guard() -> None:
    """Give a CPU-only build a no-op CUDA device guard (the one registered for meta)."""
    if torch.cuda._is_compiled():
        return  # FakeTensorMode's own _ensureCUDADeviceGuardSet covers builds with CUDA
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    registry = (ctypes.c_void_p * 21).in_dll(lib, "_ZN3c104impl26device_guard_impl_registryE")
    if not registry[_CUDA]:
        registry[_CUDA] = registry[_META]


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _is_fake_cuda(t) -> bool:
    return isinstance(t, FakeTensor) and t.device.type == "cuda"


class MemoryTracker:
    """Live bytes of fake CUDA storages; the peak overall and per phase."""

    def __init__(self, on_free=None):
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.phase = "load"
        self.phase_peak: dict[str, int] = {}
        self.on_free = on_free

    def add(self, storage) -> None:
        key = storage._cdata
        if key in self.live:
            return
        n = -(-max(storage.nbytes(), 1) // ALLOC_ROUND) * ALLOC_ROUND
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        self.phase_peak[self.phase] = max(self.phase_peak.get(self.phase, 0), self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        if self.on_free:
            self.on_free(key)

    def set_phase(self, name: str) -> None:
        """Start counting `name`. A phase's peak is taken at its allocations and its end, so
        units the next phase parks before placing its own do not count twice."""
        self.phase_peak[self.phase] = max(self.phase_peak.get(self.phase, 0), self.current)
        self.phase = name
        self.phase_peak.setdefault(name, 0)

    def peaks(self) -> dict[str, int]:
        self.set_phase(self.phase)
        return dict(self.phase_peak)


class FakeCuda(TorchDispatchMode):
    """See the module docstring. `capability` is what CUDA code paths are told the GPU is."""

    def __init__(self, capability=(9, 0)):
        super().__init__()
        install_device_guard()
        self.fm = FakeTensorMode(allow_non_fake_inputs=True)
        self.engine = FakeCudaEngine("cuda")
        self.memory = MemoryTracker(on_free=self._freed)
        self.capability = capability
        self.shadows: dict[int, torch.UntypedStorage] = {}
        self.syncs = Counter()
        self.sdpa = Counter()
        self.loading = False  # see `load`
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        # fm is the infra FAKE mode below this one: with it set, Tensor.to("cuda:0") skips CUDA's
        # lazy init, and `func(...)` in the dispatch below goes to it
        self._stack.enter_context(self.fm)
        self._stack.enter_context(use_engine(self.engine))
        self._stack.enter_context(assume_capability(self.capability))
        self._stack.enter_context(_CudaFunctions(self))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()

    @contextlib.contextmanager
    def load(self):
        """Loading weights: a device->host copy of values nobody computed gives a fake host tensor
        (a repacked weight's host copy, `QLinear.prepare` of a paged layer), not real zeros. Its
        bytes are never read, and a real tensor would turn into a bare meta one the moment the
        pager points it at a fake device slot (`.data` keeps the tensor's class, not the slot's)."""
        prev, self.loading = self.loading, True
        try:
            yield
        finally:
            self.loading = prev

    # -- fake tensors made on purpose --------------------------------------------------------------
    def empty(self, shape, dtype, device) -> torch.Tensor:
        """A fake tensor (host weights of a release too big to hold, device buffers)."""
        with _disable_current_modes(), self.fm:  # fm alone: this mode would give a cpu tensor real bytes
            t = torch.empty(tuple(shape), dtype=dtype, device=device)
        if t.device.type == "cuda":
            self.memory.add(t.untyped_storage())
        return t

    # -- dispatch ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = pytree.arg_tree_leaves(*args, **kwargs)
        if not any(type(t) is FakeTensor for t in leaves):
            dev = kwargs.get("device")
            if dev is None or torch.device(dev).type != "cuda":
                with _host():
                    return func(*args, **kwargs)  # host work runs for real
        if func in _SPECIAL or func in _INDEX_OPS:
            with _host():  # the helpers below work on host values
                if func is aten._local_scalar_dense.default:
                    return self._scalar(args[0])
                if func is aten.nonzero.default:
                    return self._nonzero(args[0])
                if func is aten.copy_.default and type(args[0]) is not FakeTensor:
                    return self._read_back(args[1], into=args[0])
                if func in _INDEX_OPS:
                    args = (args[0], self._long_indices(args[1]), *args[2:])
                    leaves = pytree.arg_tree_leaves(*args, **kwargs)
        out = func(*args, **kwargs)  # to the fake mode below
        info = _info(func)
        with _host():
            outs = [t for t in pytree.tree_leaves(out) if type(t) is FakeTensor]
            self._shadow(func, info, args, kwargs, leaves, out, outs)
            self._account(func, info, args, kwargs, leaves, outs)
            if func is aten._to_copy.default and _is_fake_cuda(args[0]) and out.device.type == "cpu":
                return self._read_back(args[0])
        return out

    def _account(self, func, info, args, kwargs, leaves, outs) -> None:
        cuda_outs = [t for t in outs if t.device.type == "cuda"]
        for t in cuda_outs:
            self.memory.add(t.untyped_storage())
        view, mutable, _ = info
        if view or not (cuda_outs or mutable) or func in _UNINITIALISED:
            return  # no kernel touches data
        written = {_key(t) for t in _written(info, args, kwargs) if _is_fake_cuda(t)}
        fresh = {_key(t) for t in cuda_outs} - written
        inputs = {_key(t) for t in leaves if _is_fake_cuda(t)}
        self.engine.access(inputs - written - fresh, written | fresh)

    def _freed(self, key: int) -> None:
        self.shadows.pop(key, None)
        self.engine.forget(key)

    # -- host values of small device tensors -----------------------------------------------------
    def _real(self, t):
        """The host value of `t`: itself if real, its shadow view if it has one, else None."""
        if not isinstance(t, FakeTensor):
            return t
        s = self.shadows.get(_key(t))
        if s is None:
            return None
        return torch.empty(0, dtype=t.dtype).set_(s, t.storage_offset(), t.size(), t.stride())

    def _shadow(self, func, info, args, kwargs, leaves, out, outs) -> None:
        """Compute the op on host values too when every device input has one (index maths)."""
        ok = all(t.numel() <= SHADOW_LIMIT for t in outs) and "rand" not in func.__name__
        ok = ok and all(type(t) is not FakeTensor or _key(t) in self.shadows for t in leaves)
        if not ok:
            if info[1]:
                for t in _written(info, args, kwargs):
                    if type(t) is FakeTensor:
                        self.shadows.pop(_key(t), None)
            return
        cpu_args, cpu_kwargs = pytree.tree_map(self._host_arg, (args, kwargs))
        real_out = func(*cpu_args, **cpu_kwargs)
        for fo, ro in zip(pytree.tree_leaves(out), pytree.tree_leaves(real_out)):
            if type(fo) is FakeTensor and isinstance(ro, torch.Tensor):
                self._bind(fo, ro)

    def _host_arg(self, x):
        if isinstance(x, torch.Tensor):
            return self._real(x)
        if isinstance(x, torch.device) and x.type == "cuda":
            return torch.device("cpu")
        return x

    def _bind(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        key = _key(fake)
        if key in self.shadows:
            return  # a view of a tensor that has one
        if (real.storage_offset(), real.stride()) != (fake.storage_offset(), fake.stride()):
            store = torch.empty(fake.untyped_storage().nbytes(), dtype=torch.uint8).untyped_storage()
            torch.empty(0, dtype=fake.dtype).set_(store, fake.storage_offset(), fake.size(), fake.stride()).copy_(real)
            real = torch.empty(0, dtype=fake.dtype).set_(store, fake.storage_offset(), fake.size(), fake.stride())
        self.shadows[key] = real.untyped_storage()

    def _scalar(self, t):
        r = self._real(t)
        if r is not None:
            return r.item()
        self.syncs[str(t.dtype)] += 1  # a device value nobody computed: read as 0 / True
        return True if t.dtype == torch.bool else 0

    def _nonzero(self, t):
        r = self._real(t)
        if r is None:
            raise FakeCudaError(f"nonzero of a device tensor {tuple(t.shape)} whose values the host does not know")
        nz = r.nonzero()
        out = self.empty(nz.shape, nz.dtype, t.device)
        self._bind(out, nz)
        return out

    def _long_indices(self, indices) -> list:
        """Boolean masks as the long indices of their true entries (what CUDA computes, with a sync)."""
        out = []
        for i in indices:
            if i is None or i.dtype not in (torch.bool, torch.uint8):
                out.append(i)
            else:
                out += list((self._nonzero(i) if isinstance(i, FakeTensor) else i.nonzero()).unbind(1))
        return out

    def _read_back(self, src, into=None):
        """A device->host copy: the shadow when there is one, else zeros (counted)."""
        r = self._real(src)
        if r is None and self.loading and into is None:
            return self.empty(src.shape, src.dtype, "cpu")
        if r is None:
            self.syncs["d2h"] += 1
            r = torch.zeros(src.shape, dtype=src.dtype)
        if into is None:
            return r.clone()
        return into.copy_(r)


class _host:
    """Real CPU work inside the dispatch: the fake mode below is lifted meanwhile."""

    def __enter__(self):
        self.fake = torch._C._unset_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)

    def __exit__(self, *exc):
        if self.fake is not None:
            torch._C._set_dispatch_mode(self.fake)


_SPECIAL = (aten._local_scalar_dense.default, aten.nonzero.default, aten.copy_.default)
_UNINITIALISED = (aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
                  aten.new_empty_strided.default, aten.empty_like.default)
_INFO: dict = {}


def _info(func) -> tuple:
    """(is a view, mutates an argument, [(position, name, kwarg-only) of each argument it writes])."""
    info = _INFO.get(func)
    if info is None:
        writes = [(i, a.name, a.kwarg_only) for i, a in enumerate(func._schema.arguments)
                  if a.alias_info is not None and a.alias_info.is_write]
        info = _INFO[func] = (func.is_view, bool(writes), writes)
    return info


def _written(info, args, kwargs) -> list:
    """The tensor arguments the op mutates."""
    out = []
    for i, name, kwarg_only in info[2]:
        v = kwargs.get(name) if kwarg_only or i >= len(args) else args[i]
        out += [t for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]
    return out


_DATA = torch._C.TensorBase.__dict__["data"]


class _CudaFunctions(TorchFunctionMode):
    """Two Python-level fixes for fake cuda tensors.

    `t.data = x` swaps the tensor's storage but not a FakeTensor's `fake_device` (a Python
    attribute), so a host parameter pointed at a device slot would still say "cpu": the pager
    and the residency manager bind weights exactly that way. And F.scaled_dot_product_attention
    takes the kernel an sm80+ GPU would (torch's sdp_utils: flash needs no mask, fp16/bf16 and
    head_dim <= 256; memory-efficient takes a mask; GQA both): the meta device alone would
    decompose every call into math."""

    def __init__(self, owner: FakeCuda):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _is_fake_cuda(args[0]):
            return self._sdpa(*args, **kwargs)
        out = func(*args, **kwargs)
        if getattr(func, "__self__", None) is _DATA and isinstance(args[1], FakeTensor):
            args[0].fake_device = args[1].fake_device
        return out

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        half = q.dtype in (torch.float16, torch.bfloat16)
        sm80 = self.owner.capability >= (8, 0)
        if attn_mask is None and half and sm80 and q.shape[-1] <= 256:
            self.owner.sdpa["flash"] += 1
            return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
        if sm80 or q.dtype != torch.bfloat16:
            self.owner.sdpa["efficient"] += 1
            bias = attn_mask
            if bias is not None and bias.dtype == torch.bool:  # attention.cpp: where(mask, 0, -inf), padded to 16
                bias = torch.where(bias, 0.0, torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
                keys, pad = bias.shape[-1], -bias.shape[-1] % 16
                bias = F.pad(bias, (0, pad))[..., :keys] if pad else bias
                bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            return aten._scaled_dot_product_efficient_attention(q, k, v, bias, False, dropout_p, is_causal,
                                                                scale=scale)[0]
        self.owner.sdpa["math"] += 1
        return func_math(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def func_math(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=enable_gqa)
