"""Augmenting a run's train split: plan the new rows, generate them through the cache, guard and filter them, save
what was kept, and return the larger train split with the counts that go into the metrics and the model card.

Guards, in order:
1. a generated query identical (case- and space-insensitive) to a train query or to an earlier generated one is a
   duplicate; one identical to a validation or test query would leak a held-out query into training: both are
   dropped (`augment_dropped_duplicate`, of which `augment_dropped_heldout`);
2. with `augment_filter_run`, a row that run does not predict its label (and spans) for is dropped
   (`augment_dropped_filter`).

The kept rows are written to `augmented_train.jsonl` (with their source row and augmenter) and the dropped ones, with
the reason, to `augmented_dropped.jsonl`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from querytune.augment import get_augmenter
from querytune.augment.base import AugmentContext, Augmenter, Example, stable_hash
from querytune.augment.cache import RowCache, digest
from querytune.errors import ConfigError
from querytune.progress import progress

logger = logging.getLogger(__name__)

KEPT_FILE = "augmented_train.jsonl"
DROPPED_FILE = "augmented_dropped.jsonl"


@dataclass
class Request:
    """One new row to make: from `example`, the k-th candidate of the augmenters in `chain` (one, unless chained)."""

    example: Example
    k: int
    chain: tuple[int, ...]


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def plan(originals: list[Example], args, n_augmenters: int, seed: int) -> list[Request]:
    """The new rows to make: `augment_per_example` per row and augmenter, or enough per label to reach
    `augment_min_per_label` (sources drawn in a seeded order from the label's rows, augmenters taking turns)."""
    chained = args.augment_compose == "chain"
    every = tuple(range(n_augmenters))
    if args.augment_min_per_label is None:
        if chained:
            return [Request(ex, k, every) for ex in originals for k in range(args.per_example)]
        return [Request(ex, k, (a,)) for a in every for ex in originals for k in range(args.per_example)]
    by_label: dict[str, list[Example]] = defaultdict(list)
    for ex in originals:
        by_label[ex.label].append(ex)
    requests = []
    for label, rows in by_label.items():
        order = list(rows)
        random.Random(stable_hash(seed, "min_per_label", label)).shuffle(order)
        for i in range(max(0, args.augment_min_per_label - len(rows))):
            ex, k = order[i % len(order)], i // len(order)
            requests.append(Request(ex, k, every if chained else (i % n_augmenters,)))
    return requests


def run_augmenter(aug: Augmenter, items: list[tuple[Example, int]], seed: int, cache_dir: str | None,
                  stats: Counter | None = None) -> list:  # fmt: skip
    """The augmenter's row (or None) for each (example, k), from the cache where it has them; `stats` counts the
    entries `made` and read from the `cache`."""
    cache = RowCache(cache_dir, aug.identity())
    try:
        keys = [RowCache.key(ex, k, seed) for ex, k in items]
        found = cache.get(list(dict.fromkeys(keys)))
        first: dict[str, int] = {}  # one generation per distinct entry: a repeated row is made once
        for i, key in enumerate(keys):
            if key not in found:
                first.setdefault(key, i)
        missing = list(first.values())
        if stats is not None:
            stats["made"] += len(missing)
            stats["cached"] += len(items) - len(missing)
        if found:
            logger.info("augment %s: %d of %d rows from the cache %s", aug.name, len(items) - len(missing),
                        len(items), cache.path)  # fmt: skip
        size = aug.context.batch_size if aug.uses_model else 512
        if aug.uses_model:  # batches of similar length: little padding, and generation stops with the batch
            missing.sort(key=lambda i: len(items[i][0].words))
        batches = [missing[s : s + size] for s in range(0, len(missing), size)]
        for batch in progress(batches, f"augmenting with {aug.name}", unit="batch"):
            made = aug.generate([items[i][0] for i in batch], [items[i][1] for i in batch], seed)
            entries = {keys[i]: None if row is None else {"words": row.words, "tags": row.tags}
                       for i, row in zip(batch, made, strict=True)}  # fmt: skip
            cache.put(entries)  # committed batch by batch: a killed run resumes here
            found.update(entries)
    finally:
        cache.close()
    return [found[key] for key in keys]


def generate(requests: list[Request], augmenters: list[Augmenter], seed: int, cache_dir: str | None,
             stats: Counter | None = None) -> list:  # fmt: skip
    """The row each request makes (None where an augmenter of its chain made none)."""
    rows: list[Example | None] = [r.example for r in requests]
    names: list[str] = [""] * len(requests)
    depth = max((len(r.chain) for r in requests), default=0)
    for step in range(depth):
        for a, aug in enumerate(augmenters):
            todo = [i for i, r in enumerate(requests) if len(r.chain) > step and r.chain[step] == a and rows[i]]
            if not todo:
                continue
            # the first step draws the request's k-th candidate; later chain steps rewrite that row once
            items = [(rows[i], requests[i].k if step == 0 else 0) for i in todo]
            for i, made in zip(todo, run_augmenter(aug, items, seed, cache_dir, stats), strict=True):
                names[i] = f"{names[i]}>{aug.name}" if names[i] else aug.name
                rows[i] = None if made is None else rows[i].derived(made["words"], made["tags"], names[i])
    return rows


def augment_train(task, splits: dict, config, out_dir: Path | None) -> tuple[dict, dict[str, Any]]:
    """`config.augment` applied to `splits["train"]`; returns the splits and the counts (empty when off).
    `out_dir` (the main process's run directory, or None) receives the kept and dropped rows."""
    args = config.augment
    if not args.augment:
        return splits, {}
    reason = task.augment_unsupported()
    if reason:
        raise ConfigError(f"{config.source}: augment: {reason}")
    train = splits["train"]
    originals = task.augment_examples(train)
    tagged = any(ex.tags is not None for ex in originals)
    seed = config.training.seed if args.augment_seed is None else args.augment_seed
    fingerprint = digest([[ex.words, ex.tags, ex.label] for ex in originals])
    context = AugmentContext(config.model.model_name_or_path, originals, args.augment_batch_size, seed, tagged,
                             {"train_fingerprint": fingerprint})  # fmt: skip
    augmenters = []
    started = time.perf_counter()
    for name in args.augment:
        cls = get_augmenter(name)
        if cls.needs_tags and not tagged:
            raise ConfigError(f"{config.source}: augmenter {name!r} replaces slot values: it needs a slot corpus "
                              f"(task slots or intent_slots), not task {config.data.task!r}")  # fmt: skip
        aug = cls(config.augmenter_args(cls), context)
        aug.prepare()
        augmenters.append(aug)

    requests = plan(originals, args, len(augmenters), seed)
    stats: Counter = Counter()
    made = generate(requests, augmenters, seed, args.augment_cache_dir, stats)
    counts = {"augment_requested": len(requests), "augment_generated": sum(m is not None for m in made),
              "augment_model_calls": stats["made"], "augment_from_cache": stats["cached"]}  # fmt: skip

    # --- guards: duplicates of train or earlier rows, copies of held-out queries
    seen = {normalise(ex.text) for ex in originals}
    heldout = {normalise(ex.text) for role, ds in splits.items() if role != "train"
               for ex in task.augment_examples(ds)}  # fmt: skip
    kept: list[Example] = []
    dropped: list[tuple[Example, str]] = []
    for row in made:
        if row is None:
            continue
        key = normalise(row.text)
        if key in heldout:
            dropped.append((row, "heldout"))
        elif key in seen:
            dropped.append((row, "duplicate"))
        else:
            seen.add(key)
            kept.append(row)
    counts["augment_dropped_heldout"] = sum(reason == "heldout" for _, reason in dropped)
    counts["augment_dropped_duplicate"] = len(dropped)

    # --- consistency filter
    filtered = 0
    if args.augment_filter_run and kept:
        from querytune.inference import LoadedRun

        run = LoadedRun(args.augment_filter_run)
        agree = run.task.augment_agreement(run, kept)
        dropped += [(row, "filter") for row, ok in zip(kept, agree, strict=True) if not ok]
        kept = [row for row, ok in zip(kept, agree, strict=True) if ok]
        filtered = sum(not ok for ok in agree)
    counts["augment_dropped_filter"] = filtered
    counts["augment_kept"] = len(kept)
    for aug_name in dict.fromkeys(row.augmenter for row in kept):
        counts[f"augment_kept_{aug_name.replace('>', '_')}"] = sum(row.augmenter == aug_name for row in kept)
    counts["train_rows_original"] = len(train)
    counts["augment_seconds"] = round(time.perf_counter() - started, 3)  # models loaded, rows made, filtered

    if out_dir is not None:
        write_rows(out_dir / KEPT_FILE, [(row, None) for row in kept], originals)
        write_rows(out_dir / DROPPED_FILE, dropped, originals)
    splits = DatasetDict({**splits, "train": task.augmented_train(train, kept)})
    counts["train_rows_augmented"] = len(splits["train"])
    logger.info("augment %s: %s", "+".join(args.augment), json.dumps(counts))
    return splits, counts


def write_rows(path: Path, rows: list[tuple[Example, str | None]], originals: list[Example]) -> None:
    """One JSON line per row: the query (words, tags), label, augmenter, source row and text (and why it was dropped)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row, reason in rows:
            record: dict[str, Any] = {"text": row.text, "label": row.label, "augmenter": row.augmenter,
                                      "source_row": row.source, "source_text": originals[row.source].text}  # fmt: skip
            if row.tags is not None:
                record |= {"words": row.words, "tags": row.tags}
            if reason is not None:
                record["dropped"] = reason
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
