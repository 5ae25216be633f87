"""`backtranslate`: translate each query into another language and back (Sennrich et al. 2016; Xie et al. 2020).

Two seq2seq translation models, forward and backward, in `backtranslate_models` (default the Marian pair
`Helsinki-NLP/opus-mt-en-de` and `Helsinki-NLP/opus-mt-de-en`). The forward pass samples (`backtranslate_sampling`,
as UDA does: beam search mostly returns the query itself) so that the candidates of one query differ; the backward
pass is greedy. With no such model reachable the run stops before training, naming the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from querytune.augment.base import model_identity
from querytune.augment.generation import TextRewriter

DEFAULT_MODELS = ["Helsinki-NLP/opus-mt-en-de", "Helsinki-NLP/opus-mt-de-en"]


@dataclass
class BacktranslateArguments:
    """Options of the `backtranslate` augmenter."""

    paths: ClassVar[tuple[str, ...]] = (
        "backtranslate_models",
    )  # local paths: saved resolved, so a run loads anywhere

    backtranslate_models: list[str] | None = field(
        default=None,
        metadata={"help": "backtranslate: the forward and the backward translation model, Hub ids or folders "
                  "(default Helsinki-NLP/opus-mt-en-de Helsinki-NLP/opus-mt-de-en)."},
    )  # fmt: skip
    backtranslate_sampling: bool | None = field(
        default=None, metadata={"help": "backtranslate: sample the forward translation (default true) or beam search."}
    )
    backtranslate_temperature: float | None = field(
        default=None, metadata={"help": "backtranslate: temperature of the forward sampling (default 0.9)."}
    )

    def __post_init__(self) -> None:
        if self.backtranslate_models is not None and len(self.backtranslate_models) != 2:
            raise ValueError(f"backtranslate_models takes two models, forward and backward; got "
                             f"{self.backtranslate_models}")  # fmt: skip

    def resolved(self) -> dict[str, Any]:
        return {
            "models": list(self.backtranslate_models or DEFAULT_MODELS),
            "sampling": True if self.backtranslate_sampling is None else self.backtranslate_sampling,
            "temperature": self.backtranslate_temperature or 0.9,
        }


class BacktranslateAugmenter(TextRewriter):
    name = "backtranslate"
    options = BacktranslateArguments

    def prepare(self) -> None:
        from querytune.augment.generation import load_generator
        from querytune.errors import ModelError

        self.settings = self.opts.resolved()
        forward, backward = self.settings["models"]
        self.forward = load_generator(forward, "forward translation model (backtranslate)")
        self.backward = load_generator(backward, "backward translation model (backtranslate)")
        for gen in (self.forward, self.backward):
            if not gen.encoder_decoder:
                raise ModelError(f"backtranslate: {gen.name!r} is not a seq2seq translation model")

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings,
                "models": [model_identity(m) for m in self.settings["models"]]}  # fmt: skip

    def rewrite(self, queries: list[str], n: int, seed: int) -> list[list[str]]:
        from querytune.augment.generation import sample_texts

        s = self.settings
        decoding = ({"do_sample": True, "temperature": s["temperature"], "top_k": 50} if s["sampling"]
                    else {"do_sample": False, "num_beams": n})  # fmt: skip
        # a translation is about as long as its source: both passes stop at 1.5 times the longest query's tokens
        longest = max(len(ids) for ids in self.forward.tokenizer(queries)["input_ids"])
        cap = int(1.5 * longest) + 5
        there = [t for group in sample_texts(self.forward, queries, n, seed, cap, **decoding) for t in group]
        back = sample_texts(self.backward, there, 1, seed, cap, do_sample=False)
        return [[b[0] for b in back[i * n : (i + 1) * n]] for i in range(len(queries))]
