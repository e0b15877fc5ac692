"""Spelling: synthetic conversations that teach a token-based model what its tokens are made of.

A model sees "strawberry" as two or three tokens, not ten letters, so "how many r's are in strawberry?" is hard for
it. Two kinds of conversation, made up from a word list:

  - spell: "Spell the word "apple"." -> ... a-p-p-l-e (letters joined by "-": each "-x" is its own chunk for the
    tokenizer's split pattern, so the spelling is written one letter per token);
  - count: "How many r are in strawberry?" -> the model spells the word, finds the letter's positions itself, then
    checks with the python tool, `"strawberry".count("r")` (the calculator allows exactly this form), and ends
    with "#### 3", the same final-answer line as GSM8K.

Words: <data_dir>/words/words_alpha.txt.gz (370K lowercase words, one per line, CRLF). Most of them are rare
("aahed"), so by default only *common* words are used: words of 3-12 letters that occur at least `min_count`
times in a reference text, by default the first English Wikipedia training shard of the shared layout
(pretrain/wikipedia_en/shard_00000.parquet: ~13K such words). Without a reference text every 3-12 letter word is
used, with a warning.

Train and test never share a word: a word belongs to the test split when crc32(word) % 20 == 0 (about 5%).
Everything is deterministic: conversation i of (kind, split, seed) is built from its own random generator seeded
with those values, so task[i] is the same on every machine and in any order of access.
"""

from __future__ import annotations

import functools
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from picochat.common import PicochatError, open_text, resolve_data_dir, warn
from picochat.tasks.common import GENERATIVE, Task, data_file
from picochat.tasks.gsm8k import extract_answer

KINDS = ("mixed", "spell", "count")  # mixed: even indices spell, odd indices count
SPLITS = ("train", "test")
DEFAULT_REFERENCE = "pretrain/wikipedia_en/shard_00000.parquet"
MIN_LETTERS, MAX_LETTERS = 3, 12
MAX_REFERENCE_CHARACTERS = 20_000_000  # enough text to know which words are common; bounds the time spent
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
SPELLED = re.compile(r"\b[a-z](?:-[a-z])+\b")

SPELL_QUESTIONS = [
    'Spell the word "{word}".',
    "How do you spell {word}?",
    'Can you spell "{word}" letter by letter?',
    "spell {word}",
    'What letters make up the word "{word}"?',
    "Please spell out {word} for me.",
    "how is {word} spelled",
    'Write "{word}" one letter at a time.',
]
SPELL_ANSWERS = [
    '"{word}" is spelled {spelled}.',
    "Sure: {spelled}",
    'Letter by letter, "{word}" is {spelled}.',
    "{word} is spelled like this: {spelled}",
    "Here it is, one letter at a time: {spelled}",
]
COUNT_QUESTIONS = [
    'How many times does the letter "{letter}" appear in "{word}"?',
    "How many {letter}'s are in the word {word}?",
    'Count the letter {letter} in "{word}".',
    "how many {letter} in {word}",
    'How many "{letter}" are there in {word}?',
    "In the word {word}, how many times do you see the letter {letter}?",
]


class Spelling(Task):
    eval_type = GENERATIVE
    baseline = 0.0

    def __init__(
        self,
        kind: str = "mixed",
        split: str = "train",
        *,
        size: int = 2000,
        seed: int = 0,
        data_dir: str | os.PathLike | None = None,
        reference_files: Sequence[str | os.PathLike] | None = None,
        min_count: int = 3,
    ) -> None:
        """reference_files: texts (parquet / jsonl / txt) whose frequent words count as common; default the
        Wikipedia shard of the shared layout; [] uses every 3-12 letter word of the list."""
        if kind not in KINDS:
            raise PicochatError(f"spelling kind {kind!r}: expected one of {', '.join(KINDS)}")
        if split not in SPLITS:
            raise PicochatError(f"spelling split {split!r}: expected one of {', '.join(SPLITS)}")
        if not isinstance(size, int) or size < 1:
            raise PicochatError(f"spelling size must be a positive integer, got {size!r}")
        self.name = "spelling" if kind == "mixed" else f"spelling-{kind}"
        self.kind, self.split, self.size, self.seed = kind, split, size, seed
        word_list = data_file(data_dir, "words/words_alpha.txt.gz", "the English word list")
        if reference_files is None:
            default = resolve_data_dir(data_dir) / DEFAULT_REFERENCE
            if default.is_file():
                reference_files = [default]
            else:
                warn(f"{default} not found: spelling uses every {MIN_LETTERS}-{MAX_LETTERS} letter word, rare ones too")
                reference_files = []
        words = common_words(word_list, tuple(str(path) for path in reference_files), min_count)
        self.words = [word for word in words if (zlib.crc32(word.encode()) % 20 == 0) == (split == "test")]
        if not self.words:
            raise PicochatError(f"{word_list}: no usable words for the spelling {split} split")

    def __len__(self) -> int:
        return self.size

    def example(self, index: int) -> dict:
        # A string seed is hashed with SHA-512 by random.Random: stable across runs, machines and versions.
        rng = random.Random(f"picochat-spelling/{self.kind}/{self.split}/{self.seed}/{index}")
        word = rng.choice(self.words)
        kind = self.kind if self.kind != "mixed" else ("spell", "count")[index % 2]
        if kind == "spell":
            return _spell_conversation(word, rng)
        return _count_conversation(word, rng)

    def evaluate(self, conversation: dict, response: str) -> bool:
        if conversation["kind"] == "spell":
            # The last letter-hyphen-letter run of the response must be the word's spelling.
            runs = SPELLED.findall(response.lower())
            return bool(runs) and runs[-1] == spell(conversation["word"])
        return extract_answer(response) == conversation["answer"]


def spell(word: str) -> str:
    return "-".join(word)


def _spell_conversation(word: str, rng: random.Random) -> dict:
    question = rng.choice(SPELL_QUESTIONS).format(word=word)
    answer = rng.choice(SPELL_ANSWERS).format(word=word, spelled=spell(word))
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "kind": "spell",
        "word": word,
        "answer": spell(word),
    }


def _count_conversation(word: str, rng: random.Random) -> dict:
    # Mostly letters of the word; sometimes one it lacks, so "0" is a possible answer too.
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice([c for c in ALPHABET if c not in word])
    question = rng.choice(COUNT_QUESTIONS).format(word=word, letter=letter)
    positions = [str(number) for number, character in enumerate(word, start=1) if character == letter]
    count = len(positions)
    if count == 0:
        found = f'there is no "{letter}" in it, so the count is 0.'
    elif count == 1:
        found = f'"{letter}" is letter {positions[0]}, so it appears once.'
    else:
        listed = ", ".join(positions[:-1]) + " and " + positions[-1]
        found = f'"{letter}" is at positions {listed}, so it appears {count} times.'
    times = "time" if count == 1 else "times"
    reasoning = f"Spelling it out: {spell(word)}. Going letter by letter, {found}\nLet me double-check with Python: "
    conclusion = f'\nThe letter "{letter}" appears {count} {times} in "{word}".\n\n#### {count}'
    parts = [
        {"type": "text", "text": reasoning},
        {"type": "python", "text": f'"{word}".count("{letter}")'},  # the form the calculator tool evaluates
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": conclusion},
    ]
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
        "kind": "count",
        "word": word,
        "letter": letter,
        "answer": str(count),
    }


@functools.lru_cache(maxsize=8)
def common_words(word_list: Path, reference_files: tuple[str, ...], min_count: int) -> list[str]:
    """Sorted words of 3-12 letters from the list that occur >= min_count times in the reference texts
    (all of them when there are no reference files). Cached: train and test splits share the work."""
    words = set()
    with open_text(word_list) as file:
        for line in file:
            word = line.strip()
            if MIN_LETTERS <= len(word) <= MAX_LETTERS and word.isascii() and word.isalpha() and word.islower():
                words.add(word)
    if not reference_files:
        return sorted(words)
    from picochat.data import find_text_files, iter_documents

    counts: Counter[str] = Counter()
    characters = 0
    for text, _ in iter_documents(find_text_files(list(reference_files))):
        counts.update(re.findall(r"\b[a-z]+\b", text))  # lowercase whole words only
        characters += len(text)
        if characters >= MAX_REFERENCE_CHARACTERS:
            break
    return sorted(word for word in words if counts[word] >= min_count)
