"""`eda`: Easy Data Augmentation (Wei & Zou 2019): synonym replacement, random insertion, random swap, random deletion.

Each new row applies one operation, the operations taking turns, to about `eda_alpha` of the words (at least one).
Offline and model-free but for the synonyms, which are the nearest whole-word neighbours of a word in a model's
input embeddings (`eda_synonym_model`, by default the run's own base model): WordNet needs a download, and a
model's embedding table is on every machine that trains. Insertion draws words from the train queries of the same
label (EDA inserts synonyms; corpus words of the label are its closest offline equivalent). On a slot corpus only
`O` words are replaced, swapped or deleted, inserted words are `O` and never land inside a span, so tags stay
aligned.

The edits are written here rather than taken from nlpaug or TextAttack: both work on strings and return strings
(no word alignment, so slot tags cannot follow), nlpaug draws from the global random state (no per-row seed), and
their synonym sources need WordNet or PPDB downloads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

from querytune.augment.base import Augmenter, Example, editable, match_case, row_rng, stopwords

OPERATIONS = ("synonym", "insert", "swap", "delete")


@dataclass
class EdaArguments:
    """Options of the `eda` augmenter."""

    paths: ClassVar[tuple[str, ...]] = ("eda_synonym_model",)  # local paths: saved resolved, so a run loads anywhere

    eda_operations: list[str] | None = field(
        default=None, metadata={"help": "eda: operations taking turns (default synonym, insert, swap, delete)."}
    )
    eda_alpha: float | None = field(
        default=None, metadata={"help": "eda: share of a query's words one operation changes (default 0.1, >= 1)."}
    )
    eda_synonym_model: str | None = field(
        default=None,
        metadata={"help": "eda: model whose input embeddings give near-synonyms (default: model_name_or_path)."},
    )
    eda_synonym_top_k: int | None = field(
        default=None, metadata={"help": "eda: nearest neighbours a synonym is drawn from (default 5)."}
    )
    eda_synonym_min_similarity: float | None = field(
        default=None, metadata={"help": "eda: least cosine similarity of a synonym to the word (default 0.4)."}
    )

    def __post_init__(self) -> None:
        bad = [op for op in self.eda_operations or [] if op not in OPERATIONS]
        if bad:
            raise ValueError(f"eda_operations: unknown operation {bad[0]!r}; known: {', '.join(OPERATIONS)}")
        if self.eda_alpha is not None and not 0 < self.eda_alpha <= 1:
            raise ValueError(f"eda_alpha must be in (0, 1], got {self.eda_alpha}")
        if self.eda_synonym_top_k is not None and self.eda_synonym_top_k < 1:
            raise ValueError(f"eda_synonym_top_k must be at least 1, got {self.eda_synonym_top_k}")

    def resolved(self, model_name_or_path: str) -> dict[str, Any]:
        return {
            "operations": list(self.eda_operations or OPERATIONS),
            "alpha": 0.1 if self.eda_alpha is None else self.eda_alpha,
            "synonym_model": self.eda_synonym_model or model_name_or_path,
            "top_k": self.eda_synonym_top_k or 5,
            "min_similarity": 0.4 if self.eda_synonym_min_similarity is None else self.eda_synonym_min_similarity,
        }


class EmbeddingSynonyms:
    """Near-synonyms of whole words: cosine neighbours among a tokenizer's whole-word tokens in the model's input
    embeddings, computed on demand and remembered."""

    def __init__(self, model_name: str, top_k: int, min_similarity: float) -> None:
        import torch
        from transformers import AutoModel

        from querytune.augment.base import whole_word_vocabulary
        from querytune.errors import ModelError
        from querytune.models import load_tokenizer, resolve_model_path

        path = resolve_model_path(model_name)
        try:
            model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ModelError(f"eda: could not load the synonym model {model_name!r} (resolved to {path!r}): "
                             f"{err}") from err  # fmt: skip
        tokenizer = load_tokenizer(model_name)
        words = whole_word_vocabulary(tokenizer)
        skip = stopwords()
        self.words = [w for w in words if len(w) > 1 and w not in skip]
        ids = torch.tensor([words[w] for w in self.words])
        table = model.get_input_embeddings().weight.detach()[ids].float()
        self.table = torch.nn.functional.normalize(table, dim=-1)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.top_k, self.min_similarity = top_k, min_similarity
        self.cache: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        key = word.lower()
        if key not in self.cache:
            self.cache[key] = self._neighbours(key)
        return self.cache[key]

    def _neighbours(self, word: str) -> list[str]:
        i = self.index.get(word)
        if i is None:
            return []
        sims = self.table @ self.table[i]
        sims[i] = -1.0
        values, idx = sims.topk(self.top_k)
        return [self.words[j] for v, j in zip(values.tolist(), idx.tolist(), strict=True) if v >= self.min_similarity]


class EdaAugmenter(Augmenter):
    name = "eda"
    options = EdaArguments

    def prepare(self) -> None:
        self.settings = self.opts.resolved(self.context.model_name_or_path)
        s = self.settings
        self.synonyms = (EmbeddingSynonyms(s["synonym_model"], s["top_k"], s["min_similarity"])
                         if "synonym" in s["operations"] else None)  # fmt: skip
        skip = stopwords()
        self.pool: dict[str, list[str]] = {}  # insertion words by label, and "" for the whole corpus
        for ex in self.context.train:
            for i in editable(ex):
                word = ex.words[i]
                if word.lower() not in skip and any(c.isalpha() for c in word):
                    self.pool.setdefault(ex.label, []).append(word)
                    self.pool.setdefault("\0all", []).append(word)
        self.skip = skip

    def identity(self) -> dict[str, Any]:
        from querytune.augment.base import model_identity

        s = self.settings
        model = model_identity(s["synonym_model"]) if "synonym" in s["operations"] else None
        # insertion draws from the train split: another sample is another cache
        return {
            "name": self.name,
            "settings": s,
            "synonym_model": model,
            "train": self.context.extra.get("train_fingerprint"),
        }

    def generate(self, examples: list[Example], k: list[int], seed: int) -> list[Example | None]:
        return [self.one(ex, j, seed) for ex, j in zip(examples, k, strict=True)]

    def one(self, ex: Example, k: int, seed: int) -> Example | None:
        rng = row_rng(seed, self.name, ex, k)
        ops = self.settings["operations"]
        first = rng.randrange(len(ops))
        for step in range(len(ops)):  # the row's turn, or the next operation that applies to it
            op = ops[(first + k + step) % len(ops)]
            made = getattr(self, op)(ex, rng, max(1, round(self.settings["alpha"] * len(ex.words))))
            if made is not None:
                words, tags = made
                return ex.derived(words, tags, self.name)
        return None

    # --- the four operations: (words, tags) or None when the operation cannot change this row
    def synonym(self, ex: Example, rng: random.Random, n: int):
        candidates = [i for i in editable(ex) if ex.words[i].lower() not in self.skip and self.synonyms(ex.words[i])]
        if not candidates:
            return None
        words = list(ex.words)
        for i in rng.sample(candidates, min(n, len(candidates))):
            words[i] = match_case(rng.choice(self.synonyms(words[i])), words[i])
        return words, ex.tags

    def insert(self, ex: Example, rng: random.Random, n: int):
        pool = self.pool.get(ex.label) or self.pool.get("\0all")
        if not pool:
            return None
        words, tags = list(ex.words), None if ex.tags is None else list(ex.tags)
        for _ in range(n):
            # a new word goes before a word that starts no continuation of a span (never between B-x and I-x)
            places = [
                p for p in range(len(words) + 1) if tags is None or p == len(words) or not tags[p].startswith("I-")
            ]
            p = rng.choice(places)
            words.insert(p, rng.choice(pool))
            if tags is not None:
                tags.insert(p, "O")
        return words, tags

    def swap(self, ex: Example, rng: random.Random, n: int):
        positions = editable(ex)
        if len(positions) < 2:
            return None
        words = list(ex.words)
        for _ in range(n):
            a, b = rng.sample(positions, 2)
            words[a], words[b] = words[b], words[a]
        return (words, ex.tags) if words != ex.words else None

    def delete(self, ex: Example, rng: random.Random, n: int):
        positions = editable(ex)
        if len(ex.words) < 2 or not positions:
            return None
        p = self.settings["alpha"]
        gone = {i for i in positions if rng.random() < p}
        if not gone:
            gone = {rng.choice(positions)}
        if len(gone) >= len(ex.words):  # keep at least one word
            gone = set(sorted(gone)[: len(ex.words) - 1])
        words = [w for i, w in enumerate(ex.words) if i not in gone]
        tags = None if ex.tags is None else [t for i, t in enumerate(ex.tags) if i not in gone]
        return words, tags
