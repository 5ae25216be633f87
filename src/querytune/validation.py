"""Checks of query text shared by `querytune predict` and the HTTP API, so both refuse the same input.

Cheap to import (no torch): the command line checks queries before it loads a model.
"""

from __future__ import annotations


def query_problem(text: str, max_chars: int | None = None) -> str | None:
    """What is wrong with one query or candidate text ("is empty", ...), or None when it can be scored.

    Refused: empty or whitespace-only text; text with no printable character (only whitespace, control or
    zero-width characters such as U+200B or U+FEFF, which tokenizers turn into nothing or [UNK]); text that is not
    valid Unicode (a lone surrogate such as "\\ud800", which JSON allows but UTF-8 cannot encode); text longer than
    `max_chars`.
    """
    if not text.strip():
        return "is empty"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"is not valid text: it holds a lone surrogate (U+{ord(text[err.start]):04X})"
    if not any(_printable(ch) for ch in text):
        return "has no printable character (only whitespace, control or zero-width characters)"
    if max_chars is not None and len(text) > max_chars:
        return f"is too long: {len(text)} characters > {max_chars}"
    return None


def _printable(ch: str) -> bool:
    return ch.isprintable() and not ch.isspace()


# A text `query_problem` accepts (length aside) holds a character outside Unicode's Other (C: control, format,
# surrogate, private use, unassigned) and Separator (Z) categories: exactly the characters that are printable and
# not whitespace in Python's Unicode database. Written for JSON Schema's regular expressions (ECMA-262 with Unicode
# property escapes), which the API's OpenAPI schema puts on every query, so that a request the schema admits is
# one the server accepts (a lone surrogate, which JSON can carry, is the one refusal it cannot express).
PRINTABLE_PATTERN = r"[^\p{C}\p{Z}]"
