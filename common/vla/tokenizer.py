"""A locally built instruction tokenizer: whole words from a fixed vocabulary, bytes for the rest.

Nothing is downloaded. The vocabulary is built once from the instructions of the training
demonstrations and stored in the policy's config, so a checkpoint always carries its tokenizer.

Token ids:
    0                 PAD
    1                 BOS (start of the instruction)
    2 .. 257          the 256 byte values (fallback for words outside the vocabulary)
    258 .. 258+V-1    the V vocabulary words (lower-cased, split on whitespace)

A word in the vocabulary is one token; any other word is spelt as its UTF-8 bytes followed by the
byte of a space, so every string round-trips through :meth:`InstructionTokenizer.decode`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PAD_ID = 0
BOS_ID = 1
BYTE_OFFSET = 2
WORD_OFFSET = BYTE_OFFSET + 256

_WORD_RE = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")


def split_words(text: str) -> list[str]:
    """Lower-case and split an instruction into words and single punctuation marks."""
    return _WORD_RE.findall(text.lower())


class InstructionTokenizer:
    """Word-level tokenizer with byte fallback over a fixed, locally built vocabulary."""

    def __init__(self, words: Iterable[str] = ()) -> None:
        self.words: list[str] = list(dict.fromkeys(words))
        for w in self.words:
            if not w or any(c.isspace() for c in w):
                raise ValueError(f"vocabulary words must be non-empty and contain no whitespace, got {w!r}")
        self._index = {w: WORD_OFFSET + i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, instructions: Iterable[str]) -> InstructionTokenizer:
        """Vocabulary = every word that occurs in ``instructions`` (sorted, deterministic)."""
        vocab: set[str] = set()
        for text in instructions:
            vocab.update(split_words(text))
        return cls(sorted(vocab))

    @property
    def vocab_size(self) -> int:
        return WORD_OFFSET + len(self.words)

    def encode(self, text: str) -> list[int]:
        """BOS followed by one id per known word, or the bytes of an unknown word plus a space byte."""
        ids = [BOS_ID]
        for word in split_words(text):
            wid = self._index.get(word)
            if wid is not None:
                ids.append(wid)
            else:
                ids.extend(BYTE_OFFSET + b for b in (word + " ").encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of :meth:`encode` up to spacing (words joined by single spaces)."""
        parts: list[str] = []
        pending = bytearray()
        for i in ids:
            i = int(i)
            if i in (PAD_ID, BOS_ID):
                continue
            if BYTE_OFFSET <= i < WORD_OFFSET:
                pending.append(i - BYTE_OFFSET)
                continue
            if pending:
                parts.append(pending.decode("utf-8", errors="replace").strip())
                pending.clear()
            if not WORD_OFFSET <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            parts.append(self.words[i - WORD_OFFSET])
        if pending:
            parts.append(pending.decode("utf-8", errors="replace").strip())
        return " ".join(p for p in parts if p)

    def batch_encode(self, texts: list[str], max_len: int) -> tuple[list[list[int]], list[list[bool]]]:
        """Left-padded ids and validity masks, every row as long as the longest (at most ``max_len``).

        Instructions longer than ``max_len`` tokens keep their last ``max_len`` tokens.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        encoded = [self.encode(t)[-max_len:] for t in texts]
        width = max(len(e) for e in encoded)
        ids = [[PAD_ID] * (width - len(e)) + e for e in encoded]
        mask = [[False] * (width - len(e)) + [True] * len(e) for e in encoded]
        return ids, mask
