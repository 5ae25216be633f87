"""The options of the slot tasks (`slots`, `intent_slots`): columns and the BIO reading. Flat keys, cheap import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

SLOT_TASKS = ("slots", "intent_slots")


@dataclass
class SlotsArguments:
    """Words, one BIO tag per word, and how sub-words and spans are read."""

    section: ClassVar[str] = "slots"

    tokens_column: str = field(
        default="tokens", metadata={"help": "slots / intent_slots: column holding the words (list or spaced string)."}
    )
    tags_column: str = field(
        default="tags", metadata={"help": "slots / intent_slots: one BIO tag per word (ClassLabel list or strings)."}
    )
    label_all_tokens: bool = field(
        default=False,
        metadata={"help": "slots: train every sub-token of a word (B-X pieces after the first get I-X), not only the "
                  "first. Evaluation stays word-level."},
    )  # fmt: skip
    strict_iob2: bool = field(
        default=False, metadata={"help": "slots: score spans with seqeval's strict IOB2 mode instead of conlleval's."}
    )

    def check(self, data) -> None:
        """Rules across sections: these options mean nothing to another task."""
        for name in ("label_all_tokens", "strict_iob2"):
            if getattr(self, name) and data.task not in SLOT_TASKS:
                raise ValueError(f"{name} is set but task is {data.task!r} (it is for slots / intent_slots)")
