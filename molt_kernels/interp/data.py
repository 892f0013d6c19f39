"""An offline English text source that ships with CPython itself.

``pydoc_data.topics.topics`` is the text of ``help()``'s topics (the language reference
chapters: statements, expressions, data model, ...; about 80 topics, ~465k characters, roughly
128k BERT tokens on Python 3.11). It is technical prose mixed with code and grammar snippets,
needs no download, and is identical on every install of a given CPython version (it changes
between versions, so exact token counts do too). :func:`iter_file_texts` chunks a user's own
text or JSONL file the same way.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_FILE_BLOCK_CHARS = 1 << 16


def _split_long(paragraph: str, max_chars: int) -> Iterator[str]:
    """Cut at line breaks, and inside an over-long line at spaces, so no piece exceeds max_chars."""
    piece = ""
    for line in paragraph.splitlines():
        while len(line) > max_chars:
            cut = line.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            if piece:
                yield piece
                piece = ""
            yield line[:cut]
            line = line[cut:].lstrip(" ")
        if piece and len(piece) + 1 + len(line) > max_chars:
            yield piece
            piece = ""
        piece = f"{piece}\n{line}" if piece else line
    if piece:
        yield piece


def _topic_chunks(text: str, max_chars: int) -> Iterator[str]:
    """Greedily pack consecutive paragraphs of one topic into chunks of at most max_chars."""
    chunk = ""
    for para in _PARAGRAPH_BREAK.split(text):
        for piece in _split_long(para.strip("\n"), max_chars):
            if not piece.strip():
                continue
            if chunk and len(chunk) + 2 + len(piece) > max_chars:
                yield chunk
                chunk = ""
            chunk = f"{chunk}\n\n{piece}" if chunk else piece
    if chunk:
        yield chunk


def iter_texts(max_chars_per_text: int = 400, seed: int | None = 0) -> Iterator[str]:
    """Yield paragraph-sized chunks of CPython's pydoc topics, each at most max_chars_per_text.

    Consecutive paragraphs of a topic are packed together up to the limit (so headings stay
    with their text); a longer paragraph is cut at line breaks. Chunks never span topics.
    The text averages ~0.28 BERT tokens per character: with the default 400, chunks are
    ~85 tokens on average and only a few symbol-dense ones pass all-MiniLM-L6-v2's 256-token
    truncation (whose excess tokens the model then never sees).

    Args:
        max_chars_per_text: upper bound on ``len(text)``.
        seed: ``None`` keeps the corpus order (topics sorted by name); an int shuffles the
            chunks with ``random.Random(seed)`` -- the same seed gives the same order.
    """
    if max_chars_per_text < 1:
        raise ValueError(f"max_chars_per_text must be >= 1, got {max_chars_per_text}")
    from pydoc_data.topics import topics

    chunks = [
        chunk
        for name in sorted(topics)
        for chunk in _topic_chunks(topics[name], max_chars_per_text)
    ]
    if seed is not None:
        random.Random(seed).shuffle(chunks)
    yield from chunks


def iter_file_texts(path: str | Path, max_chars_per_text: int = 400) -> Iterator[str]:
    """Yield chunks of a UTF-8 text file, each at most max_chars_per_text, read as a stream.

    ``.jsonl``: one document per line, its ``"text"`` field. Any other file: plain text, whose
    blank-line-separated paragraphs are documents' paragraphs. Chunks are packed as in
    :func:`iter_texts` and never span a ``.jsonl`` document.
    """
    if max_chars_per_text < 1:
        raise ValueError(f"max_chars_per_text must be >= 1, got {max_chars_per_text}")
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f'{path}:{number}: expected {{"text": ...}}') from e
                    yield from _topic_chunks(text, max_chars_per_text)
            return
        block: list[str] = []
        size = 0
        for line in f:
            block.append(line)
            size += len(line)
            # Hand over at a paragraph break once the block is large, to stream big files.
            if size > _FILE_BLOCK_CHARS and not line.strip():
                yield from _topic_chunks("".join(block), max_chars_per_text)
                block, size = [], 0
        yield from _topic_chunks("".join(block), max_chars_per_text)
