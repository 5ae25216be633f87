"""Query rewriting and expansion: a query (plus earlier turns) -> a better query, or -> refinement options."""
