"""`mlm`: contextual word substitution with a fill-mask model (Kobayashi 2018; Wu et al. 2019).

About `mlm_p` of a query's words (at least one; on slot corpora only `O` words, stop words last) are masked at once,
each as one mask token, and each is replaced by a whole word drawn from the model's `mlm_top_k` most likely
fillers, never the word itself. Any `AutoModelForMaskedLM` checkpoint with a mask token works (BERT, RoBERTa,
DistilBERT, ...): a Hub id or a local folder, in `mlm_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from querytune.augment.base import Augmenter, Example, editable, match_case, model_identity, row_rng, stopwords


@dataclass
class MlmArguments:
    """Options of the `mlm` augmenter."""

    paths: ClassVar[tuple[str, ...]] = ("mlm_model",)  # local paths: saved resolved, so a run loads anywhere

    mlm_model: str | None = field(
        default=None, metadata={"help": "mlm: fill-mask model, a Hub id (e.g. bert-base-uncased) or a local folder."}
    )
    mlm_p: float | None = field(
        default=None, metadata={"help": "mlm: share of a query's words replaced (default 0.15, at least one)."}
    )
    mlm_top_k: int | None = field(
        default=None, metadata={"help": "mlm: a replacement is drawn from the model's top k whole words (default 10)."}
    )

    def __post_init__(self) -> None:
        if self.mlm_p is not None and not 0 < self.mlm_p <= 1:
            raise ValueError(f"mlm_p must be in (0, 1], got {self.mlm_p}")
        if self.mlm_top_k is not None and self.mlm_top_k < 1:
            raise ValueError(f"mlm_top_k must be at least 1, got {self.mlm_top_k}")

    def resolved(self) -> dict[str, Any]:
        return {
            "model": self.mlm_model,
            "p": 0.15 if self.mlm_p is None else self.mlm_p,
            "top_k": self.mlm_top_k or 10,
        }


class MlmAugmenter(Augmenter):
    name = "mlm"
    options = MlmArguments
    uses_model = True

    def prepare(self) -> None:
        from transformers import AutoModelForMaskedLM

        from querytune.augment.base import whole_word_vocabulary
        from querytune.errors import ConfigError, ModelError
        from querytune.models import load_tokenizer, resolve_model_path

        self.settings = self.opts.resolved()
        name = self.settings["model"]
        if not name:
            raise ConfigError("augment includes 'mlm' but mlm_model is not set: name a fill-mask model (a Hub id such "
                              "as bert-base-uncased, or a local folder)")  # fmt: skip
        path = resolve_model_path(name)
        try:
            self.model = AutoModelForMaskedLM.from_pretrained(path).eval()
        except (OSError, ValueError) as err:
            raise ModelError(
                f"mlm: could not load the fill-mask model {name!r} (resolved to {path!r}): {err}"
            ) from err
        self.tokenizer = load_tokenizer(name)
        if self.tokenizer.mask_token is None:
            raise ModelError(f"mlm: the tokenizer of {name!r} has no mask token: it is not a fill-mask model")
        import torch

        vocab = whole_word_vocabulary(self.tokenizer)
        self.word_of = {i: w for w, i in vocab.items()}
        self.allowed = torch.zeros(len(self.tokenizer), dtype=torch.bool)
        self.allowed[list(vocab.values())] = True
        self.skip = stopwords()

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings, "model": model_identity(self.settings["model"])}

    def generate(self, examples: list[Example], k: list[int], seed: int) -> list[Example | None]:
        import torch

        masked, chosen = [], []
        for ex, j in zip(examples, k, strict=True):
            rng = row_rng(seed, self.name, ex, j)
            positions = editable(ex)
            content = [i for i in positions if ex.words[i].lower() not in self.skip]
            n = max(1, round(self.settings["p"] * len(ex.words)))
            picks = rng.sample(content, min(n, len(content))) if content else []
            if len(picks) < n:  # stop words only when there are too few content words
                rest = [i for i in positions if i not in picks]
                picks += rng.sample(rest, min(n - len(picks), len(rest)))
            chosen.append((sorted(picks), rng))
            words = [self.tokenizer.mask_token if i in picks else w for i, w in enumerate(ex.words)]
            masked.append(" ".join(words))
        enc = self.tokenizer(masked, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**enc).logits
        out: list[Example | None] = []
        for row, (ex, (picks, rng)) in enumerate(zip(examples, chosen, strict=True)):
            slots = (enc["input_ids"][row] == self.tokenizer.mask_token_id).nonzero().flatten().tolist()
            if not picks or len(slots) != len(picks):  # nothing to mask, or a mask fell to truncation
                out.append(None)
                continue
            words = list(ex.words)
            for i, slot in zip(picks, slots, strict=True):
                scores = logits[row, slot].masked_fill(~self.allowed, float("-inf"))
                top = [self.word_of[t] for t in scores.topk(self.settings["top_k"] + 1).indices.tolist()]
                fillers = [w for w in top if w != ex.words[i].lower()][: self.settings["top_k"]]
                words[i] = match_case(rng.choice(fillers), ex.words[i])
            out.append(ex.derived(words, ex.tags, self.name) if words != ex.words else None)
        return out
