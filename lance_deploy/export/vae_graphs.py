"""Export wrappers for the Wan2.2 VAE: one spatial tile, one causal chunk, caches as tensors.

The streaming VAE keeps per-op history in a `StreamCache` (a list of "slots" visited in a fixed
order). A graph cannot hold Python state, so each part becomes two static graphs:

* ``first``: the first chunk of a stream (1 latent frame -> 1 pixel frame for the decoder,
  1 pixel frame -> 1 latent frame for the encoder); no cache inputs, every slot as an output.
* ``step``: every later chunk (1 latent frame -> 4 pixel frames; 4 pixel frames -> 1 latent
  frame), slots in and slots out.

Slot shapes differ between the two (a first-chunk conv tail holds 1 frame, later ones 2; the
temporal upsampler stores a marker instead of a tensor), so the ``first`` graph pads each slot to
the ``step`` shape with leading zero frames, and emits zeros for the marker. That is exact: a
causal conv's front padding is zeros, so "no history" and "zero history" give the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lance_deploy.model.vae import WanVAE
from lance_deploy.model.vae_blocks import StreamCache, patchify, unpatchify


class SlotCache(StreamCache):
    """A `StreamCache` whose slots are handed in (graph inputs) and read back (graph outputs)."""

    def __init__(self, slots: tuple[Tensor, ...] = (), chunks_done: int = 0):
        super().__init__()
        self.slots: list = list(slots)
        self.cursor = 0
        self.chunks_done = chunks_done

    def start_chunk(self) -> None:
        self.cursor = 0

    def read(self):
        if self.cursor == len(self.slots):
            self.slots.append(None)
        return self.slots[self.cursor]

    def write(self, value) -> None:
        self.slots[self.cursor] = value
        self.cursor += 1


def _fit(slot, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Pad a first-chunk slot to the step-slot `shape` with leading zero frames (dim 2)."""
    if not isinstance(slot, Tensor):  # the temporal upsampler's "first chunk done" marker
        return like.new_zeros(shape)
    missing = shape[2] - slot.shape[2]
    return F.pad(slot, (0, 0, 0, 0, missing, 0)) if missing else slot


class _VAEChunk(nn.Module):
    """Shared plumbing: run one chunk of a stream with tensor slots."""

    def __init__(self, vae: WanVAE, slot_shapes: list[tuple[int, ...]] | None):
        super().__init__()
        self.vae = vae
        self.slot_shapes = slot_shapes  # None for a step graph (slots pass through unchanged)

    def _slots_out(self, cache: SlotCache, like: Tensor) -> list[Tensor]:
        if self.slot_shapes is None:
            return cache.slots
        return [_fit(s, shape, like) for s, shape in zip(cache.slots, self.slot_shapes)]


class DecoderChunkGraph(_VAEChunk):
    """Normalised latent tile [1, 48, 1, h, w] (+ slots) -> unclamped pixels [1, 3, T, 16h, 16w] (+ slots).

    T = 1 for the ``first`` graph and 4 for ``step``. Denormalisation and the 1x1x1 `conv2` are
    inside; clamping is left to the caller (after tile blending).
    """

    def forward(self, z: Tensor, *slots: Tensor):
        vae, first = self.vae, self.slot_shapes is not None
        x = vae.conv2(vae.denormalize(z).to(z.dtype))
        cache = SlotCache(slots, chunks_done=0 if first else 1)
        pixels = unpatchify(vae.decoder(x, cache, first_chunk=first))
        return (pixels, *self._slots_out(cache, z))


class EncoderChunkGraph(_VAEChunk):
    """Pixel tile [1, 3, T, H, W] in [-1, 1] (+ slots) -> (normalised latent, log_var) [1, 48, 1, H/16, W/16] (+ slots).

    T = 1 for the ``first`` graph and 4 for ``step``.
    """

    def forward(self, pixels: Tensor, *slots: Tensor):
        vae, first = self.vae, self.slot_shapes is not None
        cache = SlotCache(slots, chunks_done=0 if first else 1)
        mu, log_var = vae.conv1(vae.encoder(patchify(pixels), cache)).chunk(2, dim=1)
        return (vae.normalize(mu).to(pixels.dtype), log_var, *self._slots_out(cache, pixels))


def make_exportable(vae: WanVAE) -> WanVAE:
    """Swap the decoder's ``nearest-exact`` 2x upsamplers for ``nearest`` ones, in place.

    The legacy ONNX exporter has no lowering for ``aten::_upsample_nearest_exact2d``; at an integer
    scale of 2 both modes pick source pixel ``dst // 2``, so the swap is bit-identical (checked in
    the tests) and lowers to a plain ONNX ``Resize`` that TensorRT supports. Use it only on a VAE
    loaded for export: the reference that `verify` compares against is a fresh, unmodified load.
    """
    for module in vae.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.Upsample) and child.mode == "nearest-exact":
                if tuple(float(s) for s in child.scale_factor) != (2.0, 2.0):
                    raise ValueError(f"cannot replace nearest-exact upsampling by {child.scale_factor}")
                setattr(module, name, nn.Upsample(scale_factor=2.0, mode="nearest"))
    return vae


def step_slot_shapes(graph_cls: type[_VAEChunk], vae: WanVAE, first_input: Tensor, step_input: Tensor):
    """Run two chunks eagerly and return the slot shapes a ``step`` graph reads and writes."""
    with torch.no_grad():
        cache = SlotCache()
        # Run the model code directly: the first chunk fills the slots, the second fixes their shapes.
        for chunk, first in ((first_input, True), (step_input, False)):
            cache.start_chunk()
            cache.chunks_done = 0 if first else 1
            if issubclass(graph_cls, DecoderChunkGraph):
                vae.decoder(vae.conv2(chunk), cache, first_chunk=first)
            else:
                vae.encoder(patchify(chunk), cache)
    return [tuple(s.shape) for s in cache.slots]
