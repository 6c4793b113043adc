"""Typed views of the release's `llm_config.json` and the ViT `config.json`.

The release config is a stock Qwen2.5-VL config; the Lance structure (MoT twin
experts, QK-norm, untied lm_head, 3-D MRoPE) is switched on by code, as upstream
does, so none of it is read from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lance_deploy.core import jsonio
from lance_deploy.core.errors import CheckpointError
from lance_deploy.core.schema import SchemaError, expect, expect_int, expect_ints, expect_number, fail

MAX_LAYERS = 1024
"""No Lance-shaped model comes near it; a larger count is a corrupt file, not a plan to make."""
MAX_WIDTH = 1 << 16  # hidden / intermediate sizes
MAX_VOCAB = 1 << 22
MAX_CONFIG_BYTES = 16 * 1024 * 1024

# field -> (lo, hi) of the int fields each from_dict reads; floats and tuples are checked by hand
_VISION_INTS = {"depth": (1, MAX_LAYERS), "hidden_size": (1, MAX_WIDTH), "num_heads": (1, MAX_WIDTH),
                "intermediate_size": (1, MAX_WIDTH), "out_hidden_size": (1, MAX_WIDTH), "patch_size": (1, 1024),
                "temporal_patch_size": (1, 64), "spatial_merge_size": (1, 64), "window_size": (1, 1 << 20),
                "tokens_per_second": (1, 1000), "in_chans": (1, 64)}
_LLM_INTS = {"hidden_size": (1, MAX_WIDTH), "intermediate_size": (1, MAX_WIDTH), "num_hidden_layers": (1, MAX_LAYERS),
             "num_attention_heads": (1, MAX_WIDTH), "num_key_value_heads": (1, MAX_WIDTH),
             "vocab_size": (1, MAX_VOCAB)}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id", "video_token_id")


def _read_json(path: Path, what: str) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (expected the release {what})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    return parse_json(raw, str(path))


def parse_json(raw: bytes, where: str) -> Any:
    """A config document's JSON, bounded (``core.jsonio``); errors are CheckpointErrors naming ``where``."""
    return jsonio.loads(raw, where, max_bytes=MAX_CONFIG_BYTES, error=CheckpointError)


def _ints(d: dict, table: dict[str, tuple[int, int]], where: str) -> dict[str, int]:
    return {k: expect_int(d[k], where + k, *table[k]) for k in table if k in d}


def _divides(part: int, whole: int, where: str, what: str) -> None:
    if whole % part:
        raise fail(where, f"{part} does not divide {what} {whole}")


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
    def from_dict(cls, d: Any, where: str = "") -> "VisionConfig":
        """Typed read of the fields Lance uses (others are ignored); SchemaError names the field."""
        expect(d, (dict,), where.rstrip(".") or "top level", "a JSON object")
        kw: dict[str, Any] = _ints(d, _VISION_INTS, where)
        if "fullatt_block_indexes" in d:
            kw["fullatt_block_indexes"] = expect_ints(d["fullatt_block_indexes"], where + "fullatt_block_indexes",
                                                      0, kw.get("depth", cls.depth) - 1)
        cfg = cls(**kw)
        _divides(cfg.num_heads, cfg.hidden_size, where + "num_heads", "hidden_size")
        if cfg.window_size % (cfg.patch_size * cfg.spatial_merge_size):
            raise fail(where + "window_size", f"{cfg.window_size} is not a multiple of patch_size x "
                       f"spatial_merge_size ({cfg.patch_size * cfg.spatial_merge_size})")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "VisionConfig":
        """The standalone ViT's ``config.json``; any problem is one CheckpointError naming the file."""
        path = Path(path)
        try:
            return cls.from_dict(_read_json(path, "Qwen2.5-VL-ViT config.json"))
        except SchemaError as e:
            raise CheckpointError(f"{path}: {e}") from None

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
    def from_dict(cls, d: Any) -> "LLMConfig":
        """Typed read of the fields Lance uses (a stock Qwen2.5-VL config has many more, ignored);
        SchemaError names the field and what was expected."""
        expect(d, (dict,), "top level", "a JSON object")
        kw: dict[str, Any] = _ints(d, _LLM_INTS, "")
        vocab = kw.get("vocab_size", cls.vocab_size)
        kw.update({k: expect_int(d[k], k, 0, vocab - 1) for k in _TOKEN_IDS if k in d})
        if "rms_norm_eps" in d:
            kw["rms_norm_eps"] = expect_number(d["rms_norm_eps"], "rms_norm_eps", 0.0, 1.0)
        if "rope_theta" in d:
            kw["rope_theta"] = expect_number(d["rope_theta"], "rope_theta", 0.0, 1e12)
        scaling = d.get("rope_scaling")
        if scaling is not None:
            expect(scaling, (dict,), "rope_scaling", "an object such as {\"type\": \"mrope\", \"mrope_section\": [...]}")
            if "mrope_section" in scaling:
                kw["mrope_section"] = expect_ints(scaling["mrope_section"], "rope_scaling.mrope_section", 1,
                                                  MAX_WIDTH, length=3)
        if "vision_config" in d:
            kw["vision"] = VisionConfig.from_dict(d["vision_config"], "vision_config.")
        cfg = cls(**kw)
        _divides(cfg.num_attention_heads, cfg.hidden_size, "num_attention_heads", "hidden_size")
        _divides(cfg.num_key_value_heads, cfg.num_attention_heads, "num_key_value_heads", "num_attention_heads")
        if 2 * sum(cfg.mrope_section) != cfg.head_dim:
            raise fail("rope_scaling.mrope_section", f"{list(cfg.mrope_section)} must sum to head_dim / 2 = "
                       f"{cfg.head_dim / 2:g} (hidden_size / num_attention_heads / 2)")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "LLMConfig":
        """``llm_config.json``; any problem is one CheckpointError naming the file and the field."""
        path = Path(path)
        return cls.from_json(_read_json(path, "llm_config.json"), str(path))

    @classmethod
    def from_json(cls, data: Any, where: str) -> "LLMConfig":
        """``from_dict`` for an already parsed document, errors prefixed with ``where``."""
        try:
            return cls.from_dict(data)
        except SchemaError as e:
            raise CheckpointError(f"{where}: {e}") from None

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
