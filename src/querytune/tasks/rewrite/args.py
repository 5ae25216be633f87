"""The options of `task: rewrite`: corpus format and columns, prompts, targets and decoding. Flat keys, cheap import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

REWRITE_FORMATS = ("auto", "columns", "trec_cast", "canard", "mimics")


@dataclass
class RewriteArguments:
    """Which corpus and columns, how the prompt is built, and how candidates are generated."""

    section: ClassVar[str] = "rewrite"

    rewrite_format: str = field(
        default="auto",
        metadata={"help": "rewrite: 'auto' (detect from the files), 'trec_cast', 'canard', 'mimics' or 'columns' "
                  "(any dataset with rewrite_query_column / rewrite_context_column / rewrite_target_column)."},
    )  # fmt: skip
    rewrite_query_column: str = field(default="query", metadata={"help": "rewrite: column holding the query."})
    rewrite_context_column: str | None = field(
        default="context", metadata={"help": "rewrite: optional column with the earlier turns (a list, oldest first)."}
    )
    rewrite_target_column: str = field(
        default="target", metadata={"help": "rewrite: column holding the rewrite(s) (a string or a list)."}
    )
    rewrite_group_column: str | None = field(
        default=None,
        metadata={"help": "rewrite: rows sharing this value (a conversation id) stay in one split; default: the query."},
    )  # fmt: skip
    rewrite_test_percentage: float = field(
        default=20.0, metadata={"help": "rewrite: % of groups held out as test when the corpus has no test split."}
    )
    rewrite_multi_target: str = field(
        default="split",
        metadata={"help": "rewrite: several targets per query become one example each ('split') or one target "
                  "joined by rewrite_target_separator ('join')."},
    )  # fmt: skip
    rewrite_target_separator: str = field(default="; ", metadata={"help": "rewrite: joins targets with 'join'."})
    rewrite_max_target_length: int = field(default=64, metadata={"help": "rewrite: target tokens kept in training."})
    rewrite_max_context_turns: int | None = field(
        default=None, metadata={"help": "rewrite: keep at most the N latest context turns (then fit by tokens)."}
    )
    rewrite_prompt_template: str = field(
        default="{context}Query: {query}\nRewrite:",
        metadata={"help": "rewrite: the model input; {context} becomes 'Context: t1 | t2\\n' (or nothing), {query} "
                  "the query. Context is cut oldest turn first to fit max_seq_length, never the query."},
    )  # fmt: skip
    mimics_min_option_label: int = field(
        default=1, metadata={"help": "rewrite, MIMICS: drop options whose option_label_i is below (0 bad, 1 fair)."}
    )
    mimics_min_overall_label: int = field(
        default=1, metadata={"help": "rewrite, MIMICS: drop panes whose options_overall_label is below this."}
    )
    rewrite_generation: str = field(
        default="greedy", metadata={"help": "rewrite: decoding, 'greedy', 'beam' or 'sample'."}
    )
    rewrite_num_candidates: int = field(
        default=1, metadata={"help": "rewrite: candidates returned per query (k of recall@k; predict's top_k)."}
    )
    rewrite_num_beams: int | None = field(
        default=None, metadata={"help": "rewrite, beam: beams (default max(4, candidates + 1))."}
    )
    rewrite_max_new_tokens: int = field(default=32, metadata={"help": "rewrite: generated tokens per candidate."})
    rewrite_temperature: float = field(default=1.0, metadata={"help": "rewrite, sample: softmax temperature."})
    rewrite_top_p: float = field(default=1.0, metadata={"help": "rewrite, sample: nucleus probability mass."})
    rewrite_drop_copies: bool = field(
        default=True, metadata={"help": "rewrite: drop candidates that only repeat the input query."}
    )
    rewrite_warm_start_decoder: str | None = field(
        default=None,
        metadata={"help": "rewrite: build an EncoderDecoderModel warm start (BERT2BERT): model_name_or_path is the "
                  "encoder, this the decoder, e.g. all-MiniLM-L6-v2 for both."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        choices = {
            "rewrite_format": ("auto", "columns", "trec_cast", "canard", "mimics"),
            "rewrite_multi_target": ("split", "join"),
            "rewrite_generation": ("greedy", "beam", "sample"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("rewrite_max_target_length", "rewrite_num_candidates", "rewrite_max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rewrite_generation == "greedy" and self.rewrite_num_candidates > 1:
            raise ValueError(
                "rewrite_num_candidates > 1 needs rewrite_generation 'beam' or 'sample' (greedy gives one)"
            )
        if self.rewrite_num_beams is not None and self.rewrite_num_beams < self.rewrite_num_candidates:
            raise ValueError(f"rewrite_num_beams ({self.rewrite_num_beams}) must be >= rewrite_num_candidates "
                             f"({self.rewrite_num_candidates})")  # fmt: skip
        if "{query}" not in self.rewrite_prompt_template:
            raise ValueError("rewrite_prompt_template must contain {query}")
        if not 0 <= self.rewrite_test_percentage < 100:
            raise ValueError(f"rewrite_test_percentage must be in [0, 100), got {self.rewrite_test_percentage}")
        if self.rewrite_temperature <= 0 or not 0 < self.rewrite_top_p <= 1:
            raise ValueError("rewrite_temperature must be > 0 and rewrite_top_p in (0, 1]")
