"""Check a Wan2.2 VAE key table (a ``.pth`` state dict, or an artifact's ``vae.*`` records) against
the shapes ``make_vae.derived_vae_shapes`` derives from its two widths, part by part.

A t2i/t2v run needs only the decoder (``decoder.*`` + ``conv2.*``), an edit also the encoder
(``encoder.*`` + ``conv1.*``); ``names.component_of`` says which key belongs to which part.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lance_deploy.checkpoint.make_vae import DIM_MULT, derived_vae_shapes
from lance_deploy.checkpoint.names import check_keys, component_of
from lance_deploy.core.errors import CheckpointError

PARTS = {"encoder": "vae_encoder", "decoder": "vae_decoder"}
_FIRST_CONV = {"encoder": "encoder.conv1.weight", "decoder": "decoder.conv1.weight"}
_DEFAULT_DIMS = {"encoder": 160, "decoder": 256}  # the release widths, for a part not loaded


def _shape(v) -> tuple[int, ...]:
    return tuple(getattr(v, "shape", v))


def vae_dims(table: Mapping, source: str, parts: tuple[str, ...] = tuple(PARTS)) -> tuple[int, int]:
    """(enc_dim, dec_dim) from the first conv of each part in ``parts`` (others: release default)."""
    dims = dict(_DEFAULT_DIMS)
    for part in parts:
        key = _FIRST_CONV[part]
        shape = _shape(table[key]) if key in table else None
        mult = DIM_MULT[-1] if part == "decoder" else 1
        if shape is None or len(shape) != 5 or shape[0] < mult or shape[0] % mult:
            found = "missing" if shape is None else f"has shape {list(shape)}"
            raise CheckpointError(f"{source}: {key} {found}; expected [C, in, 3, 3, 3] with C a positive "
                                  f"multiple of {mult} (the first conv of the Wan2.2 VAE {part})")
        dims[part] = shape[0] // mult
    return dims["encoder"], dims["decoder"]


def check_vae_table(table: Mapping, source: str, parts: tuple[str, ...] = tuple(PARTS)) -> tuple[int, int]:
    """Refuse an empty table, a missing part, or missing / unexpected / mis-shaped / integer keys of
    the ``parts`` asked for (values: tensors or shapes). Returns (enc_dim, dec_dim)."""
    unknown = [p for p in parts if p not in PARTS]
    if not parts or unknown:
        raise ValueError(f"parts must be a non-empty subset of {tuple(PARTS)}, got {parts}")
    if not table:
        raise CheckpointError(f"{source}: holds no tensors; expected the Wan2.2 VAE state dict")
    for part in parts:
        if not any(component_of(k) == PARTS[part] for k in table):
            raise CheckpointError(f"{source}: no VAE {part} tensors ({_FIRST_CONV[part].split('.')[0]}.*); "
                                  f"expected the Wan2.2 VAE state dict")
    enc, dec = vae_dims(table, source, parts)
    wanted = {PARTS[p] for p in parts}
    full = len(wanted) == len(PARTS)  # the whole file: any key outside the table is refused too
    expected = {k: s for k, s in derived_vae_shapes(enc, dec).items() if component_of(k) in wanted}
    have = {k: v for k, v in table.items() if full or component_of(k) in wanted}
    check_keys(have, expected, source)
    return enc, dec


def check_vae_file(path: str | Path) -> tuple[int, int]:
    """Open ``Wan2.2_VAE.pth`` (pickle index only) and check every key of both parts."""
    from lance_deploy.checkpoint.loader import load_vae_state_dict

    return check_vae_table(load_vae_state_dict(path), str(path))
