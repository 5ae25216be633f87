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
import json
import logging
from pathlib import Path
from typing import Any

from querytune.config import DataArguments
from querytune.data import DataError, load_raw, split_groups
from querytune.tasks.rewrite.args import RewriteArguments

logger = logging.getLogger(__name__)

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


def load_columns(data: DataArguments, args: RewriteArguments) -> dict[str, list[Row]]:
    """Rows of any dataset `load_raw` reads, by split name, from the configured columns."""
    raw, source = load_raw(data)
    out = {}
    for split, ds in raw.items():
        for column in (args.rewrite_query_column, args.rewrite_target_column):
            if column not in ds.column_names:
                raise DataError(f"{source}: split {split!r} has no column {column!r}; it has {ds.column_names}. "
                                "Set rewrite_query_column / rewrite_target_column.")  # fmt: skip
        has_context = args.rewrite_context_column in ds.column_names if args.rewrite_context_column else False
        group = args.rewrite_group_column
        if group and group not in ds.column_names:
            raise DataError(f"{source}: split {split!r} has no rewrite_group_column {group!r}")
        rows = []
        for i, r in enumerate(ds):
            query = r[args.rewrite_query_column]
            if query is None:
                raise DataError(f"{source}: split {split!r}, row {i}: empty {args.rewrite_query_column!r}")
            rows.append({"group": str(r[group]) if group else str(query), "query": str(query),
                         "context": _as_list(r[args.rewrite_context_column]) if has_context else [],
                         "targets": _as_list(r[args.rewrite_target_column])})  # fmt: skip
        out[split] = rows
    return out


def load_rows(data: DataArguments, args: RewriteArguments) -> tuple[dict[str, list[Row]], str]:
    """Rows by split (a single 'train' split for the corpora that come unsplit) and the format used."""
    name = data.dataset_name or data.train_file
    path = Path(name) if name else None
    fmt = args.rewrite_format
    if fmt == "auto":
        fmt = detect_format(path) if path is not None and path.exists() else "columns"
    if fmt != "columns" and (path is None or not path.exists()):
        raise DataError(f"rewrite_format {fmt!r} needs dataset_name to be a local file or folder, got {name!r}")
    if fmt == "trec_cast":
        rows = {"train": load_trec_cast(path)}
    elif fmt == "canard":
        rows = {"train": load_canard(path)}
    elif fmt == "mimics":
        rows = {"train": load_mimics(path, args.mimics_min_option_label, args.mimics_min_overall_label)}
    else:
        rows = load_columns(data, args)
    for split, items in rows.items():
        if not items:
            raise DataError(f"{name}: split {split!r} has no usable rows (format {fmt})")
    return rows, fmt


# --- splitting
def group_split(rows: list[Row], validation_percentage: float, test_percentage: float,
                seed: int) -> dict[str, list[Row]]:  # fmt: skip
    """Seeded split by `group` (`querytune.data.split_groups`, rule `shuffle`): every row of a conversation (or
    query) lands in one split only."""
    roles = split_groups([r["group"] for r in rows], test_percentage, validation_percentage, seed, rule="shuffle")
    out: dict[str, list[Row]] = {"train": [], "validation": [], "test": []}
    for r in rows:
        out[roles[r["group"]]].append(r)
    return {k: v for k, v in out.items() if v}
