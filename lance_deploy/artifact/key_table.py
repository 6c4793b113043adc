"""Every tensor an artifact stores must be a release tensor of the shape its own llm_config.json
gives (``checkpoint/names.py``; the VAE's from its first convs, ``checkpoint/vae_keys.py``).

A tensor may be absent (a recipe can skip one; the loader names it when a task needs it), but
never unknown or of another shape: a manifest edited to claim [64, 128] where the model needs
[128, 64] is refused when the artifact is opened, not as a shape error deep in a forward pass.
"""

from __future__ import annotations

from lance_deploy.artifact.manifest import ArtifactError, ArtifactManifest
from lance_deploy.checkpoint import canonical as cn
from lance_deploy.checkpoint.make_vae import derived_vae_shapes
from lance_deploy.checkpoint.names import (
    component_of,
    expected_llm_shapes,
    expected_vit_shapes,
    key_mismatches,
)
from lance_deploy.checkpoint.vae_keys import PARTS, vae_dims
from lance_deploy.config import LLMConfig
from lance_deploy.core.errors import CheckpointError


def expected_shapes(cfg: LLMConfig, vae: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of everything an artifact of ``cfg`` may store; the VAE widths come
    from the stored ``vae`` table (release defaults for a part it lacks)."""
    out = {cn.to_canonical(k): s for k, s in expected_llm_shapes(cfg).items()}
    out = {k: s for k, s in out.items() if k not in cn.IGNORED}
    out.update({"vit." + k: s for k, s in expected_vit_shapes(cfg.vision).items()})
    parts = tuple(p for p, comp in PARTS.items() if any(component_of(k) == comp for k in vae))
    try:
        enc, dec = vae_dims(vae, "vae", parts)
    except CheckpointError:
        enc, dec = vae_dims({}, "vae", ())  # the first conv itself is then reported as mis-shaped
    out.update({"vae." + k: s for k, s in derived_vae_shapes(enc, dec).items()})
    return out


def check_key_table(m: ArtifactManifest, cfg: LLMConfig, where: str) -> None:
    """ArtifactError naming the first few stored tensors that the model does not have."""
    have = {t.name: t.shape for t in m.tensors}
    vae = {k[4:]: s for k, s in have.items() if k.startswith("vae.")}
    bad = [p for p in key_mismatches(have, expected_shapes(cfg, vae)) if not p.startswith("missing")]
    if bad:
        more = f"; ... and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ArtifactError(f"{where}: {len(bad)} tensor records do not match the model's key table "
                            f"(from its llm_config.json): " + "; ".join(bad[:3]) + more)
