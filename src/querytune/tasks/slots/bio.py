"""Word-level BIO tagging without a model: tag validation and repair, label maps, word -> sub-word alignment, spans.

Alignment goes through character offsets rather than the tokenizer's `is_split_into_words` mode: the words are
joined with single spaces, tokenised as ordinary text with `return_offsets_mapping`, and each sub-token belongs to
the word its characters overlap. That works for every fast tokenizer (byte-level BPE needs no `add_prefix_space`),
and prediction on a raw query goes through exactly the same path, so training and serving see the same pieces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IGNORE_INDEX = -100  # the label of positions that carry no loss and no score (specials, continuation pieces)
OUTSIDE = "O"
_WORD = re.compile(r"\S+")


class TagError(ValueError):
    """A tag that is not BIO (IOB2): the message names it."""


def is_bio(tag: str) -> bool:
    """Whether `tag` is `O`, `B-<type>` or `I-<type>` with a non-empty type."""
    return tag == OUTSIDE or (len(tag) > 2 and tag[:2] in ("B-", "I-"))


def repair_bio(tags: Sequence[str]) -> tuple[list[str], int]:
    """Turn every I-X that does not continue a B-X/I-X into B-X; return the tags and how many were changed.

    This is how the lenient (conlleval) reading of IOB already interprets such a tag, so repairing it changes no
    span; it only makes the training target well-formed IOB2. A malformed tag raises `TagError`.
    """
    out: list[str] = []
    repaired = 0
    previous = OUTSIDE
    for tag in tags:
        if not is_bio(tag):
            raise TagError(tag)
        if tag.startswith("I-") and (previous == OUTSIDE or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
            repaired += 1
        out.append(tag)
        previous = tag
    return out, repaired


def tag_vocabulary(tag_sequences: Iterable[Sequence[str]], classlabel_names: Sequence[str] | None = None) -> list[str]:
    """The deterministic tag label map: ClassLabel order when there is one, else `O` first and the rest sorted.

    Every entity type seen gets both its B- and I- tag (missing ones are appended, sorted), so that an eval split
    with a multi-word span of a type that only had single-word spans in train is not an unknown tag.
    """
    types = {tag[2:] for tags in tag_sequences for tag in tags if tag != OUTSIDE}
    if classlabel_names is not None:
        names = list(classlabel_names)
        bad = [n for n in names if not is_bio(n)]
        if bad:
            raise TagError(bad[0])
        types |= {n[2:] for n in names if n != OUTSIDE}
    else:
        names = [OUTSIDE]
    complete = {OUTSIDE} | {f"{prefix}-{t}" for t in types for prefix in "BI"}
    return names + sorted(complete - set(names))


def b_to_i_map(tags: Sequence[str]) -> list[int]:
    """For each tag id, the id a continuation sub-token gets with `label_all_tokens`: B-X -> I-X, others unchanged."""
    index = {tag: i for i, tag in enumerate(tags)}
    return [index.get("I-" + tag[2:], i) if tag.startswith("B-") else i for i, tag in enumerate(tags)]


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Whitespace words of a raw query and their (start, end) character offsets into it."""
    matches = list(_WORD.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def join_words(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The text the model sees for a list of words (single spaces) and each word's character span in it."""
    spans = []
    start = 0
    for word in words:
        spans.append((start, start + len(word)))
        start += len(word) + 1
    return " ".join(words), spans


def word_ids_from_offsets(
    offsets: Sequence[tuple[int, int]], word_spans: Sequence[tuple[int, int]]
) -> list[int | None]:
    """The word each sub-token belongs to (None for special tokens and pieces covering no word character).

    A sub-token belongs to the word its characters overlap; overlap (not containment) because some tokenizers
    include the preceding space in a piece's offsets (SentencePiece's "▁word").
    """
    ids: list[int | None] = []
    w = 0
    for start, end in offsets:
        if end <= start:
            ids.append(None)
            continue
        while w < len(word_spans) and word_spans[w][1] <= start:
            w += 1
        # Offsets only move forward, except for special tokens (handled above), so the pointer never goes back.
        ids.append(w if w < len(word_spans) and word_spans[w][0] < end else None)
    return ids


def align_labels(
    word_ids: Sequence[int | None],
    word_labels: Sequence[int],
    label_all_tokens: bool = False,
    b_to_i: Sequence[int] | None = None,
) -> list[int]:
    """Sub-token labels as in transformers' run_ner.py: a word's first sub-token carries its label, the others and
    the special tokens get -100; with `label_all_tokens` the other sub-tokens get the word's tag with B- made I-."""
    labels: list[int] = []
    previous: int | None = None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous:
            labels.append(word_labels[word])
        elif label_all_tokens:
            label = word_labels[word]
            labels.append(b_to_i[label] if b_to_i is not None else label)
        else:
            labels.append(IGNORE_INDEX)
        previous = word
    return labels


def first_token_positions(word_ids: Sequence[int | None], num_words: int) -> list[int | None]:
    """For each word, the position of its first sub-token, or None when it has none (truncated or empty)."""
    positions: list[int | None] = [None] * num_words
    for position, word in enumerate(word_ids):
        if word is not None and positions[word] is None:
            positions[word] = position
    return positions


def lost_words(positions: Sequence[int | None], tags: Sequence[str] | None, truncated: bool) -> tuple[int, int, int]:
    """Words of one example that have no sub-token, hence no label: (cut by truncation, of those the ones inside a
    slot, words that tokenised to nothing)."""
    missing = [i for i, p in enumerate(positions) if p is None]
    if not missing:
        return 0, 0, 0
    last_kept = max((i for i, p in enumerate(positions) if p is not None), default=-1)
    # Words after the last word that made it in were cut when the encoding hit max_length; words in the middle
    # produced no sub-token at all (e.g. only characters the tokenizer normalises away).
    cut = [i for i in missing if truncated and i > last_kept]
    inside = sum(1 for i in cut if tags is not None and tags[i] != OUTSIDE)
    return len(cut), inside, len(missing) - len(cut)


def lost_words_warning(split: str, counts: Sequence[Sequence[int]], max_length: int) -> str | None:
    """One warning line from the per-example `lost_words` counts of a split, or None when nothing was lost."""
    cut_examples = sum(1 for c in counts if c[0])
    cut, inside, empty = (sum(c[i] for c in counts) for i in range(3))
    parts = []
    if cut:
        parts.append(
            f"{cut_examples} of {len(counts)} examples are longer than max_seq_length={max_length} tokens: {cut} "
            f"words after the cut ({inside} inside slots) get no label and are neither trained nor scored; raise "
            "max_seq_length to keep them"
        )
    if empty:
        parts.append(f"{empty} word(s) produced no sub-token (only characters the tokenizer drops): no label")
    return f"split {split!r}: " + "; ".join(parts) if parts else None


def encode_words(tokenizer, word_lists: Sequence[Sequence[str]], max_length: int, padding: bool | str = False):
    """Tokenise word lists as space-joined text; return the encoding and, per example, the sub-token -> word ids.

    Needs a fast tokenizer (character offsets). The encoding has no `offset_mapping` left in it.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"slot tagging needs a fast tokenizer (character offsets); got {type(tokenizer).__name__}")
    joined = [join_words(words) for words in word_lists]
    enc = tokenizer(
        [text for text, _ in joined],
        truncation=True,
        max_length=max_length,
        padding=padding,
        return_offsets_mapping=True,
    )
    offsets = enc.pop("offset_mapping")
    word_ids = [word_ids_from_offsets(o, spans) for o, (_, spans) in zip(offsets, joined, strict=True)]
    return enc, word_ids


@dataclass(frozen=True)
class Span:
    """An entity over words [start, end) of one query."""

    label: str
    start: int
    end: int


def spans_from_tags(tags: Sequence[str], strict: bool = False) -> list[Span]:
    """Entity spans exactly as seqeval reads them: its default (conlleval) rules, or strict IOB2."""
    if strict:
        from seqeval.scheme import IOB2, Entities

        return [Span(e.tag, e.start, e.end) for e in Entities([list(tags)], IOB2).entities[0]]
    from seqeval.metrics.sequence_labeling import get_entities

    return [Span(label, start, end + 1) for label, start, end in get_entities(list(tags))]
