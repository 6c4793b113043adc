"""Typed views of the release's `llm_config.json` and the ViT `config.json`.

The release config is a stock Qwen2.5-VL config; the Lance structure (MoT twin
experts, QK-norm, untied lm_head, 3-D MRoPE) is switched on by code, as upstream
does, so none of it is read from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lance_deploy.core.errors import CheckpointError


@dataclass(frozen=True)
class VisionConfig:
    """Qwen2.5-VL vision encoder hyper-parameters."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 2048
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    in_chans: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in names}
        if "fullatt_block_indexes" in kw:
            kw["fullatt_block_indexes"] = tuple(kw["fullatt_block_indexes"])
        return cls(**kw)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        d["spatial_patch_size"] = self.patch_size
        d["hidden_act"] = "silu"
        d["model_type"] = "qwen2_5_vl"
        return d


@dataclass(frozen=True)
class LLMConfig:
    """The Qwen2-shaped backbone of each Lance expert."""

    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    video_token_id: int = 151656
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LLMConfig":
        names = {f for f in cls.__dataclass_fields__} - {"mrope_section", "vision"}
        kw = {k: v for k, v in d.items() if k in names}
        scaling = d.get("rope_scaling") or {}
        if "mrope_section" in scaling:
            kw["mrope_section"] = tuple(scaling["mrope_section"])
        if "vision_config" in d:
            kw["vision"] = VisionConfig.from_dict(d["vision_config"])
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | Path) -> "LLMConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found (expected the release llm_config.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except TypeError as e:
            raise CheckpointError(f"{path}: unexpected config fields ({e})") from None

    def to_dict(self) -> dict:
        """Serialise in the release (Qwen2.5-VL) format."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("mrope_section", "vision")}
        d.update(
            architectures=["Qwen2_5_VLForConditionalGeneration"],
            model_type="qwen2_5_vl",
            hidden_act="silu",
            attention_dropout=0.0,
            max_position_embeddings=128000,
            tie_word_embeddings=True,
            torch_dtype="bfloat16",
            use_sliding_window=False,
            rope_scaling={"type": "mrope", "mrope_section": list(self.mrope_section)},
            vision_config=self.vision.to_dict(),
        )
        return d


TINY_LLM = LLMConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=448, mrope_section=(2, 3, 3),
    bos_token_id=400, eos_token_id=402, vision_start_token_id=409, vision_end_token_id=410,
    video_token_id=413,
    vision=VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                        fullatt_block_indexes=(1,)),
)
"""The tiny shape used by the golden fixtures and by `make-checkpoint --tiny`."""

FULL_LLM = LLMConfig()
"""The release shape."""
