"""Progress bars for the long steps outside the Trainer: scoring a split, embedding or reranking a catalogue,
verifying an export, generating rewrites, indexing a large catalogue with BM25.

A bar appears on stderr only when a step takes longer than `DELAY_S` seconds, so quick calls (a `predict` of a few
queries, one server batch) print nothing; `TQDM_DISABLE=1` turns every bar off, and the server turns them off for
its own model calls (`set_enabled(False)`). Importing this module is cheap: tqdm loads on first use.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

DELAY_S = 2.0  # a step shorter than this shows no bar
_ENABLED = True
_LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("querytune_progress_label", default=None)


def set_enabled(enabled: bool) -> None:
    """Turn every querytune progress bar on or off (the server turns them off)."""
    global _ENABLED
    _ENABLED = enabled


@contextlib.contextmanager
def progress_label(label: str) -> Iterator[None]:
    """Name what the bars inside this block are part of ("verifying the export", ...)."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "batch") -> Iterable[T]:
    """`items`, with a tqdm bar on stderr when iterating them takes longer than `DELAY_S` seconds."""
    if not _ENABLED:
        return items
    from tqdm.auto import tqdm

    label = _LABEL.get()
    return tqdm(items, desc=f"{label}: {desc}" if label else desc, total=total, unit=unit, delay=DELAY_S,
                leave=False, file=sys.stderr, dynamic_ncols=True)  # fmt: skip
