"""Training pairs of the bi-encoder and their negatives, mined from the catalogue, with teacher scores.

Every relevant (query, document) pair of a split is one training row. Its negatives are:

- one judged non-relevant document of the same query (`retrieval_hard_negatives`), and
- `retrieval_negatives` documents mined from the catalogue: unjudged documents of the query's BM25 top
  `retrieval_negative_depth` (`bm25`), of the model's own top `retrieval_negative_depth` (`dense`, re-mined while the
  model trains by `MiningCallback`), or half each (`mixed`). A mined negative is never a document judged for the
  query, nor one whose text is that of a document judged relevant for it (a duplicate listing).

The draw is per query (all pairs of a query share it) and seeded by the round of mining, so it depends only on the
seed, the data and the model. With a teacher, every (query, positive) and (query, negative) pair is scored by it
once (`TeacherScores` caches the scores on disk).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from transformers import TrainerCallback

from querytune.tasks.ranking.args import RankingArguments

logger = logging.getLogger(__name__)


def normalise_text(text: str) -> str:
    return " ".join(str(text).split()).lower()


@dataclass
class QueryJudgements:
    """One query of one split: its text and its judged documents (id -> label)."""

    role: str
    query_id: str
    text: str
    judged: dict[str, float]


@dataclass
class NegativeMiner:
    """The training pairs of every split and their current negatives.

    `search_bm25(queries, k)` and `search_dense(model, tokenizer, queries, k)` return each query's ranked document
    ids; `teacher(queries, documents)` scores pairs (or is None).
    """

    args: RankingArguments
    catalogue: dict[str, str]
    queries: list[QueryJudgements]
    search_bm25: Callable[[list[str], int], list[list[str]]]
    search_dense: Callable[..., list[list[str]]] | None = None
    teacher: Callable[[list[str], list[str]], np.ndarray] | None = None
    seed: int = 0
    mined_roles: tuple[str, ...] = ("train", "validation")
    # --- filled by build()
    pair_query: list[int] = field(default_factory=list)  # pair -> index into queries
    pair_positive: list[str] = field(default_factory=list)  # pair -> relevant document id
    pair_judged_negative: list[str | None] = field(default_factory=list)
    pools: dict[str, dict[int, list[str]]] = field(default_factory=dict)  # source -> query -> candidate ids
    drawn: dict[int, list[str]] = field(default_factory=dict)  # query -> current mined negatives
    teacher_scores: dict[tuple[int, str], float] = field(default_factory=dict)  # (query, document id) -> score
    rounds: int = 0  # mining rounds so far (the draw's seed)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        threshold = self.args.relevance_threshold
        by_text: dict[str, list[str]] = {}  # a product listed twice under two ids is still the same product
        for d, t in self.catalogue.items():
            by_text.setdefault(normalise_text(t), []).append(d)
        self.relevant: list[set[str]] = []
        self.excluded: list[set[str]] = []
        for qi, q in enumerate(self.queries):
            relevant = {d for d, y in q.judged.items() if y >= threshold}
            others = sorted(d for d, y in q.judged.items() if y < threshold)
            same_text = {x for d in relevant for x in by_text.get(normalise_text(self.catalogue.get(d, d)), [])}
            self.relevant.append(relevant)
            self.excluded.append(set(q.judged) | same_text)
            for d in sorted(relevant):
                self.pair_query.append(qi)
                self.pair_positive.append(d)
                use = self.args.retrieval_hard_negatives and others
                self.pair_judged_negative.append(others[int(rng.integers(len(others)))] if use else None)

    # --- which sources, how many from each
    @property
    def sources(self) -> dict[str, int]:
        n, source = self.args.retrieval_negatives, self.args.retrieval_negative_source
        if not n:
            return {}
        if source == "mixed":
            return {"bm25": n - n // 2, "dense": n // 2}
        return {source: n}

    @property
    def needs_model(self) -> bool:
        """Whether mining needs the model being trained (the dense source)."""
        return "dense" in self.sources

    def mined_queries(self, roles: tuple[str, ...]) -> list[int]:
        return [qi for qi, q in enumerate(self.queries) if q.role in roles and q.role in self.mined_roles]

    # --- mining
    def _pool(self, qi: int, ranked: list[str]) -> list[str]:
        excluded = self.excluded[qi]
        return [d for d in ranked if d not in excluded]

    def mine_bm25(self) -> None:
        """The unjudged BM25 top retrieval_negative_depth of every mined query (once: BM25 does not change)."""
        if "bm25" not in self.sources or "bm25" in self.pools:
            return
        ids = self.mined_queries(self.mined_roles)
        hits = self.search_bm25([self.queries[qi].text for qi in ids], self.args.retrieval_negative_depth)
        self.pools["bm25"] = {qi: self._pool(qi, h) for qi, h in zip(ids, hits, strict=True)}

    def mine_dense(self, model, tokenizer, roles: tuple[str, ...]) -> None:
        """The unjudged top retrieval_negative_depth of the model being trained, for the queries of `roles`."""
        if not self.needs_model or self.search_dense is None:
            return
        ids = self.mined_queries(roles)
        was_training = model.training
        hits = self.search_dense(model, tokenizer, [self.queries[qi].text for qi in ids],
                                 self.args.retrieval_negative_depth)  # fmt: skip
        model.train(was_training)
        pool = self.pools.setdefault("dense", {})
        pool.update({qi: self._pool(qi, h) for qi, h in zip(ids, hits, strict=True)})

    def draw(self, roles: tuple[str, ...]) -> None:
        """Draw each query's negatives from its pools (seeded by the round), then score new pairs by the teacher."""
        rng = np.random.default_rng((self.seed, self.rounds))
        self.rounds += 1
        for qi in self.mined_queries(roles):
            picked: list[str] = []
            wanted = self.sources
            for source, n in wanted.items():
                pool = [d for d in self.pools.get(source, {}).get(qi, []) if d not in picked]
                take = min(n, len(pool))
                picked += [pool[i] for i in sorted(rng.choice(len(pool), size=take, replace=False))] if take else []
            shortfall = self.args.retrieval_negatives - len(picked)
            if shortfall > 0:  # one source ran short: fill from the others
                rest = [d for s in wanted for d in self.pools.get(s, {}).get(qi, []) if d not in picked]
                picked += rest[:shortfall]
            self.drawn[qi] = picked
        self.score_with_teacher()

    def score_with_teacher(self) -> None:
        """Teacher scores of every (query, positive) and (query, negative) pair not scored yet."""
        if self.teacher is None:
            return
        wanted = []
        for p in range(len(self.pair_query)):
            qi = self.pair_query[p]
            for d in (self.pair_positive[p], *self.negatives(p)):
                if (qi, d) not in self.teacher_scores:
                    wanted.append((qi, d))
        wanted = list(dict.fromkeys(wanted))
        if not wanted:
            return
        scores = self.teacher([self.queries[qi].text for qi, _ in wanted],
                              [self.catalogue.get(d, d) for _, d in wanted])  # fmt: skip
        self.teacher_scores.update(zip(wanted, (float(s) for s in scores), strict=True))

    # --- what the collator reads
    def negatives(self, pair: int) -> list[str]:
        """The pair's negatives: its judged non-relevant document (if any), then the query's mined ones."""
        judged = self.pair_judged_negative[pair]
        return ([judged] if judged else []) + self.drawn.get(self.pair_query[pair], [])

    def pair_ids(self, role: str) -> list[int]:
        return [p for p, qi in enumerate(self.pair_query) if self.queries[qi].role == role]


class MiningCallback(TrainerCallback):
    """Mines dense negatives with the model being trained: before training (train and validation queries), then the
    train queries again every `retrieval_remine_steps` optimizer steps or at the start of every later epoch. Draws
    are refreshed at every epoch start for every source."""

    def __init__(self, miner: NegativeMiner, tokenizer) -> None:
        self.miner, self.tokenizer = miner, tokenizer
        self.epochs_begun = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.miner.needs_model:
            self.miner.mine_dense(model, self.tokenizer, ("train", "validation"))
            self.miner.draw(("train", "validation"))

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self.epochs_begun += 1
        if self.epochs_begun == 1:
            return  # the negatives of the first epoch were drawn before training
        if self.miner.needs_model and not self.miner.args.retrieval_remine_steps:
            logger.info("re-mining dense negatives for epoch %d", self.epochs_begun)
            self.miner.mine_dense(model, self.tokenizer, ("train",))
        self.miner.draw(("train",))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.miner.args.retrieval_remine_steps
        if self.miner.needs_model and every and state.global_step % every == 0 and state.global_step < state.max_steps:
            logger.info("re-mining dense negatives at step %d", state.global_step)
            self.miner.mine_dense(model, self.tokenizer, ("train",))
            self.miner.draw(("train",))
