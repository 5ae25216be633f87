"""What every augmenter shares: the row it works on, the contract it fills in, and the rules for slot corpora.

A row is an `Example`: the query's words, its label (the intent; "" where the corpus has none) and, on slot corpora,
one BIO tag per word. An augmenter returns new Examples for a list of source Examples. On a slot corpus its output
must keep tags aligned: word editors (eda, mlm) touch only `O` words; text rewriters (paraphrase, backtranslate)
are kept only where every slot value survives verbatim, in order, and are re-tagged there (`retag`); `slot_swap`
replaces the slot values themselves.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

OUTSIDE = "O"


@dataclass
class Example:
    """One train row as augmenters see it."""

    words: list[str]
    label: str = ""  # the row's label (intent) for the per-label rules; "" when the corpus has none
    tags: list[str] | None = None  # one BIO tag per word on slot corpora
    source: int = -1  # index of the source row in the train split
    augmenter: str = ""  # the augmenter that made it ("" for an original row; "slot_swap>eda" for a chain)

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def derived(self, words: list[str], tags: list[str] | None, augmenter: str) -> Example:
        """A new row made from this one: same label and source row."""
        return Example(list(words), self.label, None if tags is None else list(tags), self.source, augmenter)


@dataclass
class AugmentContext:
    """What an augmenter may use besides its options: the run's base model, the train rows, batch size, seed."""

    model_name_or_path: str
    train: list[Example]
    batch_size: int = 32
    seed: int = 0
    tagged: bool = False  # a slot corpus: rows carry tags
    extra: dict[str, Any] = field(default_factory=dict)


class Augmenter:
    """Makes new rows from train rows. Subclasses set `name` and `options` and implement `generate`."""

    name: ClassVar[str]
    options: ClassVar[type | None] = None  # its option dataclass (flat keys prefixed with the name)
    needs_tags: ClassVar[bool] = False  # only meaningful on slot corpora (slot_swap)
    uses_model: ClassVar[bool] = False  # runs a model: batched, with a progress bar per batch

    def __init__(self, options: Any, context: AugmentContext) -> None:
        self.opts = options
        self.context = context

    def prepare(self) -> None:  # noqa: B027
        """Load what generation needs (models, vocabularies); a model that cannot be loaded raises `ModelError`
        naming it, before any row is generated."""

    def identity(self) -> dict[str, Any]:
        """What the generated rows depend on besides the source row and seed: options and model files (cache key)."""
        return {"name": self.name, "options": asdict(self.opts) if self.opts is not None else {}}

    def generate(self, examples: list[Example], k: list[int], seed: int) -> list[Example | None]:
        """For each source example and candidate index k (0, 1, ...), one new row or None when none can be made.
        Word editors seed each (row, k) on its own (`row_rng`), so a row's output never depends on its batch."""
        raise NotImplementedError


# --- seeds
def stable_hash(*parts: Any) -> int:
    """A 64-bit integer from any JSON-able parts, the same in every process (unlike `hash`)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def row_rng(seed: int, name: str, example: Example, k: int) -> random.Random:
    """The random generator of one (row, candidate) pair: depends on the row's content, not on its position."""
    return random.Random(stable_hash(seed, name, example.words, example.tags, example.label, k))


# --- words
def stopwords() -> frozenset[str]:
    """English stop words (scikit-learn's list, shipped with the package; no download)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return ENGLISH_STOP_WORDS


def editable(example: Example) -> list[int]:
    """Positions a word editor may change: every word, or on a slot corpus only the `O` words."""
    if example.tags is None:
        return list(range(len(example.words)))
    return [i for i, t in enumerate(example.tags) if t == OUTSIDE]


_WORD = re.compile(r"[a-z][a-z'-]*[a-z]|[a-z]")


def whole_word_vocabulary(tokenizer) -> dict[str, int]:
    """Lower-cased alphabetic words that are a single token of `tokenizer`, with their ids (WordPiece: entries
    without '##'; byte-level BPE / SentencePiece: entries that start a word, 'Ġ' / '▁')."""
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []))
    wordpiece = any(t.startswith("##") for t in vocab)
    words: dict[str, int] = {}
    for token, idx in vocab.items():
        if token in special:
            continue
        if wordpiece:
            word = None if token.startswith("##") else token
        else:
            word = token[1:] if token[:1] in ("Ġ", "▁") else None
        if word and _WORD.fullmatch(word) and word not in words:
            words[word] = idx
    return words


def match_case(word: str, like: str) -> str:
    """`word` written in the case of `like` (Title, UPPER or lower)."""
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


# --- slot corpora: rewrites of whole queries
def spans(words: Sequence[str], tags: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(type, words) of every BIO span, in order."""
    out: list[tuple[str, list[str]]] = []
    for word, tag in zip(words, tags, strict=True):
        if tag.startswith("B-") or (tag.startswith("I-") and (not out or out[-1][0] != tag[2:])):
            out.append((tag[2:], [word]))
        elif tag.startswith("I-"):
            out[-1][1].append(word)
    return out


def span_tags(kind: str, n: int) -> list[str]:
    return [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)


def retag(source: Example, words: list[str]) -> list[str] | None:
    """Tags for a rewritten query of a slot corpus: every slot value of `source` must occur verbatim (case-
    insensitive), as whole words and in the same order; those words get their span's tags, every other word `O`.
    None when a value is missing: the rewrite would change what the slots say."""
    assert source.tags is not None
    lowered = [w.lower() for w in words]
    tags = [OUTSIDE] * len(words)
    start = 0
    for kind, value in spans(source.words, source.tags):
        target = [w.lower() for w in value]
        found = next((i for i in range(start, len(words) - len(target) + 1)
                      if lowered[i : i + len(target)] == target), None)  # fmt: skip
        if found is None:
            return None
        tags[found : found + len(target)] = span_tags(kind, len(target))
        start = found + len(target)
    return tags


def finish_rewrite(source: Example, text: str, augmenter: str) -> Example | None:
    """A generated rewrite as a row: words split on whitespace, written in the source's style (a lower-case corpus
    stays lower-case, no trailing full stop unless the source had one), re-tagged on slot corpora."""
    text = " ".join(text.strip().strip('"').strip("'").split())
    if source.text == source.text.lower():
        text = text.lower()
    if text.endswith((".", "?", "!")) and not source.text.endswith((".", "?", "!")):
        text = text[:-1].rstrip()
    words = text.split()
    if not words or len(words) > 3 * len(source.words) + 5:
        return None
    tags = None
    if source.tags is not None:
        tags = retag(source, words)
        if tags is None:
            return None
    return source.derived(words, tags, augmenter)


def model_identity(name: str) -> dict[str, Any]:
    """A model's name and, for a local folder, the sizes and times of its files: a retrained model is a new key."""
    from querytune.models import resolve_model_path

    path = Path(resolve_model_path(name))
    files = {}
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
                stat = f.stat()
                files[f.name] = [stat.st_size, int(stat.st_mtime)]
    return {"model": name, "files": files}
