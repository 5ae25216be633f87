"""Inference batches that waste little on padding: queries tokenised once, sorted by token count, cut into batches.

A model batch is padded to its longest query. CLINC150 test queries are 11 tokens on average and up to 30: 64 of
them in arrival order carry 0.93 padding tokens per real token, sorted by token count 0.02 (sorted by characters,
as `tasks.base.length_batches` callers did before, 0.34). `encoded_batches` is the sorted path of
`querytune predict` / `eval`, the export check and the server; `predict_queued` is what the server's micro-batcher
calls on the queries it collected; `padding_waste` is the measure the inference benchmark reports.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

# Sorting happens within windows of this many batches: memory stays bounded on a long query file, and a window of
# 64 batches pads nearly as little as sorting everything.
WINDOW_BATCHES = 64


def sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Item indices in batches of similar length, shortest first (a stable sort: ties keep their order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def encoded_batches(tokenizer, texts: Sequence[str], pairs: Sequence[str] | None, batch_size: int, max_length: int,
                    return_tensors: str = "pt", pad_to: int | None = None) -> Iterator[tuple[list[int], Any]]:  # fmt: skip
    """(indices into `texts`, padded model inputs) for batches of queries of similar token count.

    Each window of texts is tokenised once (truncated, unpadded), sorted by token count and cut into batches of at
    most `batch_size`, each padded to its own longest query (or every batch to `pad_to` tokens, where a consumer
    needs one shape). Callers put each row back at its index.
    """
    from transformers.data.data_collator import pad_without_fast_tokenizer_warning

    window = max(1, batch_size) * WINDOW_BATCHES
    for offset in range(0, len(texts), window):
        chunk = list(texts[offset : offset + window])
        chunk_pairs = list(pairs[offset : offset + window]) if pairs else None
        enc = tokenizer(chunk, chunk_pairs, truncation=True, max_length=max_length)
        keys = list(enc.keys())
        for idx in sorted_batches([len(ids) for ids in enc["input_ids"]], batch_size):
            features = [{k: enc[k][i] for k in keys} for i in idx]
            padding = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": True}
            padded = pad_without_fast_tokenizer_warning(tokenizer, features, return_tensors=return_tensors, **padding)
            yield [offset + i for i in idx], padded


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Padding tokens per real token when each batch (indices into `lengths`) is padded to its longest item."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches if batch)
    return (padded - real) / real if real else 0.0


def arrival_batches(n: int, batch_size: int) -> list[list[int]]:
    """Indices 0..n-1 cut in arrival order: what one model call per collected batch pads."""
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]


def predict_queued(loaded: Any, texts: list[str], top_k: int, model_batch_size: int) -> list[dict[str, Any]]:
    """The server's model call for the queries its micro-batcher collected, one result per query in arrival order.

    The queries are scored in length-sorted model batches of at most `model_batch_size` rather than one batch padded
    to the longest queued query: the task's `predict` sorts, cuts and puts every result back at its query's place.
    """
    if model_batch_size < 1:
        raise ValueError(f"model_batch_size must be at least 1, got {model_batch_size}")
    return loaded.predict(texts, top_k=top_k, batch_size=model_batch_size)
