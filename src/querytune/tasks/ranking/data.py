"""Query–document relevance data for `task: rerank` and `task: retrieval`: query-grouped splits and the catalogue.

Any dataset with a query column (`text_column`), a document-text column (`text_pair_column`), a graded label
(`label_column`) and optionally a document id (`document_id_column`) works: a Hub id or local csv/jsonl/parquet,
read through `querytune.data.load_splits`.

**Split rule** (used only for the splits the dataset does not have; never a query in two splits). A query is
grouped by its normalised text `q = " ".join(query.split()).lower()`, and `querytune.data.split_groups` (rule
`hash`) gives it a bucket `int(md5(f"{ranking_split_seed}:{q}").hexdigest(), 16) % 10000 / 100`, a number in
[0, 100). Bucket `< ranking_test_percentage` is test, the next `validation_split_percentage` points are validation,
the rest train. Queries given in the dataset's own splits are checked instead: one in two splits is an error.

The catalogue searched at evaluation is `catalogue_file` or, by default, every distinct document of every split
(before any subsampling).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from datasets import Dataset, DatasetDict

from querytune.config import DataArguments
from querytune.data import DataError, hash_bucket, load_raw, load_splits, sample, split_groups
from querytune.tasks.ranking.args import RankingArguments

logger = logging.getLogger(__name__)

COLUMNS = ["query_id", "query", "doc_id", "document", "label"]


@dataclass
class RankingData:
    """Query-grouped splits (columns `COLUMNS`) and the catalogue (document id → text)."""

    splits: DatasetDict
    catalogue: dict[str, str]
    source: str


def normalise_query(query: str) -> str:
    return " ".join(str(query).split()).lower()


def query_bucket(query: str, seed: int = 0) -> float:
    """The query's place in [0, 100) under the seeded md5 split rule (see the module docstring)."""
    return hash_bucket(normalise_query(query), seed)


def _frame(ds: Dataset, split: str, data: DataArguments, args: RankingArguments, source: str) -> pd.DataFrame:
    """One split as a frame with the standard columns; missing columns, empty texts or non-numeric labels fail."""
    needed = [data.text_column, data.text_pair_column, data.label_column]
    if args.document_id_column:
        needed.append(args.document_id_column)
    for column in needed:
        if column not in ds.column_names:
            raise DataError(
                f"{source}: split {split!r} has no column {column!r}; it has {ds.column_names}. Set text_column "
                "(query), text_pair_column (document text), label_column (graded relevance) and document_id_column."
            )
    df = ds.select_columns(needed).to_pandas()
    for column in (data.text_column, data.text_pair_column):
        empty = df[column].isna() | (df[column].astype(str).str.strip() == "")
        if empty.any():
            raise DataError(f"{source}: split {split!r} column {column!r} is empty in {int(empty.sum())} row(s)")
    labels = pd.to_numeric(df[data.label_column], errors="coerce")
    if labels.isna().any():
        bad = df.loc[labels.isna(), data.label_column].astype(str).unique()[:5].tolist()
        raise DataError(
            f"{source}: split {split!r} column {data.label_column!r} needs numeric relevance grades; got {bad}"
        )
    doc_ids = df[args.document_id_column].astype(str) if args.document_id_column else df[data.text_pair_column]
    return pd.DataFrame(
        {
            "query_id": df[data.text_column].map(normalise_query),
            "query": df[data.text_column].astype(str).str.strip(),
            "doc_id": doc_ids.astype(str),
            "document": df[data.text_pair_column].astype(str),
            "label": labels.astype("float64"),
        }
    )


def load_ranking_data(data: DataArguments, args: RankingArguments, seed: int) -> RankingData:
    """Train / validation / test frames grouped by query, subsampled by query, plus the full catalogue."""
    found, wanted, source = load_splits(data)
    given = {role: _frame(ds, wanted[role], data, args, source) for role, ds in found.items()}
    catalogue = build_catalogue(list(given.values()))
    if args.catalogue_file:
        catalogue = read_catalogue(args.catalogue_file, data, args)

    missing = [role for role in ("validation", "test") if role not in given and (role != "test" or data.test_split)]
    if missing:  # carve the missing roles out of train by the query hash
        train = given["train"]
        split = split_groups(train["query_id"], args.ranking_test_percentage, data.validation_split_percentage,
                             args.ranking_split_seed, rule="hash")  # fmt: skip
        roles = train["query_id"].map(split)
        for role in missing:
            given[role] = train[roles == role].reset_index(drop=True)
        given["train"] = train[~roles.isin(missing)].reset_index(drop=True)
        logger.info("split by query hash (seed %d): %s", args.ranking_split_seed,
                    {r: f"{df['query_id'].nunique()} queries / {len(df)} pairs" for r, df in given.items()})  # fmt: skip
    check_no_leakage(given, source)
    for role, df in given.items():
        if df.empty:
            raise DataError(f"{source}: split {role!r} has no rows after splitting by query")

    limits = {"train": args.max_train_queries, "validation": args.max_eval_queries, "test": args.max_eval_queries}
    for role, df in given.items():
        if limits.get(role):
            given[role] = sample_queries(df, limits[role], seed)
    splits = DatasetDict({role: Dataset.from_pandas(df, preserve_index=False) for role, df in given.items()})
    return RankingData(splits=splits, catalogue=catalogue, source=source)


def check_no_leakage(frames: dict[str, pd.DataFrame], source: str) -> None:
    """A query in two splits would let a model memorise its test judgements: fail, naming one."""
    seen: dict[str, str] = {}
    for role, df in frames.items():
        for query in df["query_id"].unique():
            if query in seen and seen[query] != role:
                raise DataError(f"{source}: query {query!r} is in both the {seen[query]!r} and {role!r} splits")
            seen[query] = role


def sample_queries(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """All rows of a seeded sample of n queries (sorted first, so the sample does not depend on row order)."""
    keep = set(sample(sorted(df["query_id"].unique()), n, seed))
    return df[df["query_id"].isin(keep)].reset_index(drop=True)


def build_catalogue(frames: list[pd.DataFrame]) -> dict[str, str]:
    """Document id → text over all frames (the first text seen for an id wins)."""
    catalogue: dict[str, str] = {}
    for df in frames:
        for doc_id, text in zip(df["doc_id"], df["document"], strict=True):
            catalogue.setdefault(doc_id, text)
    return catalogue


def read_catalogue(path: str, data: DataArguments, args: RankingArguments) -> dict[str, str]:
    """A catalogue file: .txt (one document per line; the text is the id) or a table with the document columns."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"catalogue file not found: {path}")
    if file.suffix.lower() == ".txt":
        lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        return {line: line for line in lines}
    raw, source = load_raw(DataArguments(task=data.task, train_file=str(file), text_pair_column="x"))
    ds = raw["train"]
    text_col, id_col = data.text_pair_column, args.document_id_column
    for column in [text_col] + ([id_col] if id_col else []):
        if column not in ds.column_names:
            raise DataError(f"catalogue {path}: no column {column!r}; it has {ds.column_names}")
    texts = [str(t) for t in ds[text_col]]
    ids = [str(i) for i in ds[id_col]] if id_col else texts
    return dict(zip(ids, texts, strict=True))


def qrels(df: pd.DataFrame | Dataset) -> dict[str, dict[str, float]]:
    """Query id → {document id → label} of the judged pairs."""
    frame = df.to_pandas() if isinstance(df, Dataset) else df
    out: dict[str, dict[str, float]] = {}
    for q, d, y in zip(frame["query_id"], frame["doc_id"], frame["label"], strict=True):
        out.setdefault(q, {})[d] = float(y)
    return out


def first_query_texts(df: pd.DataFrame | Dataset) -> dict[str, str]:
    """Query id → the query text as first written in the data."""
    frame = df.to_pandas() if isinstance(df, Dataset) else df
    return dict(frame.drop_duplicates("query_id")[["query_id", "query"]].itertuples(index=False, name=None))
