"""Data for query rewriting and expansion: corpus loaders, grouped splits, context truncation, prompts.

Every loader returns rows `{"group", "query", "context", "targets"}`: `context` is the list of earlier turns (oldest
first, possibly empty) and `targets` the list of acceptable outputs (one rewrite, or several refinements). `group`
is what must never straddle two splits: the conversation for contextual rewriting, the query for expansion.

- TREC CAsT 2019-2022 (`cast_rewrites*.jsonl`: year, conv_id, turn_id, context, raw, rewrite); group year-conv_id.
- CANARD (`dev.json` / `train.json` / `test.json`: History, Question, Rewrite, QuAC_dialog_id, Question_no); group
  the dialog.
- MIMICS-Manual (`MIMICS-Manual.tsv`): query -> its clarification options, one row per query with the options of
  all its panes; options whose quality label is below `mimics_min_option_label` (0 bad, 1 fair, 2 good) and panes
  whose `options_overall_label` is below `mimics_min_overall_label` are dropped.
- Anything else: columns `rewrite_query_column`, `rewrite_context_column` (optional), `rewrite_target_column`
  (a string or a list) of any file or Hub dataset `querytune.data.load_raw` reads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from querytune.config import DataArguments
from querytune.data import DataError, load_raw

logger = logging.getLogger(__name__)

FORMATS = ("auto", "columns", "trec_cast", "canard", "mimics")
MIMICS_OPTIONS = [f"option_{i}" for i in range(1, 6)]
MIMICS_OPTION_LABELS = [f"option_label_{i}" for i in range(1, 6)]
MIMICS_COLUMNS = ["query", "question", *MIMICS_OPTIONS, "question_label", "options_overall_label",
                  *MIMICS_OPTION_LABELS]  # fmt: skip
Row = dict[str, Any]


# --- format detection and loaders
def detect_format(path: Path) -> str:
    """Which loader reads `path` (a file or a folder), from its file names and, for json, its keys."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    names = [f.name.lower() for f in files]
    if any(n.startswith("cast_rewrites") and n.endswith(".jsonl") for n in names):
        return "trec_cast"
    if any(n.startswith("mimics") and n.endswith(".tsv") for n in names):
        return "mimics"
    for f in files:
        if f.suffix.lower() == ".json" and f.is_file():
            with f.open() as fh:
                head = fh.read(4096)
            if '"QuAC_dialog_id"' in head and '"Rewrite"' in head:
                return "canard"
    return "columns"


def load_trec_cast(path: Path) -> list[Row]:
    files = sorted(path.glob("cast_rewrites*.jsonl")) if path.is_dir() else [path]
    rows = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append({"group": f"{r['year']}-{r['conv_id']}", "query": r["raw"], "context": list(r["context"]),
                             "targets": [r["rewrite"]]})  # fmt: skip
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{f}, line {n}: not a CAsT rewrite row (year, conv_id, context, raw, rewrite): "
                                f"{type(err).__name__}: {err}") from err  # fmt: skip
    return rows


def load_canard(path: Path) -> list[Row]:
    files = [f for f in sorted(path.glob("*.json")) if f.name != "multiple_refs.json"] if path.is_dir() else [path]
    rows = []
    for f in files:
        try:
            items = json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{f}: invalid JSON: {err}") from err
        if not isinstance(items, list):
            continue
        for n, r in enumerate(items):
            try:
                rows.append({"group": str(r["QuAC_dialog_id"]), "query": r["Question"], "context": list(r["History"]),
                             "targets": [r["Rewrite"]]})  # fmt: skip
            except (KeyError, TypeError) as err:
                raise DataError(f"{f}, item {n}: missing CANARD key {err} (History, Question, Rewrite, "
                                "QuAC_dialog_id)") from err  # fmt: skip
    return rows


def _label(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value else None


def load_mimics(path: Path, min_option_label: int = 1, min_overall_label: int = 1) -> list[Row]:
    """One row per distinct query: the options of all its panes that pass the quality filter, in first-seen order.

    Queries left with no option are dropped. The label columns are the README's: `options_overall_label` for the
    answer set and `option_label_i` per option, 0 bad / 1 fair / 2 good; an option without a label passes.
    """
    f = next(iter(sorted(path.glob("*.tsv"))), None) if path.is_dir() else path
    if f is None or not f.is_file():
        raise DataError(f"{path}: no MIMICS-Manual .tsv file")
    with f.open(newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [
            c for c in ("query", *MIMICS_OPTIONS, "options_overall_label") if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise DataError(f"{f}: missing MIMICS column(s) {missing}; it has {reader.fieldnames}")
        by_query: dict[str, list[str]] = {}
        kept = dropped = 0
        for n, r in enumerate(reader, 2):
            query = (r["query"] or "").strip()
            if not query:
                continue
            try:
                overall = _label(r.get("options_overall_label"))
                labels = [_label(r.get(c)) for c in MIMICS_OPTION_LABELS]
            except ValueError as err:
                raise DataError(f"{f}, line {n}: a quality label is not an integer: {err}") from err
            options = by_query.setdefault(query, [])
            for option, label in zip((r.get(c) for c in MIMICS_OPTIONS), labels, strict=True):
                option = (option or "").strip()
                if not option:
                    continue
                if (overall is not None and overall < min_overall_label) or (
                    label is not None and label < min_option_label
                ):
                    dropped += 1
                elif option not in options:
                    options.append(option)
                    kept += 1
    logger.info("MIMICS %s: kept %d options, dropped %d by the quality filter", f, kept, dropped)
    return [{"group": q, "query": q, "context": [], "targets": opts} for q, opts in by_query.items() if opts]


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value if v is not None and str(v).strip()]
    return [str(value)] if str(value).strip() else []


def load_columns(data: DataArguments) -> dict[str, list[Row]]:
    """Rows of any dataset `load_raw` reads, by split name, from the configured columns."""
    raw, source = load_raw(data)
    out = {}
    for split, ds in raw.items():
        for column in (data.rewrite_query_column, data.rewrite_target_column):
            if column not in ds.column_names:
                raise DataError(f"{source}: split {split!r} has no column {column!r}; it has {ds.column_names}. "
                                "Set rewrite_query_column / rewrite_target_column.")  # fmt: skip
        has_context = data.rewrite_context_column in ds.column_names if data.rewrite_context_column else False
        group = data.rewrite_group_column
        if group and group not in ds.column_names:
            raise DataError(f"{source}: split {split!r} has no rewrite_group_column {group!r}")
        rows = []
        for i, r in enumerate(ds):
            query = r[data.rewrite_query_column]
            if query is None:
                raise DataError(f"{source}: split {split!r}, row {i}: empty {data.rewrite_query_column!r}")
            rows.append({"group": str(r[group]) if group else str(query), "query": str(query),
                         "context": _as_list(r[data.rewrite_context_column]) if has_context else [],
                         "targets": _as_list(r[data.rewrite_target_column])})  # fmt: skip
        out[split] = rows
    return out


def load_rows(data: DataArguments) -> tuple[dict[str, list[Row]], str]:
    """Rows by split (a single 'train' split for the corpora that come unsplit) and the format used."""
    name = data.dataset_name or data.train_file
    path = Path(name) if name else None
    fmt = data.rewrite_format
    if fmt == "auto":
        fmt = detect_format(path) if path is not None and path.exists() else "columns"
    if fmt != "columns" and (path is None or not path.exists()):
        raise DataError(f"rewrite_format {fmt!r} needs dataset_name to be a local file or folder, got {name!r}")
    if fmt == "trec_cast":
        rows = {"train": load_trec_cast(path)}
    elif fmt == "canard":
        rows = {"train": load_canard(path)}
    elif fmt == "mimics":
        rows = {"train": load_mimics(path, data.mimics_min_option_label, data.mimics_min_overall_label)}
    else:
        rows = load_columns(data)
    for split, items in rows.items():
        if not items:
            raise DataError(f"{name}: split {split!r} has no usable rows (format {fmt})")
    return rows, fmt


# --- splitting
def group_split(
    rows: list[Row], validation_percentage: float, test_percentage: float, seed: int
) -> dict[str, list[Row]]:
    """Seeded split by `group`: every row of a conversation (or query) lands in one split only."""
    groups = sorted({r["group"] for r in rows})
    random.Random(seed).shuffle(groups)
    n_test = round(len(groups) * test_percentage / 100)
    n_val = round(len(groups) * validation_percentage / 100)
    if len(groups) - n_test - n_val < 1 or (validation_percentage and n_val < 1):
        raise DataError(f"{len(groups)} groups are too few for {validation_percentage}% validation and "
                        f"{test_percentage}% test")  # fmt: skip
    role = {g: "test" for g in groups[:n_test]}
    role.update({g: "validation" for g in groups[n_test : n_test + n_val]})
    out: dict[str, list[Row]] = {"train": [], "validation": [], "test": []}
    for r in rows:
        out[role.get(r["group"], "train")].append(r)
    return {k: v for k, v in out.items() if v}


def sample_rows(rows: list[Row], n: int | None, seed: int) -> list[Row]:
    """A seeded random sample of n rows (all of them when n is None or larger)."""
    if n is None or n >= len(rows):
        return rows
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def stable_hash(text: str) -> int:
    return int(hashlib.md5(text.encode()).hexdigest(), 16)


# --- targets, context and prompts
def training_pairs(rows: list[Row], mode: str, separator: str) -> list[Row]:
    """One training example per target (`split`) or one per row with the targets joined (`join`)."""
    out = []
    for r in rows:
        if not r["targets"]:
            continue
        targets = r["targets"] if mode == "split" else [separator.join(r["targets"])]
        out.extend({**r, "target": t} for t in targets)
    return out


def render_context(turns: list[str]) -> str:
    return "Context: " + " | ".join(t.strip() for t in turns) + "\n" if turns else ""


def render_prompt(template: str, query: str, turns: list[str]) -> str:
    return template.replace("{context}", render_context(turns)).replace("{query}", query.strip())


def fit_context(
    template: str, query: str, turns: list[str], count: Callable[[str], int], budget: int, max_turns: int | None = None
) -> tuple[str, int]:
    """The prompt with as many of the latest turns as fit in `budget` tokens, and the number of turns dropped.

    Turns are dropped oldest first; the current query is never cut here (the tokenizer's truncation of an
    over-long query alone is the only cut left).
    """
    kept = list(turns[-max_turns:] if max_turns is not None and max_turns < len(turns) else turns)
    if max_turns == 0:
        kept = []
    dropped = len(turns) - len(kept)
    prompt = render_prompt(template, query, kept)
    if count(prompt) <= budget:
        return prompt, dropped
    lo, hi = 0, len(kept)  # smallest number of oldest turns to drop so that the rest fits (binary search)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(render_prompt(template, query, kept[mid + 1 :] if mid + 1 <= len(kept) else [])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    cut = min(lo + 1, len(kept))
    return render_prompt(template, query, kept[cut:]), dropped + cut


def clean_candidates(candidates: list[str], query: str, k: int) -> list[str]:
    """Stripped, de-duplicated (case- and space-insensitive) candidates that do not merely repeat the query."""
    seen = {_norm(query)}
    out = []
    for c in candidates:
        c = c.strip()
        key = _norm(c)
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(c)
        if len(out) == k:
            break
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().split())
