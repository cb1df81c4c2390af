"""The offline corpora: deterministic, hashed, split, with the unigram-entropy floor."""

from __future__ import annotations

import hashlib
import math
import sys

import numpy as np
import pytest
import torch

from suite.config import ConfigError, DataConfig, check_section
from suite.run.data import (
    STDLIB_BUILD,
    STDLIB_SHA256,
    STDLIB_VERSION,
    Batches,
    load_corpus,
    stdlib_files,
    stdlib_source_bytes,
    unigram_entropy,
)


def test_unigram_entropy_by_hand():
    tokens = np.array([0, 0, 1, 2], dtype=np.uint8)  # p = 1/2, 1/4, 1/4
    assert unigram_entropy(tokens, 4) == pytest.approx(
        -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))
    )


def test_stdlib_corpus_is_real_python_and_deterministic():
    assert len(stdlib_files()) > 100
    a = load_corpus(DataConfig(max_bytes=100_000))
    b = load_corpus(DataConfig(max_bytes=100_000))
    assert a.sha256 == b.sha256 and a.vocab_size == 256
    assert a.num_tokens == 100_000 and len(a.val) == 100_000 - len(a.train)
    assert 0.05 < len(a.val) / a.num_tokens < 0.5
    assert b"def " in a.train.tobytes()
    assert 2.0 < a.unigram_entropy < math.log(256)


def test_the_stdlib_corpus_is_the_same_text_under_any_python(tmp_path, monkeypatch):
    """The default corpus is pinned (shipped with the suite): a machine whose Python has another
    library trains on the same bytes, so its cells and the shipped reference are comparable."""
    other_python = tmp_path / "lib"
    other_python.mkdir()
    (other_python / "abc.py").write_text("# qzx: not the pinned corpus\n" * 1000)
    monkeypatch.setattr("suite.run.data.sysconfig.get_paths", lambda: {"stdlib": other_python})
    corpus = load_corpus(DataConfig())
    assert corpus.sha256 == STDLIB_SHA256 and corpus.num_tokens == 4_000_000
    assert b"qzx" not in corpus.train.tobytes()
    shorter = load_corpus(DataConfig(max_bytes=100_000))  # a prefix of the same text
    assert shorter.train.tobytes()[:1000] == corpus.train.tobytes()[:1000]


@pytest.mark.skipif(
    sys.version_info[:3] != STDLIB_VERSION or sys.base_prefix != STDLIB_BUILD,
    reason="only the Python build the corpus was read from",
)
def test_the_pinned_corpus_is_this_pythons_library_as_read_before_it_was_pinned():
    """Under the Python that trained the documented tables and the reference, the pinned bytes
    are those the suite read from its library before, so every cell trained there keeps its id
    and its numbers."""
    assert hashlib.sha256(stdlib_source_bytes()).hexdigest() == STDLIB_SHA256


def test_a_stdlib_corpus_larger_than_the_shipped_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.max_bytes: must be at most 4000000"):
        check_section("data", DataConfig(max_bytes=5_000_000))
    check_section("data", DataConfig(source="text", path=__file__, max_bytes=5_000_000))


def test_text_file_source(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"abab" * 100)
    corpus = load_corpus(DataConfig(source="text", path=str(path)))
    assert corpus.vocab_size == 256 and corpus.unigram_entropy == pytest.approx(math.log(2))
    assert corpus.name == "tiny.txt"


def test_uint16_token_file_source(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    corpus = load_corpus(DataConfig(source="tokens", path=str(path)))
    assert corpus.vocab_size == 1000 and len(corpus.train) == 900
    assert int(corpus.train[5]) == 5
    with pytest.raises(ConfigError, match="data.vocab_size"):
        load_corpus(DataConfig(source="tokens", path=str(path), vocab_size=10))


def test_batches_are_reproducible_shifted_windows():
    tokens = np.arange(500, dtype=np.uint16)
    x1, y1 = Batches(tokens, 16, 4, seed=3).next(torch.device("cpu"))
    x2, y2 = Batches(tokens, 16, 4, seed=3).next(torch.device("cpu"))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 16) and x1.dtype == torch.int64
    assert torch.equal(y1[:, :-1], x1[:, 1:])  # next-token targets
    assert torch.equal(y1 - x1, torch.ones_like(x1))


def test_sequence_longer_than_split_is_a_config_error():
    with pytest.raises(ConfigError, match="model.seq_len"):
        Batches(np.arange(10, dtype=np.uint16), 16, 2, seed=0)


def test_interleaved_split_samples_the_whole_corpus():
    from suite.run.data import interleaved_split

    tokens = np.arange(20 * 65536, dtype=np.int64)
    train, val = interleaved_split(tokens, 0.1)
    assert len(val) == 2 * 65536 and len(train) == 18 * 65536
    assert val[0] == 9 * 65536 and val[-1] == len(tokens) - 1  # blocks 9 and 19
    assert set(val[::65536] // 65536) == {9, 19}
    assert not np.intersect1d(train, val).size


def test_stdlib_corpus_has_no_codec_tables():
    corpus = load_corpus(DataConfig())
    assert corpus.num_tokens == 4_000_000
    assert b"Codec APIs" not in corpus.train.tobytes()  # the header of every encodings/cp*.py
    assert abs(corpus.unigram_entropy - corpus.val_unigram_entropy) < 0.15
