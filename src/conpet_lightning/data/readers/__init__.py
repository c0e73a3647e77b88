"""Readers: one module per source format, each turning shipped (or user-supplied) files into a `Benchmark`.

This package module holds what every reader shares: file access that fails with a `DataError` naming the path,
and the builders of ConPET's canonical record text (markers around the span(s), then the cloze template), so all
readers write exactly the same format.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from conpet_lightning.data.records import (
    HEAD_END,
    HEAD_START,
    MASK,
    TAIL_END,
    TAIL_START,
    TEMPLATE_START,
    DataError,
)

__all__ = [
    "entity_text",
    "normalize_space",
    "open_text",
    "read_json",
    "relation_text",
    "require_file",
    "text_classification_text",
]


def require_file(path: str | Path) -> Path:
    """Return `path` as a Path, or raise a `DataError` naming it when it is not an existing file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing data file: {path}")
    return path


def open_text(path: str | Path, newline: str | None = None) -> IO[str]:
    """Open a UTF-8 text file for reading, transparently gunzipping ``*.gz``; missing files raise `DataError`.

    Pass ``newline=""`` for the `csv` module, which must see the raw line endings inside quoted fields.
    """
    path = require_file(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)
    return path.open(encoding="utf-8", newline=newline)


def read_json(path: str | Path) -> Any:
    """Parse one JSON file; a missing file or invalid JSON raises `DataError` naming the file (and line)."""
    with open_text(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from err


def normalize_space(text: str) -> str:
    """Collapse all whitespace runs (newlines, NBSP, tabs) to single spaces, so markers stay separate tokens."""
    return " ".join(text.split())


def relation_text(tokens: Sequence[str], head: tuple[int, int], tail: tuple[int, int]) -> str:
    """ConPET relation text: head/tail wrapped in ``[unused0..3]`` markers, then the RE cloze template.

    Args:
        tokens: the sentence tokens (no whitespace inside a token).
        head: ``[start, end)`` token span of the head entity.
        tail: ``[start, end)`` token span of the tail entity; must not overlap `head`.
    """
    if head[0] >= head[1] or tail[0] >= tail[1]:
        raise ValueError(f"empty span: head {head}, tail {tail}")
    if max(head[0], tail[0]) < min(head[1], tail[1]):
        raise ValueError(f"head span {head} and tail span {tail} overlap")
    opens = {head[0]: HEAD_START, tail[0]: TAIL_START}
    closes = {head[1]: HEAD_END, tail[1]: TAIL_END}
    out: list[str] = []
    for i in range(len(tokens) + 1):
        if i in closes:
            out.append(closes[i])
        if i in opens:
            out.append(opens[i])
        if i < len(tokens):
            out.append(tokens[i])
    head_words = " ".join(tokens[head[0] : head[1]])
    tail_words = " ".join(tokens[tail[0] : tail[1]])
    return f"{' '.join(out)}{TEMPLATE_START} {tail_words} is the {MASK} of {head_words}."


def entity_text(tokens: Sequence[str], span: tuple[int, int]) -> str:
    """ConPET entity-typing text: the mention wrapped in ``[unused0] .. [unused1]``, then the ET cloze template."""
    start, end = span
    mention = " ".join(tokens[start:end])
    sentence = " ".join([*tokens[:start], HEAD_START, mention, HEAD_END, *tokens[end:]])
    return f"{sentence}{TEMPLATE_START} {mention} is a {MASK}."


def text_classification_text(text: str) -> str:
    """Intent-classification text: the utterance (whitespace normalised), then a cloze template for the intent."""
    return f"{normalize_space(text)}{TEMPLATE_START} the intent is {MASK}."
