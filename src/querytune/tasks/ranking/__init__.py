"""Query–product relevance: a cross-encoder reranker (`rerank`) and a bi-encoder retriever (`retrieval`)."""
