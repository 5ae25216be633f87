"""A trained cross-encoder as the bi-encoder's teacher: its scores of (query, document) pairs, cached on disk.

The cache is one file per teacher, named by a digest of the teacher's weights and max_seq_length (so retraining
the teacher, or changing its length, starts a new cache), holding a score per pair keyed by a digest of the query
and document text. Scores are computed once: a pair seen before, in this process or an earlier one, is read back.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from querytune.data import DataError
from querytune.tasks.ranking.common import model_fingerprint, score_pairs

logger = logging.getLogger(__name__)


def pair_key(query: str, document: str) -> bytes:
    """A fixed-size digest of one (query, document) pair: the cache key of its score."""
    return hashlib.sha256(f"{query}\x00{document}".encode()).digest()[:16]


class TeacherScores:
    """Scores of (query, document) pairs by a finished rerank run, computed once per pair and cached on disk."""

    def __init__(self, run_dir: str | Path, cache_dir: str | Path | None, batch_size: int = 128,
                 device: str | None = None) -> None:  # fmt: skip
        from querytune.inference import LoadedRun
        from querytune.runs import is_export

        path = Path(run_dir)
        if not path.is_dir():
            raise DataError(f"retrieval_teacher: {run_dir} is not a directory (a finished rerank run)")
        self.run = LoadedRun(path, merge=True, device=device)
        if self.run.config.data.task != "rerank":
            raise DataError(f"retrieval_teacher: {run_dir} is a {self.run.config.data.task!r} run; the teacher must "
                            "be a rerank (cross-encoder) run")  # fmt: skip
        self.max_length = self.run.config.model.max_length(self.run.tokenizer)
        self.batch_size = batch_size
        weights = {"onnx": "model.onnx", "openvino": "model.bin"}.get(self.run.format) if is_export(path) else None
        fingerprint = (model_fingerprint(self.run.model) if weights is None
                       else hashlib.sha256((path / weights).read_bytes()).hexdigest()[:20])  # fmt: skip
        self.fingerprint = f"{fingerprint}-len{self.max_length}"
        folder = Path(cache_dir or "~/.cache/querytune/catalogue").expanduser() / "teacher"
        self.path = folder / f"{self.fingerprint}.npz"
        self.scores: dict[bytes, float] = {}
        if self.path.is_file():
            saved = np.load(self.path)
            self.scores = dict(zip((row.tobytes() for row in saved["keys"]), saved["scores"].tolist(), strict=True))
            logger.info("teacher scores: %d cached pairs from %s", len(self.scores), self.path)
        self.computed = 0  # pairs scored by the model in this process (the rest came from the cache)

    def __call__(self, queries: list[str], documents: list[str]) -> np.ndarray:
        """The teacher's score of each pair (cached pairs are read back, the others scored and saved)."""
        keys = [pair_key(q, d) for q, d in zip(queries, documents, strict=True)]
        todo = list({k: i for i, k in enumerate(keys) if k not in self.scores}.values())
        if todo:
            logger.info(
                "teacher: scoring %d new (query, document) pairs (%d cached)", len(todo), len(keys) - len(todo)
            )
            new = score_pairs(self.run.model, self.run.tokenizer, [queries[i] for i in todo],
                              [documents[i] for i in todo], self.max_length, self.batch_size)  # fmt: skip
            self.scores.update((keys[i], float(s)) for i, s in zip(todo, new, strict=True))
            self.computed += len(todo)
            self.save()
        return np.array([self.scores[k] for k in keys], dtype=np.float32)

    def save(self) -> None:
        """Write the cache atomically (another process reading it never sees half a file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}.npz")
        # Raw bytes as uint8 rows: numpy's "S" strings would drop a digest's trailing zero bytes.
        keys = np.frombuffer(b"".join(self.scores), dtype=np.uint8).reshape(-1, 16)
        np.savez(tmp, keys=keys, scores=np.array(list(self.scores.values()), dtype=np.float32))
        tmp.replace(self.path)
