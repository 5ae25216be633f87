"""`slot_swap`: mention replacement on slot corpora. Each slot value of a query is replaced by another value of the
same slot type seen in the train split ("play [artist: adele]" -> "play [artist: daft punk]"), and the tags are
rebuilt for the new value's length. Label-preserving by construction: the slot types and the words around them stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from querytune.augment.base import OUTSIDE, Augmenter, Example, row_rng, span_tags


@dataclass
class SlotSwapArguments:
    """Options of the `slot_swap` augmenter."""

    slot_swap_p: float | None = field(
        default=None,
        metadata={"help": "slot_swap: chance that each slot value of a query is replaced (default 1.0; at least one "
                  "value of every new row is)."},
    )  # fmt: skip
    slot_swap_same_label: bool | None = field(
        default=None,
        metadata={"help": "slot_swap: draw values only from train rows of the same intent (default true), so a "
                  "joint model never sees a value with an intent it never had."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.slot_swap_p is not None and not 0 < self.slot_swap_p <= 1:
            raise ValueError(f"slot_swap_p must be in (0, 1], got {self.slot_swap_p}")

    def resolved(self) -> dict[str, Any]:
        return {"p": 1.0 if self.slot_swap_p is None else self.slot_swap_p,
                "same_label": True if self.slot_swap_same_label is None else self.slot_swap_same_label}  # fmt: skip


def _segments(ex: Example) -> list[tuple[str | None, list[str]]]:
    """The query as (slot type, words) for each span and (None, [word]) for each O word, in order."""
    segments: list[tuple[str | None, list[str]]] = []
    for word, tag in zip(ex.words, ex.tags or [], strict=True):
        if tag == OUTSIDE:
            segments.append((None, [word]))
        elif tag.startswith("B-") or not segments or segments[-1][0] != tag[2:]:
            segments.append((tag[2:], [word]))
        else:
            segments[-1][1].append(word)
    return segments


class SlotSwapAugmenter(Augmenter):
    name = "slot_swap"
    options = SlotSwapArguments
    needs_tags = True

    def prepare(self) -> None:
        self.settings = self.opts.resolved()
        self.values: dict[tuple[str, str], list[tuple[str, ...]]] = {}  # (label or "", type) -> distinct values
        seen: set[tuple[str, str, tuple[str, ...]]] = set()
        for ex in self.context.train:
            for kind, words in _segments(ex):
                if kind is None:
                    continue
                for label in dict.fromkeys((ex.label if self.settings["same_label"] else "", "")):
                    if (label, kind, tuple(words)) not in seen:
                        seen.add((label, kind, tuple(words)))
                        self.values.setdefault((label, kind), []).append(tuple(words))

    def identity(self) -> dict[str, Any]:
        # the values come from the train split: another sample is another cache
        return {"name": self.name, "settings": self.settings, "train": self.context.extra.get("train_fingerprint")}

    def generate(self, examples: list[Example], k: list[int], seed: int) -> list[Example | None]:
        return [self.one(ex, j, seed) for ex, j in zip(examples, k, strict=True)]

    def one(self, ex: Example, k: int, seed: int) -> Example | None:
        rng = row_rng(seed, self.name, ex, k)
        segments = _segments(ex)
        label = ex.label if self.settings["same_label"] else ""
        choices = []  # per swappable span: its index and the other values of its type
        for i, (kind, words) in enumerate(segments):
            if kind is not None:
                others = [v for v in self.values.get((label, kind), []) if v != tuple(words)]
                if others:
                    choices.append((i, others))
        if not choices:
            return None
        swap = {i for i, _ in choices if rng.random() < self.settings["p"]} or {rng.choice(choices)[0]}
        words: list[str] = []
        tags: list[str] = []
        for i, (kind, value) in enumerate(segments):
            if i in swap:
                value = list(rng.choice(dict(choices)[i]))
            words += value
            tags += [OUTSIDE] if kind is None else span_tags(kind, len(value))
        return ex.derived(words, tags, self.name)
