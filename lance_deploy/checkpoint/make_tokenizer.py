"""A tiny byte-level BPE tokenizer in the Qwen2 format, built from scratch.

Random checkpoints need a tokenizer whose special-token ids match their
``llm_config.json``; the real Qwen2.5 vocabulary cannot be downloaded here. This
one has the Qwen2 structure (split regex, NFC, byte-level symbols, BPE merges,
the 22 Qwen2.5 added tokens in Qwen order) at a tiny size: ids 0-255 are the
byte symbols, merges up to id 399, added tokens at 400-421 - like the golden
fixture tokenizer. BPE is trained by our own deterministic loop (ties broken by
pair order) so the files are identical on every machine and tokenizers version.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

BPE_SIZE = 400
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
"""Qwen2.5 added tokens flagged special (ids 400-413 here)."""
EXTRA = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
         "<|repo_name|>", "<|file_sep|>")
"""Qwen2.5 added tokens not flagged special (ids 414-421 here)."""
TOKEN_IDS = {tok: BPE_SIZE + i for i, tok in enumerate(SPECIAL + EXTRA)}

# Our own small corpus. Role words are repeated so that, as in Qwen, `system`,
# `user` and `assistant` end up single tokens (the chat template relies on it).
_CHAT = "system\nYou are a helpful assistant.\nuser\n{q}\nassistant\n{a}\n"
_PAIRS = (
    ("Describe the image in detail.", "A red boat floats on a calm lake under a pale morning sky."),
    ("What happens in this video?", "A small dog runs across the garden, then jumps over a wooden fence."),
    ("Generate an image of a city at night.", "Tall buildings glow with warm windows while cars move below."),
    ("Make the sky purple and keep the rest.", "The sky is now purple; the trees and the river stay the same."),
    ("How many people are in the picture?", "There are 3 people: two adults and one child, all smiling."),
    ("Turn this photo into a watercolor painting.", "Soft colors blend at the edges, and the paper shows through."),
    ("Write a caption for the scene.", "Sunset over the mountains, with long shadows and a quiet road."),
    ("Animate the first frame for 5 seconds.", "The leaves move in the wind and the light slowly changes."),
)


def _corpus() -> str:
    return "".join(_CHAT.format(q=q, a=a) for q, a in _PAIRS) * 4


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_bpe(text: str, size: int = BPE_SIZE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE: 256 byte symbols, then the most frequent pair merged until ``size`` entries."""
    words = Counter(piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text))
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    seqs = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(vocab) < size:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            s = seqs[w]
            for pair in zip(s, s[1:]):
                pairs[pair] += n
        if not pairs:
            raise ValueError(f"corpus too small for a {size}-entry BPE vocabulary")
        best = min(pairs, key=lambda p: (-pairs[p], p))  # deterministic tie-break
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return vocab, merges


def build_tokenizer() -> tuple[Tokenizer, dict[str, int], list[tuple[str, str]]]:
    """The fast tokenizer plus its BPE vocab and merges (for vocab.json / merges.txt)."""
    vocab, merges = train_bpe(_corpus())
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                        byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for t in SPECIAL]
    added += [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
              for t in EXTRA]
    tok.add_tokens(added)
    for word in ("system", "user", "assistant"):
        if len(tok.encode(word).ids) != 1:  # the corpus guarantees it; fail loudly if someone edits it
            raise RuntimeError(f"tokenizer corpus no longer makes {word!r} a single token")
    for t, i in TOKEN_IDS.items():
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"added token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok, vocab, merges


def _tokenizer_config() -> dict:
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": t in SPECIAL} for t, i in TOKEN_IDS.items()}
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": list(SPECIAL[1:]), "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def write_tokenizer(folder: Path, with_config: bool) -> None:
    """Write tokenizer.json, vocab.json, merges.txt (+ tokenizer_config.json) into ``folder``."""
    tok, vocab, merges = build_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    if with_config:
        (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n",
                                                      encoding="utf-8")
