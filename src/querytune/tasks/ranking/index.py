"""Nearest-neighbour search over unit-length catalogue embeddings: exact (brute-force cosine) or a faiss index.

`retrieval_index: exact` scores every document (a matrix product, in query chunks so memory stays bounded);
`retrieval_index: faiss` builds a faiss index from `retrieval_faiss_factory` (e.g. `HNSW32`, `IVF4096,Flat`) with
inner-product metric, which on unit vectors is cosine, and sets `retrieval_faiss_params` (e.g. `efSearch=128`,
`nprobe=16`) through faiss's `ParameterSpace`. Built indexes are cached as files next to the catalogue embeddings.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def top_k(query_emb: np.ndarray, doc_emb: np.ndarray, k: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine scores of the k nearest documents per query, best first (exact)."""
    k = min(k, len(doc_emb))
    idx_out = np.zeros((len(query_emb), k), dtype=np.int64)
    score_out = np.zeros((len(query_emb), k), dtype=np.float32)
    for start in range(0, len(query_emb), chunk):  # a 54k catalogue x 1k queries would be 200 MB at once
        scores = query_emb[start : start + chunk] @ doc_emb.T
        idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part = np.take_along_axis(scores, idx, axis=1)
        order = np.argsort(-part, axis=1, kind="stable")
        idx_out[start : start + chunk] = np.take_along_axis(idx, order, axis=1)
        score_out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
    return idx_out, score_out


class ExactIndex:
    """Brute-force cosine search: every document scored."""

    kind = "exact"

    def __init__(self, doc_emb: np.ndarray) -> None:
        self.doc_emb = np.ascontiguousarray(doc_emb, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.doc_emb)

    def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return top_k(np.asarray(query_emb, dtype=np.float32), self.doc_emb, k)


class FaissIndex:
    """An approximate inner-product index built by `faiss.index_factory`; `params` are search-time settings."""

    kind = "faiss"

    def __init__(self, doc_emb: np.ndarray, factory: str = "HNSW32", params: str = "",
                 cache_path: Path | None = None, seed: int = 0) -> None:  # fmt: skip
        from querytune.extras import require

        faiss = require("faiss", extra="search", feature="retrieval_index faiss")

        self.factory, self.params = factory, params
        emb = np.ascontiguousarray(doc_emb, dtype=np.float32)
        if cache_path is not None and cache_path.is_file():
            logger.info("faiss index from cache %s", cache_path)
            self.index = faiss.read_index(str(cache_path))
        else:
            try:
                self.index = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as err:
                raise ValueError(f"retrieval_faiss_factory {factory!r} is not a faiss index_factory string: "
                                 f"{str(err).splitlines()[0]}") from err  # fmt: skip
            if not self.index.is_trained:  # IVF / PQ learn their centroids from the vectors
                sample = emb
                limit = 256 * max(1, getattr(self.index, "nlist", 1))
                if len(emb) > limit:
                    sample = emb[np.random.default_rng(seed).choice(len(emb), limit, replace=False)]
                self.index.train(sample)
            self.index.add(emb)
            if cache_path is not None:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
                faiss.write_index(self.index, str(tmp))
                tmp.replace(cache_path)
        if self.index.ntotal != len(emb):
            raise ValueError(f"faiss index holds {self.index.ntotal} vectors, the catalogue {len(emb)}")
        if params:
            try:
                faiss.ParameterSpace().set_index_parameters(self.index, params)
            except RuntimeError as err:
                raise ValueError(f"retrieval_faiss_params {params!r} do not apply to a {factory} index: "
                                 f"{str(err).splitlines()[0]}") from err  # fmt: skip

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self))
        scores, idx = self.index.search(np.ascontiguousarray(query_emb, dtype=np.float32), k)
        return idx.astype(np.int64), scores  # a slot faiss could not fill is -1: callers drop it

    def write(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))


def index_cache_path(folder: Path, emb_key: str, factory: str) -> Path:
    """Where the faiss index of one set of embeddings and one factory string is cached."""
    return folder / f"{emb_key}-{hashlib.sha256(factory.encode()).hexdigest()[:12]}.faiss"


def build_index(doc_emb: np.ndarray, kind: str, factory: str = "HNSW32", params: str = "",
                cache_path: Path | None = None) -> ExactIndex | FaissIndex:  # fmt: skip
    """The index `retrieval_index` names over these embeddings."""
    if kind == "exact":
        return ExactIndex(doc_emb)
    if kind == "faiss":
        return FaissIndex(doc_emb, factory, params, cache_path)
    raise ValueError(f"retrieval_index must be 'exact' or 'faiss', got {kind!r}")
