"""BM25 over document titles with bm25s (English stop words, Snowball stemming when PyStemmer is installed)."""

from __future__ import annotations

import bm25s
import numpy as np

LARGE_CATALOGUE = 20_000  # documents; indexing more shows progress bars


def _stemmer():
    try:
        import Stemmer

        return Stemmer.Stemmer("english")
    except ImportError:  # bm25s works without it; stemming helps (README of ../shared/data: 0.358 vs 0.314)
        return None


class BM25Index:
    """A BM25 index of a catalogue; `search` returns the top-k (document id, score) per query."""

    def __init__(self, doc_ids: list[str], texts: list[str], stem: bool = True) -> None:
        if not doc_ids:
            raise ValueError("BM25Index: the catalogue is empty")
        self.doc_ids = list(doc_ids)
        self.stemmer = _stemmer() if stem else None
        self.retriever = bm25s.BM25()
        large = len(texts) >= LARGE_CATALOGUE  # bm25s's own progress bars, for catalogues that take a while
        self.retriever.index(self._tokenize(texts, large), show_progress=large)

    def _tokenize(self, texts: list[str], show_progress: bool = False):
        return bm25s.tokenize(texts, stopwords="en", stemmer=self.stemmer, show_progress=show_progress)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        k = min(k, len(self.doc_ids))
        tokens = bm25s.tokenize(queries, stopwords="en", stemmer=self.stemmer, return_ids=False, show_progress=False)
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        out = []
        for row_docs, row_scores in zip(np.asarray(docs), np.asarray(scores), strict=True):
            # bm25s fills a query with no matching term with zero scores: those are not hits.
            out.append([(self.doc_ids[int(d)], float(s)) for d, s in zip(row_docs, row_scores, strict=True) if s > 0])
        return out
