"""The cache of generated rows: one SQLite file per augmenter identity (its options, model files and, for augmenters
that read the train split, that split's fingerprint), one entry per (source row, candidate index, seed).

Entries are committed batch by batch, so a run killed while generating resumes where it stopped, and a second run
on an overlapping sample (10 queries per intent, then 20) generates only what is new. SQLite serialises writers:
several processes (DDP ranks, sweep workers) may share a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from querytune.augment.base import Example


def default_dir() -> Path:
    return Path(os.environ.get("QUERYTUNE_CACHE", "~/.cache/querytune")).expanduser() / "augment"


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class RowCache:
    """Generated rows of one augmenter identity, by (source row, k, seed)."""

    def __init__(self, folder: str | Path | None, identity: dict[str, Any]) -> None:
        folder = Path(folder).expanduser() if folder else default_dir()
        folder.mkdir(parents=True, exist_ok=True)
        key = digest(identity)[:20]
        self.path = folder / f"{identity['name']}-{key}.sqlite"
        about = folder / f"{identity['name']}-{key}.json"  # what the file was made with, for a curious user
        if not about.is_file():
            tmp = about.with_name(about.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(identity, indent=2, default=str))
            tmp.replace(about)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS rows (key TEXT PRIMARY KEY, value TEXT)")
        self.db.commit()

    @staticmethod
    def key(example: Example, k: int, seed: int) -> str:
        return digest([seed, example.words, example.tags, example.label, k])

    def get(self, keys: list[str]) -> dict[str, Any]:
        """The cached entries among `keys` (a value of None means: the augmenter could make no row)."""
        found: dict[str, Any] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, value in self.db.execute(f"SELECT key, value FROM rows WHERE key IN ({marks})", chunk):
                found[key] = json.loads(value)
        return found

    def put(self, entries: dict[str, Any]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?)",
                                [(k, json.dumps(v)) for k, v in entries.items()])  # fmt: skip

    def close(self) -> None:
        self.db.close()
