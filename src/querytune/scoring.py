"""Scoring query logs of any size: `querytune predict RUN --file LOG --output OUT`.

The log is read a chunk at a time (`--chunk_size` queries), each chunk scored in length-sorted batches (the task's
`predict`) and written before the next is read, so memory stays bounded whatever the log's size. Inputs: a text file
(one query per line; blank lines skipped), JSON lines (`--column`, default `query`) or parquet (`--column`).
Outputs: JSON lines (one result per query, in the log's order) or a parquet folder (`OUT.parquet/`, one part file
per chunk, columns `query` and `prediction`, the result as JSON). A killed job resumes where it stopped: the rows
already written (whole lines; whole part files) are kept and skipped, never scored again.

Beyond one machine, `RayScorer` scores a Ray Dataset with `map_batches` over an exported model (`pip install
'querytune[ray]'`); its rows equal this module's, row for row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from querytune.errors import DataError
from querytune.validation import query_problem

PARQUET = (".parquet", ".pq")


def read_chunks(path: str | Path, chunk_size: int, column: str = "query", skip: int = 0,
                head: list[str] | None = None) -> Iterator[list[str]]:  # fmt: skip
    """The log's queries (after `head`, queries given otherwise), `chunk_size` at a time, after the first `skip`;
    each checked as the server checks a query (an empty or unprintable one is an error naming the file and row)."""
    import itertools

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"query file not found: {path}")
    chunk: list[str] = []
    rows = itertools.chain(((f"query {i + 1}", q) for i, q in enumerate(head or [])), _rows(path, column))
    for n, (where, text) in enumerate(rows):
        if n < skip:
            continue
        problem = query_problem(text)
        if problem:
            raise DataError(f"{path} {where} {problem}")
        chunk.append(text)
        if len(chunk) == chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _rows(path: Path, column: str) -> Iterator[tuple[str, str]]:
    if path.suffix.lower() in PARQUET or path.is_dir():
        import pyarrow.parquet as pq

        source = pq.ParquetDataset(path) if path.is_dir() else pq.ParquetFile(path)
        names = source.schema.names if path.is_dir() else source.schema_arrow.names
        if column not in names:
            raise DataError(f"{path}: no column {column!r}; it has {names} (set --column)")
        row = 0
        batches = (source.read(columns=[column]).to_batches() if path.is_dir()
                   else source.iter_batches(batch_size=8192, columns=[column]))  # fmt: skip
        for batch in batches:
            for value in batch.column(0).to_pylist():
                row += 1
                yield f"row {row}", "" if value is None else str(value)
        return
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if not jsonl:
                yield f"line {n}", line.strip()
                continue
            record = json.loads(line)
            if column not in record:
                raise DataError(f"{path} line {n}: no field {column!r} (set --column)")
            yield f"line {n}", str(record[column])


class Sink:
    """Where results go, and how many a killed job already wrote (`done`)."""

    def __init__(self, path: str | Path | None, stream: Any = None) -> None:
        self.path = Path(path) if path else None
        self.stream = stream  # where results go without a path (stdout)
        self.parquet = self.path is not None and (self.path.suffix.lower() in PARQUET or self.path.is_dir())
        self.done = 0
        if self.path is None:
            return
        if self.parquet:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.path.glob("*.tmp"):
                stale.unlink()
            self.parts = sorted(self.path.glob("part-*.parquet"))
            self.done = sum(_parquet_rows(p) for p in self.parts)
        elif self.path.is_file():
            data = self.path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]  # a line cut by the kill is dropped, and scored again
            if len(whole) != len(data):
                self.path.write_bytes(whole)
            self.done = whole.count(b"\n")

    def write(self, results: list[dict[str, Any]]) -> None:
        if self.path is None:
            self.stream.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
            self.stream.flush()
            self.done += len(results)
            return
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"query": [r["query"] for r in results],
                              "prediction": [json.dumps(r, ensure_ascii=False) for r in results]})  # fmt: skip
            part = self.path / f"part-{len(self.parts):05d}.parquet"
            pq.write_table(table, part.with_name(part.name + ".tmp"))
            os.replace(part.with_name(part.name + ".tmp"), part)  # a part file is whole, or absent
            self.parts.append(part)
        else:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
                fh.flush()
                os.fsync(fh.fileno())
        self.done += len(results)


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def score_file(loaded: Any, src: str | Path, output: str | Path | None = None, chunk_size: int = 10_000,
               column: str = "query", top_k: int | None = None, batch_size: int = 64, stream: Any = None,
               head: list[str] | None = None, **inputs: Any) -> dict[str, int]:  # fmt: skip
    """Score every query of `src` with a loaded run or export into `output` (`stream`, stdout, when None), chunk by
    chunk; resumes after what `output` already holds. Returns the counts of rows skipped (already written) and
    scored."""
    if chunk_size < 1:
        raise ValueError(f"--chunk_size must be at least 1, got {chunk_size}")
    sink = Sink(output, stream)
    skipped, scored = sink.done, 0
    for chunk in read_chunks(src, chunk_size, column, skip=sink.done, head=head):
        sink.write(loaded.predict(chunk, top_k=top_k, batch_size=batch_size, **inputs))
        scored += len(chunk)
    return {"skipped": skipped, "scored": scored}


class RayScorer:
    """A Ray Data `map_batches` callable: each Ray worker loads the run or export once and scores its batches.

        import ray
        from querytune.scoring import RayScorer

        ds = ray.data.read_text("queries.txt")  # a column "text"
        out = ds.map_batches(RayScorer, fn_constructor_kwargs={"run_dir": "runs/x/exports/onnx-int8"},
                             batch_size=1024, concurrency=4, batch_format="pandas")
        out.write_parquet("scored/")

    Rows out: `query` and `prediction` (the task's result as JSON), as `querytune predict --output x.parquet`.
    Keep `concurrency` x `num_cpus` below the cluster's CPUs: the actors hold theirs for the whole job, and Ray Data's
    own read and repartition tasks need a CPU too (with none left, the job waits forever).
    """

    def __init__(self, run_dir: str, column: str = "text", threads: int = 1, top_k: int | None = None,
                 batch_size: int = 64) -> None:  # fmt: skip
        from querytune.inference import load_run

        self.run = load_run(run_dir, threads=threads)
        self.column, self.top_k, self.batch_size = column, top_k, batch_size

    def __call__(self, batch):
        import pandas as pd

        texts = [str(t).strip() for t in batch[self.column]]
        results = self.run.predict(texts, top_k=self.top_k, batch_size=self.batch_size)
        return pd.DataFrame({"query": texts, "prediction": [json.dumps(r, ensure_ascii=False) for r in results]})
