"""The `augment_*` keys: which augmenters make new train rows, how many, and the guards around them. Cheap import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

COMPOSE = ("union", "chain")


@dataclass
class AugmentArguments:
    """Augmentation of the train split (never validation or test). Each augmenter's own options are keys prefixed
    with its name (`eda_alpha`, `mlm_model`, `paraphrase_model`, ...)."""

    paths: ClassVar[tuple[str, ...]] = (
        "augment_filter_run",
        "augment_cache_dir",
    )  # local paths: saved resolved, so a run loads anywhere

    section: ClassVar[str] = "augment"

    augment: list[str] | None = field(
        default=None,
        metadata={"help": "Augmenters applied to the train split, in order: eda, mlm, paraphrase, backtranslate, "
                  "slot_swap (or a registered one). A sweep may pass one string, 'eda,paraphrase'; null: none."},
    )  # fmt: skip
    augment_per_example: int | None = field(
        default=None, metadata={"help": "New rows each augmenter makes per train row (default 1)."}
    )
    augment_min_per_label: int | None = field(
        default=None,
        metadata={"help": "Instead of augment_per_example: bring every label (intent) up to at least N train rows, "
                  "drawing sources from that label's rows; labels already at N get none."},
    )  # fmt: skip
    augment_compose: str = field(
        default="union",
        metadata={"help": "'union': each augmenter makes its own rows from the train rows; 'chain': each augmenter "
                  "rewrites the previous one's output (eda after slot_swap), one row per row."},
    )  # fmt: skip
    augment_seed: int | None = field(
        default=None, metadata={"help": "Seed of the augmenters' random choices (default: the run's seed)."}
    )
    augment_filter_run: str | None = field(
        default=None,
        metadata={"help": "A finished run (or export): an augmented row is kept only if this run predicts the row's "
                  "label for it (consistency filtering; slot runs must predict the row's spans)."},
    )  # fmt: skip
    augment_batch_size: int = field(
        default=32, metadata={"help": "Queries per batch for augmenters that run a model (mlm, paraphrase, ...)."}
    )
    augment_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where generated rows are cached ($QUERYTUNE_CACHE/augment, by default "
                  "~/.cache/querytune/augment): a rerun or a killed run reuses them."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        from querytune.augment import augmenter_names

        names: list[str] = []
        for item in self.augment or []:  # a sweep's single string "eda,paraphrase" or a YAML list
            names += [n.strip() for n in str(item).split(",") if n.strip()]
        if names in (["none"], ["null"]):
            names = []
        unknown = [n for n in names if n not in augmenter_names()]
        if unknown:
            raise ValueError(f"augment: unknown augmenter {unknown[0]!r}; known: {', '.join(augmenter_names())}")
        if len(set(names)) != len(names):
            raise ValueError(f"augment lists an augmenter twice: {names}")
        self.augment = names or None
        for name in ("augment_per_example", "augment_min_per_label", "augment_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.augment_per_example is not None and self.augment_min_per_label is not None:
            raise ValueError("set augment_per_example or augment_min_per_label, not both")
        if self.augment_compose not in COMPOSE:
            raise ValueError(f"augment_compose must be one of {COMPOSE}, got {self.augment_compose!r}")

    @property
    def per_example(self) -> int:
        return self.augment_per_example or 1
