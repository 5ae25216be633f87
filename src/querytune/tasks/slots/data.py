"""Loading word + BIO tag corpora (slot tagging, joint intent + slots) from the same sources as `querytune.data`.

Every split comes out with the columns `words` (list of str), `tags` (list of str, repaired IOB2) and `tag_ids`,
plus `intent_labels` for the joint task. Tags may be a ClassLabel sequence, a list of strings or one
whitespace-separated string; words a list or a whitespace-separated string.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from querytune.config import DataArguments
from querytune.data import (
    DataError,
    UnseenLabels,
    check_columns,
    encode_labels,
    finish_splits,
    is_unseen,
    label_names,
    load_one_split,
    load_splits,
    sample,
    unseen_labels_error,
)
from querytune.tasks.slots.args import SlotsArguments
from querytune.tasks.slots.bio import TagError, repair_bio, tag_vocabulary

logger = logging.getLogger(__name__)


@dataclass
class TaggedSplits:
    """Normalised splits and the label maps taken from the train split."""

    splits: DatasetDict
    tags: list[str]
    intents: list[str] | None
    unseen: Unseen | None = None


@dataclass
class Unseen:
    """`unseen_labels` for a tagging corpus: one record per label column (slot tags, intents) and the rows per split
    role that were dropped (`drop`) or kept with an unseen tag or intent (`as_wrong`)."""

    tags: UnseenLabels
    intents: UnseenLabels

    @classmethod
    def of(cls, policy: str) -> Unseen:
        return cls(UnseenLabels(policy), UnseenLabels(policy))

    def metrics(self, role: str) -> dict[str, int]:
        if self.tags.policy == "drop":  # the two filters run one after the other: a row is counted once
            return {"num_dropped_unseen": self.tags.counts.get(role, 0) + self.intents.counts.get(role, 0)}
        return self.tags.metrics(role)

    def count_kept(self, splits: dict[str, Dataset]) -> None:
        """as_wrong: the rows of each eval split holding an unseen tag or intent (after sampling)."""
        if self.tags.policy != "as_wrong":
            return
        for role, ds in splits.items():
            if role == "train":
                continue
            intents = ds["intent_labels"] if "intent_labels" in ds.column_names else [0] * len(ds)
            self.tags.counts[role] = sum(1 for ids, intent in zip(ds["tag_ids"], intents, strict=True)
                                         if is_unseen(intent) or any(is_unseen(i) for i in ids))  # fmt: skip


def _classlabel_names(ds: Dataset, column: str) -> list[str] | None:
    inner = getattr(ds.features[column], "feature", None)
    return list(inner.names) if isinstance(inner, ClassLabel) else None


def _normalise(ds: Dataset, split: str, args: SlotsArguments, source: str, keep: list[str]) -> Dataset:
    """Words and repaired string tags per row; errors name the split, the row and the tag."""
    names = _classlabel_names(ds, args.tags_column)

    def as_list(value, column: str, row: int) -> list:
        if value is None:
            raise DataError(f"{source}: split {split!r} row {row}: column {column!r} is empty (null)")
        return value.split() if isinstance(value, str) else list(value)

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"words": [], "tags": [], "_repaired": []}
        for row, words, tags in zip(indices, batch[args.tokens_column], batch[args.tags_column], strict=True):
            words = [str(w) for w in as_list(words, args.tokens_column, row)]
            tags = as_list(tags, args.tags_column, row)
            tags = [names[t] for t in tags] if names is not None else [str(t) for t in tags]
            if len(words) != len(tags):
                raise DataError(
                    f"{source}: split {split!r} row {row} has {len(words)} words in {args.tokens_column!r} but "
                    f"{len(tags)} tags in {args.tags_column!r}"
                )
            try:
                tags, repaired = repair_bio(tags)
            except TagError as err:
                raise DataError(
                    f"{source}: split {split!r} row {row} has tag {str(err)!r} in column {args.tags_column!r}, "
                    "which is not BIO/IOB2 (expected O, B-<type> or I-<type>)"
                ) from None
            out["words"].append(words)
            out["tags"].append(tags)
            out["_repaired"].append(repaired)
        return out

    # Explicit features: otherwise `tags` would keep the input's ClassLabel type and turn the names back into ids.
    features = Features({"words": List(Value("string")), "tags": List(Value("string")), "_repaired": Value("int64"),
                         **{c: ds.features[c] for c in keep}})  # fmt: skip
    ds = ds.map(convert, batched=True, with_indices=True, desc=f"checking tags {split}", features=features,
                remove_columns=[c for c in ds.column_names if c not in keep])  # fmt: skip
    repaired = ds["_repaired"]
    if sum(repaired):
        logger.warning(
            "%s: split %r: repaired %d I- tags in %d examples that continued no entity of their type "
            "(I-X after O or after another type is now B-X, as the lenient IOB reading already takes it)",
            source, split, sum(repaired), sum(1 for r in repaired if r),
        )  # fmt: skip
    return ds.remove_columns("_repaired")


def _encode_tags(ds: Dataset, split: str, tags: list[str], column: str, source: str,
                 unseen: UnseenLabels | None = None, role: str | None = None) -> Dataset:  # fmt: skip
    """Add integer `tag_ids`. A tag the train split never had (an unknown entity type) is an error, unless `unseen`
    (eval/test splits) keeps it with an id below -100 (`as_wrong`: its spans can never be predicted right) or drops
    its rows (`drop`, counted under `role`)."""
    tag2id = {tag: i for i, tag in enumerate(tags)}
    unknown = sorted({t for seq in ds["tags"] for t in seq} - set(tag2id))
    policy = unseen.policy if unseen is not None else "error"
    if unknown and policy == "error":
        types = sorted({t[2:] for t in tags if t != "O"})
        known = f"{len(types)} types known: {types[:20]}{' ...' if len(types) > 20 else ''}"
        raise unseen_labels_error(source, split, "tag(s)", column, unknown, known)
    if unknown and policy == "drop":
        gone, before = set(unknown), len(ds)
        ds = ds.filter(lambda b: [not gone.intersection(seq) for seq in b["tags"]], batched=True,
                       desc=f"dropping unseen tags {split}")  # fmt: skip
        if len(ds) == 0:
            raise DataError(f"{source}: split {split!r}: every row has a tag the train split lacks ({unknown[:10]})")
        unseen.counts[role or split] = unseen.counts.get(role or split, 0) + before - len(ds)
    elif unknown:  # as_wrong
        tag2id |= {t: unseen.id_of(t) for t in unknown}
        logger.warning("%s: split %r: tags the train split lacks (%s) are kept and scored as wrong (unseen_labels: "
                       "as_wrong)", source, split, unknown[:10])  # fmt: skip
    return ds.map(lambda b: {"tag_ids": [[tag2id[t] for t in seq] for seq in b["tags"]]}, batched=True,
                  desc=f"tag ids {split}")  # fmt: skip


def _check_columns(split: str, ds: Dataset, data: DataArguments, args: SlotsArguments, with_intent: bool,
                   source: str) -> None:  # fmt: skip
    columns = [args.tokens_column, args.tags_column] + ([data.label_column] if with_intent else [])
    hint = "Set tokens_column / tags_column (and label_column for the intent) in the experiment file."
    check_columns(split, ds, columns, source, hint)


def load_tagging_splits(data: DataArguments, args: SlotsArguments, seed: int, with_intent: bool) -> TaggedSplits:
    """Train / validation / (test) splits of a tagging corpus, and the tag (and intent) label maps.

    As in `load_classification_splits`, the label maps come from the whole train split before any subsetting, and a
    missing validation split is carved from train (stratified by intent for the joint task). Eval/test tags and
    intents that train lacks follow `data.unseen_labels` (recorded in `TaggedSplits.unseen`).
    """
    found, wanted, source = load_splits(data)
    keep = [data.label_column] if with_intent else []
    # A slot corpus with an intent column keeps it in train: per-label sampling and augmentation group by it.
    intent_column = data.label_column in found["train"].column_names
    splits: dict[str, Dataset] = {}
    classlabel_names = None
    for role, ds in found.items():
        split = wanted[role]
        _check_columns(split, ds, data, args, with_intent, source)
        if role == "train":
            classlabel_names = _classlabel_names(ds, args.tags_column)
        splits[role] = _normalise(ds, split, args, source, [data.label_column] if role == "train" and
                                  intent_column else keep)  # fmt: skip

    try:
        tags = tag_vocabulary(splits["train"]["tags"], classlabel_names)
    except TagError as err:
        raise DataError(f"{source}: ClassLabel name {str(err)!r} of column {args.tags_column!r} is not BIO") from None
    if len(tags) < 2:
        raise DataError(f"{source}: the train split has no entity tags in column {args.tags_column!r}")
    intents = None
    if with_intent:
        intents = label_names(found["train"], data.label_column)
        if len(intents) < 2:
            raise DataError(f"{source}: column {data.label_column!r} has {len(intents)} distinct intent(s); need >= 2")
    unseen = Unseen.of(data.unseen_labels)
    for role in list(splits):
        # The train split defines the label maps: it is never given an unseen-label policy.
        tag_policy, intent_policy = (None, None) if role == "train" else (unseen.tags, unseen.intents)
        ds = _encode_tags(splits[role], wanted[role], tags, args.tags_column, source, tag_policy, role)
        if intents is not None:
            ds = encode_labels(ds, wanted[role], data.label_column, intents, source, intent_policy, role)
        splits[role] = ds

    by = "labels" if intents is not None else (data.label_column if intent_column else None)
    splits = finish_splits(splits, data, seed, stratify=intents is not None, label_column=by)
    splits = {k: _finish(v, data, intents) for k, v in splits.items()}
    unseen.count_kept(splits)
    return TaggedSplits(DatasetDict(splits), tags, intents, unseen)


def _finish(ds: Dataset, data: DataArguments, intents: list[str] | None) -> Dataset:
    if intents is None:
        return ds
    if data.label_column != "labels":
        ds = ds.remove_columns(data.label_column)
    return ds.rename_column("labels", "intent_labels")


def load_tagging_eval_split(data: DataArguments, args: SlotsArguments, split: str, tags: list[str],
                            intents: list[str] | None, unseen: Unseen | None = None) -> Dataset:  # fmt: skip
    """One split of any tagging corpus, encoded with a trained run's label maps; tags and intents the run never saw
    follow `data.unseen_labels` (`unseen`, when given, records what was done under the name `split`)."""
    unseen = unseen if unseen is not None else Unseen.of(data.unseen_labels)
    ds, source = load_one_split(data, split)
    with_intent = intents is not None
    _check_columns(split, ds, data, args, with_intent, source)
    ds = _normalise(ds, split, args, source, [data.label_column] if with_intent else [])
    ds = _encode_tags(ds, split, tags, args.tags_column, source, unseen.tags, split)
    if with_intent:
        ds = encode_labels(ds, split, data.label_column, intents, source, unseen.intents, split)
    ds = _finish(ds, data, intents)
    ds = sample(ds, data.max_eval_samples, 0)
    unseen.count_kept({split: ds})
    return ds
