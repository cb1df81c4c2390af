"""Offline, deterministic language-modelling data.

Three sources, all giving a 1-D array of token ids split into train and validation:

- ``stdlib``: byte-level LM on Python 3.11.7's standard-library sources, the first 4 MB of them,
  shipped with the suite (``suite/run/corpus/``, xz, 0.76 MB): the same bytes under every Python
  on every machine, so a result and the shipped reference do not depend on which Python trains;
- ``text``: byte-level LM on any text file;
- ``tokens``: a pre-tokenized uint16 ``.bin`` file (the nanoGPT format).

The unigram entropy of the training split is the loss a model reaches by predicting token
frequencies alone: the floor a model must beat to have learned anything from context.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from suite.config import STDLIB_CORPUS_BYTES, ConfigError, DataConfig

# Directories of the standard library that are not ordinary library source: third-party and
# test code, codec tables (encodings/) and generated documentation strings (pydoc_data/).
_STDLIB_SKIP = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "__pycache__",
    "encodings",
    "pydoc_data",
}
# The pinned corpus: what ``stdlib_source_bytes`` read from one build of Python 3.11.7, the one
# that trained the documented tables and the shipped reference (see corpus/README.md).
STDLIB_CORPUS = Path(__file__).with_name("corpus") / "python-3.11.7-stdlib.xz"
STDLIB_VERSION = (3, 11, 7)
STDLIB_BUILD = "/root/.pyenv/versions/3.11.7"  # its prefix: two files of the corpus name it
STDLIB_SHA256 = "d69197e8176f67247d6dc4648143804cdb0cfd87aa27d85dda014e2fb36eb0a7"
_SPLIT_BLOCK = 1 << 16  # tokens per block of the interleaved train/validation split
_VAL_SEED = 1234  # every cell is evaluated on the same validation batches


@dataclass
class Corpus:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    name: str
    sha256: str
    unigram_entropy: float  # nats per token, training split
    val_unigram_entropy: float  # the same for the validation split (compare val losses to it)

    @property
    def num_tokens(self) -> int:
        return len(self.train) + len(self.val)


def stdlib_files() -> list[Path]:
    """The running Python's library sources, in the order the corpus concatenates them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not _STDLIB_SKIP.intersection(p.relative_to(root).parts)
    )


def stdlib_source_bytes(max_bytes: int = STDLIB_CORPUS_BYTES) -> bytes:
    """The first ``max_bytes`` of the running Python's library sources: how the pinned corpus
    was made (``scripts/pin_stdlib_corpus.py``), and what the suite trained on before it was
    pinned (the same bytes under the build :data:`STDLIB_BUILD`)."""
    chunks, total = [], 0
    for path in stdlib_files():
        chunk = path.read_bytes()
        chunks.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def stdlib_bytes(max_bytes: int) -> bytes:
    """The first ``max_bytes`` of the pinned corpus (``data.max_bytes`` is checked to be at most
    :data:`STDLIB_CORPUS_BYTES` with the config)."""
    return lzma.decompress(STDLIB_CORPUS.read_bytes())[:max_bytes]


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def load_corpus(cfg: DataConfig) -> Corpus:
    if cfg.source == "stdlib":
        raw = stdlib_bytes(cfg.max_bytes)
        tokens, vocab, name = np.frombuffer(raw, dtype=np.uint8), 256, "python-stdlib"
        digest = hashlib.sha256(raw).hexdigest()
    else:
        path = Path(cfg.path or "")
        if not path.is_file():
            raise ConfigError(f"data.path: no such file {str(path)!r}")
        if cfg.source == "text":
            raw = path.read_bytes()
            tokens, vocab = np.frombuffer(raw, dtype=np.uint8), 256
            digest = hashlib.sha256(raw).hexdigest()
        else:
            tokens = np.memmap(path, dtype=np.uint16, mode="r")
            vocab = cfg.vocab_size or int(tokens.max()) + 1
            if int(tokens.max()) >= vocab:
                raise ConfigError(
                    f"data.vocab_size: {vocab} is too small for token id {int(tokens.max())}"
                )
            digest = _file_sha256(path)
        name = path.name
    if cfg.source == "tokens":
        # nanoGPT-style .bin files can be larger than memory: hold out the tail, no copy.
        split = int(len(tokens) * (1 - cfg.val_fraction))
        train, val = tokens[:split], tokens[split:]
    else:
        train, val = interleaved_split(tokens, cfg.val_fraction)
    if len(train) < 2 or len(val) < 2:
        key = "data.max_bytes" if cfg.source == "stdlib" else "data.path"
        if len(tokens) >= 40:  # enough tokens: the split left one side (nearly) empty
            key = "data.val_fraction"
        raise ConfigError(
            f"{key}: the corpus ({len(tokens)} tokens) split at data.val_fraction="
            f"{cfg.val_fraction:g} leaves {len(train)} training and {len(val)} validation tokens"
        )
    return Corpus(
        train,
        val,
        vocab,
        name,
        digest,
        unigram_entropy(np.asarray(train), vocab),
        unigram_entropy(np.asarray(val), vocab),
    )


def interleaved_split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Every ~1/val_fraction-th block of 64 Ki tokens goes to validation, the rest to training,
    so both splits sample the whole corpus (a tail split of sorted files would validate on
    whichever package happens to sort last)."""
    blocks = range(0, len(tokens), _SPLIT_BLOCK)
    is_val = [
        math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)
        for i in range(len(blocks))
    ]
    if not any(is_val) or all(is_val):  # a corpus of one block: fall back to a tail split
        split = int(len(tokens) * (1 - val_fraction))
        return tokens[:split], tokens[split:]
    pick = [tokens[start : start + _SPLIT_BLOCK] for start in blocks]
    train = np.concatenate([b for b, v in zip(pick, is_val, strict=True) if not v])
    val = np.concatenate([b for b, v in zip(pick, is_val, strict=True) if v])
    return train, val


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Batches:
    """Random contiguous windows of ``seq_len + 1`` tokens, reproducible from a seed."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        if len(tokens) <= seq_len + 1:
            raise ConfigError(
                f"model.seq_len: {seq_len} is too long for a split of {len(tokens)} tokens"
            )
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rng = np.random.default_rng(seed)
        self._offsets = np.arange(seq_len + 1)

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        window = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        window = window.to(device, non_blocking=True)
        return window[:, :-1], window[:, 1:]


def validation_batches(
    corpus: Corpus, seq_len: int, batch_size: int, count: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = Batches(corpus.val, seq_len, batch_size, _VAL_SEED)
    return [batches.next(device) for _ in range(count)]
