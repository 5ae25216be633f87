"""Sequence classification of queries: intent detection (with out-of-scope) and any text classification."""
