"""Prompts for rewriting: the rendered model input, context cut oldest turn first, and cleaned candidates."""

from __future__ import annotations

from collections.abc import Callable

from querytune.tasks.rewrite.data import Row

CONTEXT_SEPARATOR = " ||| "  # `querytune predict`: "earlier turn ||| earlier turn ||| follow-up"


def training_pairs(rows: list[Row], mode: str, separator: str) -> list[Row]:
    """One training example per target (`split`) or one per row with the targets joined (`join`)."""
    out = []
    for r in rows:
        if not r["targets"]:
            continue
        targets = r["targets"] if mode == "split" else [separator.join(r["targets"])]
        out.extend({**r, "target": t} for t in targets)
    return out


def render_context(turns: list[str]) -> str:
    return "Context: " + " | ".join(t.strip() for t in turns) + "\n" if turns else ""


def render_prompt(template: str, query: str, turns: list[str]) -> str:
    return template.replace("{context}", render_context(turns)).replace("{query}", query.strip())


def fit_context(
    template: str, query: str, turns: list[str], count: Callable[[str], int], budget: int, max_turns: int | None = None
) -> tuple[str, int]:
    """The prompt with as many of the latest turns as fit in `budget` tokens, and the number of turns dropped.

    Turns are dropped oldest first; the current query is never cut here (the tokenizer's truncation of an
    over-long query alone is the only cut left).
    """
    kept = list(turns[-max_turns:] if max_turns is not None and max_turns < len(turns) else turns)
    if max_turns == 0:
        kept = []
    dropped = len(turns) - len(kept)
    prompt = render_prompt(template, query, kept)
    if count(prompt) <= budget:
        return prompt, dropped
    lo, hi = 0, len(kept)  # smallest number of oldest turns to drop so that the rest fits (binary search)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(render_prompt(template, query, kept[mid + 1 :] if mid + 1 <= len(kept) else [])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    cut = min(lo + 1, len(kept))
    return render_prompt(template, query, kept[cut:]), dropped + cut


def clean_candidates(candidates: list[str], query: str, k: int) -> list[str]:
    """Stripped, de-duplicated (case- and space-insensitive) candidates that do not merely repeat the query."""
    seen = {_norm(query)}
    out = []
    for c in candidates:
        c = c.strip()
        key = _norm(c)
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(c)
        if len(out) == k:
            break
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().split())
