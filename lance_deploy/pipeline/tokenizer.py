"""The Qwen2 byte-level BPE tokenizer that Lance ships, behind a small wrapper.

Upstream uses the slow `Qwen2Tokenizer` (vocab.json + merges.txt); the release
also carries `tokenizer.json`, which encodes identically and is much faster, so it
is preferred. The ids Lance needs (`<|im_start|>`, `<|vision_start|>`, ...) are
looked up by token string, never taken from the LLM config: the config's ids are
those of the real vocabulary and would be wrong for any other one.
"""

from __future__ import annotations

import json
from pathlib import Path

from lance_deploy.core.errors import CheckpointError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
IMAGE_PAD = "<|image_pad|>"

# Qwen2 pre-tokenizer split pattern (identical to Qwen2Tokenizer's PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The 22 Qwen2.5 added tokens, in id order right after the BPE vocabulary. Only used
# when a folder has neither tokenizer.json nor a tokenizer_config.json to read them from.
# The first 14 are "special" (skipped by decode(skip_special_tokens=True)).
QWEN2_ADDED_TOKENS = (
    ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", VISION_START, VISION_END, "<|vision_pad|>",
    IMAGE_PAD, VIDEO_PAD, "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
_N_SPECIAL_QWEN2 = 14


class LanceTokenizer:
    """Encode/decode text for Lance; exposes the ids of the tokens the sequence builder needs.

    Attributes (ints): `im_start`, `im_end`, `endoftext` (also `pad`), `vision_start`,
    `vision_end`, `video_pad` (the pad of every vision block, images included), `image_pad`.
    """

    def __init__(self, backend, source: Path):
        self._tok = backend
        self.source = Path(source)
        self.im_start = self._require(IM_START)
        self.im_end = self._require(IM_END)
        self.endoftext = self._require(ENDOFTEXT)
        self.vision_start = self._require(VISION_START)
        self.vision_end = self._require(VISION_END)
        self.video_pad = self._require(VIDEO_PAD)
        self.image_pad = self._require(IMAGE_PAD)

    @property
    def pad(self) -> int:
        """The pad id upstream appends after an x2t prompt (`<|endoftext|>`)."""
        return self.endoftext

    @classmethod
    def from_dir(cls, path) -> "LanceTokenizer":
        """Load from a checkpoint folder: `tokenizer.json`, else `vocab.json` + `merges.txt`."""
        folder = Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: tokenizer folder not found")
        fast = folder / "tokenizer.json"
        if fast.is_file():
            return cls(_load_fast(fast), folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls(_build_from_vocab_merges(folder), folder)
        raise CheckpointError(
            f"{folder}: no tokenizer found (expected tokenizer.json, or vocab.json + merges.txt)"
        )

    @classmethod
    def from_json(cls, raw: bytes, source: Path) -> "LanceTokenizer":
        """From the bytes of a `tokenizer.json` already read (an artifact's, hash-checked)."""
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the Rust side raises a plain Exception on any parse error
            raise CheckpointError(f"{source}: cannot be read as a tokenizers JSON file ({str(e)[:200]})") from None
        return cls(backend, Path(source).parent)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added, special-token strings map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (special tokens kept unless `skip_special_tokens`)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string, or None when it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def __len__(self) -> int:
        """`len(tokenizer)` as upstream sees it: BPE vocabulary plus added tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _require(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise CheckpointError(f"{self.source}: tokenizer has no {token!r} token (not a Qwen2 tokenizer?)")
        return tid


def _load_fast(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a plain Exception on any parse error
        raise CheckpointError(f"{path}: cannot be read as a tokenizers JSON file ({e})") from None


def _build_from_vocab_merges(folder: Path):
    """Rebuild the fast tokenizer the way the slow Qwen2Tokenizer behaves."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    try:
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as e:
        raise CheckpointError(f"{folder}: vocab.json/merges.txt cannot be read ({e})") from None
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    _add_tokens(tok, _added_tokens(folder, tok.get_vocab_size()), folder)
    return tok


def _added_tokens(folder: Path, vocab_size: int) -> list[tuple[int, str, bool]]:
    """(id, content, special) of the added tokens: tokenizer_config.json, else the Qwen2.5 list."""
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            decoder = json.loads(cfg.read_text()).get("added_tokens_decoder") or {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
        if decoder:
            return sorted((int(k), v["content"], bool(v.get("special", True))) for k, v in decoder.items())
    return [(vocab_size + i, t, i < _N_SPECIAL_QWEN2) for i, t in enumerate(QWEN2_ADDED_TOKENS)]


def _add_tokens(tok, entries: list[tuple[int, str, bool]], folder: Path) -> None:
    from tokenizers import AddedToken

    for tid, content, special in entries:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                           special=special)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        # The tokenizers library numbers added tokens itself; they must land on the ids
        # the checkpoint's embedding rows were trained with.
        if tok.token_to_id(content) != tid:
            raise CheckpointError(
                f"{folder}: added token {content!r} got id {tok.token_to_id(content)}, expected {tid} "
                "(vocab.json and the added-token ids do not line up)"
            )
