"""Shared test fixtures. Real data is read from $PICOCHAT_DATA_DIR (CI points it at ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real-data folder. Missing data is a failure, not a skip: the tests are about real data."""
    # Absolute: tests link shards into temporary folders, where a relative path (../shared/data) would dangle.
    candidate = Path(os.environ.get("PICOCHAT_DATA_DIR") or REPO_ROOT.parent / "shared" / "data").resolve()
    if not (candidate / "pretrain").is_dir():
        pytest.fail(f"real data not found at {candidate}: set PICOCHAT_DATA_DIR to the shared data folder")
    return candidate


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own PICOCHAT_HOME so nothing touches ~/.cache/picochat, and no progress bars."""
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path_factory.mktemp("picochat_home")))
    monkeypatch.setenv("PICOCHAT_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the length of a test file: tiny models run fastest that way (no OpenMP barriers),
    and on a busy shared CPU two threads can be 50x slower. A file opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    """The tiny Wikipedia BPE most model tests use (helpers.wiki_tokenizer). A test file that needs another
    tokenizer defines its own `tokenizer` fixture, which takes precedence over this one."""
    from helpers import wiki_tokenizer

    return wiki_tokenizer(data_dir)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, data_dir):
    """A saved 512-token BPE of 300 Wikipedia documents, for tests that run `picochat pretrain` (copy it into a
    run with helpers.new_run)."""
    from picochat.data import iter_documents
    from picochat.tokenizer import Tokenizer

    texts = []
    for text, _ in iter_documents([data_dir / "pretrain" / "wikipedia_en" / "shard_00000.parquet"]):
        texts.append(text[:2000])
        if len(texts) == 300:
            break
    folder = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    Tokenizer.train(texts, vocab_size=512).save(folder)
    return folder
