"""Query rewriting and expansion: a query (plus earlier turns) -> a better query, or -> refinement options.

`task: rewrite` serves both model families; the family comes from the model's config:

- encoder-decoder (`is_encoder_decoder`: T5, BART, or a BERT2BERT `EncoderDecoderModel` warm start built with
  `rewrite_warm_start_decoder`): `AutoModelForSeq2SeqLM`, PEFT task type SEQ_2_SEQ_LM. The source is the rendered
  prompt, the labels the target. `predict_with_generate: true` scores ROUGE-L etc. at every evaluation during
  training through Seq2SeqTrainer.
- decoder-only (SmolLM2, Qwen, Llama): `AutoModelForCausalLM`, task type CAUSAL_LM. One sequence: prompt, then the
  target and EOS; the labels are -100 on every prompt token, so the loss is on the target tokens only.
  Evaluation during training reports the loss and the target-token accuracy.

At the end of training (and in `querytune eval` / `predict`) both families generate: greedy, beam or sampling, up
to `rewrite_num_candidates` de-duplicated candidates per query that never merely repeat it, scored against every
reference of the query by the bundled `rewrite` metric module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from datasets import Dataset, DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    EvalPrediction,
    PreTrainedModel,
    Seq2SeqTrainer,
)

from querytune.data import DataError, sample
from querytune.extras import require
from querytune.methods.registry import get_method
from querytune.metrics import load_metric
from querytune.models import ModelError, _new_modules, load_pretrained, load_tokenizer, resolve_model_path
from querytune.progress import progress
from querytune.tasks.base import Task, length_batches
from querytune.tasks.rewrite.args import RewriteArguments
from querytune.tasks.rewrite.data import Row, group_split, load_rows
from querytune.tasks.rewrite.prompts import CONTEXT_SEPARATOR, clean_candidates, fit_context, training_pairs

logger = logging.getLogger(__name__)
# `predict` widens its search up to this many beams (or samples) when too few distinct, non-copy rewrites remain.
MAX_SEARCH = 32


def is_encoder_decoder(config) -> bool:
    """Which family the run uses: a warm start is always encoder-decoder; otherwise the model config says."""
    model = config.model
    if config.task_args.rewrite_warm_start_decoder:
        return True
    path = resolve_model_path(model.model_name_or_path)
    try:
        cfg = AutoConfig.from_pretrained(
            path, revision=model.model_revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ModelError(
            f"could not read the config of {model.model_name_or_path!r} (resolved to {path!r}): {err}"
        ) from err
    return bool(getattr(cfg, "is_encoder_decoder", False))


class RewriteTask(Task):
    """Data, prompts, model family, collator, generation and metrics for query rewriting / expansion."""

    trainer_class = Seq2SeqTrainer
    default_metric = "rougeL"
    arguments = RewriteArguments
    pipeline_tag = "text-generation"  # text2text-generation for an encoder-decoder run (see `card_info`)
    card_tags = ("query-rewriting",)
    card_metrics = {
        "rougeL": ("rouge", "ROUGE-L", 1.0),
        "bleu": ("bleu", "BLEU", 1.0),
        "exact_match": ("exact_match", "Exact match", 1.0),
    }
    report_columns = [("rougeL", "ROUGE-L", 1.0), ("bleu", "BLEU", 1.0), ("exact_match", "rewrite EM %", 1.0)]
    layer_dropping = False  # load_model below builds (warm-start) encoder-decoders its own way: no student_layers

    def __init__(self, config) -> None:
        super().__init__(config)
        for module in ("rouge_score", "sacrebleu"):  # the metric (metrics/rewrite): fail before training, not after
            require(module, extra="rewrite", feature="task rewrite")
        self.encoder_decoder = is_encoder_decoder(config)
        method = get_method(config.method.method)
        if self.args.rewrite_warm_start_decoder and method.prompt_learning:
            raise ValueError(
                f"method {config.method.method!r} cannot be applied to an EncoderDecoderModel warm start: PEFT reads "
                "hidden_size / num_layers from the model config, which EncoderDecoderConfig does not have; use full, "
                "lora, adalora or ia3"
            )
        self.model_class = AutoModelForSeq2SeqLM if self.encoder_decoder else AutoModelForCausalLM
        self.peft_task_type = peft.TaskType.SEQ_2_SEQ_LM if self.encoder_decoder else peft.TaskType.CAUSAL_LM
        self.generate_in_eval = self.encoder_decoder and config.training.predict_with_generate
        if config.training.predict_with_generate and not self.encoder_decoder:
            raise ValueError(
                "predict_with_generate: true is for encoder-decoder models; a causal LM's evaluation during training "
                "reports loss and token accuracy, and it generates at the end of training"
            )
        self.default_metric = "rougeL" if self.generate_in_eval else "token_accuracy"
        self.rows: dict[str, list[Row]] = {}
        self.tokenizer = None

    @classmethod
    def card_info(cls, label_info: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
        seq2seq = label_info.get("family") == "encoder-decoder"
        return ("text2text-generation" if seq2seq else "text-generation"), cls.card_tags

    @classmethod
    def auto_classes(cls, label_info: dict[str, Any]) -> tuple[str, str] | None:
        if label_info.get("family") == "encoder-decoder":
            return "AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM"
        return "AutoModelForCausalLM", "AutoPeftModelForCausalLM"

    def export_unsupported(self) -> str | None:
        return ("a rewrite run generates text token by token; it is served from its run directory (`querytune "
                "serve RUN`), not exported to a single-pass ONNX graph")  # fmt: skip

    # --- data
    def label_info(self) -> dict[str, Any]:
        return {"labels": [], "family": "encoder-decoder" if self.encoder_decoder else "decoder-only"}

    def load_data(self) -> DatasetDict:
        """Rows by role: the corpus's own splits, or a seeded split by conversation / query (no group in two)."""
        data, args, seed = self.config.data, self.args, self.config.training.seed
        by_split, fmt = load_rows(data, args)
        wanted = {"train": data.train_split, "validation": data.validation_split}
        if data.test_split:
            wanted["test"] = data.test_split
        if fmt == "columns" and all(name in by_split for name in wanted.values()):
            rows = {role: by_split[name] for role, name in wanted.items()}
        else:
            if data.train_split not in by_split:
                raise DataError(f"{data.dataset_name or data.train_file}: no split {data.train_split!r}")
            test_pct = args.rewrite_test_percentage if data.test_split else 0.0
            rows = group_split(by_split[data.train_split], data.validation_split_percentage, test_pct, seed)
            logger.info("split by %s: %s", "query" if fmt == "mimics" else "conversation",
                        {k: (len(v), len({r["group"] for r in v})) for k, v in rows.items()})  # fmt: skip
        rows["train"] = sample(rows["train"], data.max_train_samples, seed)
        for role in ("validation", "test"):
            if role in rows:
                rows[role] = sample(rows[role], data.max_eval_samples, seed)
        self.rows = rows
        return DatasetDict({role: Dataset.from_list([_flat(r) for r in items]) for role, items in rows.items()})

    # --- prompts and tokenisation
    def _prepare_tokenizer(self, tokenizer) -> None:
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ModelError("the tokenizer has neither a pad nor an eos token; rewriting needs an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        if not self.encoder_decoder and tokenizer.eos_token is None:
            raise ModelError("a causal LM's tokenizer needs an eos token to end the target")
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer

    def source_budget(self) -> int:
        """Tokens the prompt may take: all of max_seq_length (seq2seq) or what the target leaves (causal)."""
        max_len = self.config.model.max_length(getattr(self, "tokenizer", None))
        return max_len if self.encoder_decoder else max(8, max_len - self.args.rewrite_max_target_length)

    def prompt(self, row: Row, tokenizer) -> tuple[str, int]:
        """The model input for one row, context cut oldest-first to the budget; and the turns dropped."""
        args = self.args

        def count(text: str) -> int:
            return len(tokenizer(text)["input_ids"])

        return fit_context(args.rewrite_prompt_template, row["query"], list(row["context"]), count,
                           self.source_budget(), args.rewrite_max_context_turns)  # fmt: skip

    def encode_pair(self, prompt: str, target: str, tokenizer) -> dict[str, list[int]]:
        """input_ids / attention_mask / labels for one (prompt, target) pair of the run's family."""
        args = self.args
        if self.encoder_decoder:
            enc = tokenizer(prompt, truncation=True, max_length=self.config.model.max_length(tokenizer))
            labels = tokenizer(text_target=target, truncation=True, max_length=args.rewrite_max_target_length)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": labels["input_ids"]}  # fmt: skip
        prompt_ids = tokenizer(prompt, truncation=True, max_length=self.source_budget())["input_ids"]
        target_ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
        target_ids = target_ids[: args.rewrite_max_target_length - 1] + [tokenizer.eos_token_id]
        # Loss on the target only: every prompt token is masked out of the labels.
        return {"input_ids": prompt_ids + target_ids, "attention_mask": [1] * (len(prompt_ids) + len(target_ids)),
                "labels": [-100] * len(prompt_ids) + target_ids}  # fmt: skip

    def tokenize(self, splits: DatasetDict, tokenizer) -> DatasetDict:
        self._prepare_tokenizer(tokenizer)
        args = self.args
        out = {}
        for role in splits:
            rows = self.rows.get(role) or [_unflat(r) for r in splits[role]]
            encoded, dropped, cut = [], 0, 0
            prompts: dict[tuple, tuple[str, int]] = {}  # the targets of one row share its prompt: fit it once
            for pair in training_pairs(rows, args.rewrite_multi_target, args.rewrite_target_separator):
                key = (pair["query"], tuple(pair["context"]))
                if key not in prompts:
                    prompts[key] = self.prompt(pair, tokenizer)
                    dropped += prompts[key][1]
                    cut += prompts[key][1] > 0
                encoded.append(self.encode_pair(prompts[key][0], pair["target"], tokenizer))
            if not encoded:
                raise DataError(f"split {role!r} has no row with a target")
            if cut:
                logger.warning("%s: context cut to fit max_seq_length for %d queries (%d oldest turns dropped; the "
                               "queries are whole)", role, cut, dropped)  # fmt: skip
            out[role] = Dataset.from_list(encoded)
        return DatasetDict(out)

    def collator(self, tokenizer):
        mixed = self.config.training.fp16 or self.config.training.bf16
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8 if mixed else None)

    # --- model and trainer
    def load_model(self, name_or_path: str | None = None) -> tuple[PreTrainedModel, list[str]]:
        cfg, args = self.config.model, self.args
        if name_or_path is None and args.rewrite_warm_start_decoder:
            model, new = self._warm_start()
        elif name_or_path is not None:
            model, new = load_pretrained(self.model_class, name_or_path, trust_remote_code=cfg.trust_remote_code)
        else:
            model, new = load_pretrained(self.model_class, cfg.model_name_or_path, cfg.model_revision,
                                         cfg.trust_remote_code)  # fmt: skip
        # Seq2SeqTrainer's generation otherwise pads to generation_config.max_length (20) (see NOTES.md).
        model.generation_config.max_new_tokens = args.rewrite_max_new_tokens
        model.generation_config.max_length = None
        return model, new

    def _warm_start(self) -> tuple[PreTrainedModel, list[str]]:
        """A BERT2BERT EncoderDecoderModel: cross-attention and the LM head bias are new (trained by every method)."""
        from transformers import EncoderDecoderModel

        cfg, args = self.config.model, self.args
        encoder = resolve_model_path(cfg.model_name_or_path)
        decoder = resolve_model_path(args.rewrite_warm_start_decoder)
        try:
            model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder)
        except (OSError, ValueError) as err:
            raise ModelError(f"could not warm-start an encoder-decoder from {encoder!r} + {decoder!r}: {err}") from err
        tok = self.tokenizer or load_tokenizer(cfg.tokenizer_name or cfg.model_name_or_path)
        start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        for c in (model.config, model.generation_config):
            c.decoder_start_token_id, c.pad_token_id, c.eos_token_id = start, tok.pad_token_id, end
        model.config.vocab_size = model.config.decoder.vocab_size
        missing = {n for n, _ in model.named_parameters() if "crossattention" in n or n.startswith("decoder.cls.")}
        new = [m for m in _new_modules(model, missing) if not m.startswith("decoder.cls")]
        return model, new

    def trainer_kwargs(self, tokenizer) -> dict[str, Any]:
        if self.generate_in_eval:
            return {}
        return {"preprocess_logits_for_metrics": _argmax}

    # --- metrics
    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        preds, labels = prediction.predictions, prediction.label_ids
        if self.generate_in_eval:
            pad = self.tokenizer.pad_token_id
            preds = np.where(preds < 0, pad, preds)
            labels = np.where(labels < 0, pad, labels)
            texts = [t.strip() for t in self.tokenizer.batch_decode(preds, skip_special_tokens=True)]
            refs = [[t.strip()] for t in self.tokenizer.batch_decode(labels, skip_special_tokens=True)]
            return score([[t] for t in texts], refs)
        preds = preds[0] if isinstance(preds, tuple) else preds
        if preds.shape[1] > labels.shape[1]:  # prompt tuning prepends virtual tokens to a causal LM's outputs
            preds = preds[:, preds.shape[1] - labels.shape[1] :]
        if not self.encoder_decoder:  # position t predicts token t + 1
            preds, labels = preds[:, :-1], labels[:, 1:]
        mask = labels != -100
        return {"token_accuracy": float((preds[mask] == labels[mask]).mean()) if mask.any() else 0.0}

    def evaluate_trained(self, trainer, dataset, role: str, out_dir: Path) -> dict[str, float]:
        """Loss (and token accuracy) over the split, then generated candidates scored against every reference."""
        prefix = "eval" if role == "validation" else "test"
        metrics = {} if self.generate_in_eval else trainer.evaluate(dataset, metric_key_prefix=prefix)
        model = trainer.accelerator.unwrap_model(trainer.model)
        rows = self.rows[role]
        candidates = self.generate(model, self.tokenizer, rows, batch_size=trainer.args.per_device_eval_batch_size)
        scores = score(candidates, [r["targets"] for r in rows])
        metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
        if trainer.is_world_process_zero():
            write_predictions(out_dir / f"{role}_predictions.jsonl", rows, candidates)
        return metrics

    # --- generation
    def generation_kwargs(self, k: int) -> dict[str, Any]:
        """Keyword arguments of `generate` for k candidates, with headroom for the ones de-duplication drops."""
        args = self.args
        mode = args.rewrite_generation
        if mode == "greedy" and k > 1:  # `predict --top_k 3` on a greedy run: beam search gives k candidates
            mode = "beam"
        if mode == "greedy":
            return {"do_sample": False, "num_beams": 1, "num_return_sequences": 1}
        if mode == "beam":
            beams = max(args.rewrite_num_beams or 4, k + 1)
            return {"do_sample": False, "num_beams": beams, "num_return_sequences": beams}
        return {"do_sample": True, "num_beams": 1, "num_return_sequences": 2 * k + 1,
                "temperature": args.rewrite_temperature, "top_p": args.rewrite_top_p}  # fmt: skip

    @torch.inference_mode()
    def generate(
        self, model, tokenizer, rows: list[Row], batch_size: int = 32, k: int | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> list[list[str]]:  # fmt: skip
        """Up to k cleaned candidates per row (k: rewrite_num_candidates), best first; `kwargs` replace the decoding
        settings of `generation_kwargs(k)`."""
        args = self.args
        k = k or args.rewrite_num_candidates
        kwargs = kwargs or self.generation_kwargs(k)
        self._prepare_tokenizer(tokenizer)
        raw = self.raw_candidates(model, tokenizer, [self.prompt(r, tokenizer)[0] for r in rows], batch_size, kwargs)
        return [clean_candidates(c, r["query"] if args.rewrite_drop_copies else "\0", k)
                for r, c in zip(rows, raw, strict=True)]  # fmt: skip

    def raw_candidates(self, model, tokenizer, prompts: list[str], batch_size: int,
                       kwargs: dict[str, Any]) -> list[list[str]]:  # fmt: skip
        """Every generated sequence per prompt (`num_return_sequences` of them), decoded, first line only."""
        args = self.args
        self._prepare_tokenizer(tokenizer)
        n = kwargs["num_return_sequences"]
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        tokenizer.padding_side = "left" if not self.encoder_decoder else "right"  # a causal LM continues the prompt
        torch.manual_seed(self.config.training.seed)
        results: dict[int, list[str]] = {}
        try:
            batches = list(length_batches([len(p) for p in prompts], batch_size))
            for idx in progress(batches, "generating rewrites"):
                enc = tokenizer([prompts[i] for i in idx], padding=True, truncation=True,
                                max_length=self.source_budget(), return_tensors="pt")  # fmt: skip
                gen = model.generate(
                    input_ids=enc["input_ids"].to(device),
                    attention_mask=enc["attention_mask"].to(device),
                    max_new_tokens=args.rewrite_max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id if not self.encoder_decoder else None,
                    **kwargs,
                )
                if not self.encoder_decoder:
                    gen = gen[:, enc["input_ids"].shape[1] :]
                texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
                for j, i in enumerate(idx):
                    # A causal LM may run on into a new "Query:" line: keep the first line.
                    results[i] = [t.strip().split("\n")[0] for t in texts[j * n : (j + 1) * n]]
        finally:
            tokenizer.padding_side = "right"
            model.train(was_training)
        return [results[i] for i in range(len(prompts))]

    def generate_distinct(self, model, tokenizer, rows: list[Row], batch_size: int,
                          k: int) -> tuple[list[list[str]], list[int]]:  # fmt: skip
        """`generate`, widened for the rows that come back with fewer than k candidates (every candidate was a copy of
        the query or a repeat): twice the beams (or samples) each round, up to `MAX_SEARCH` sequences. Returns the
        candidates and, per row, how many sequences the last search returned."""
        kwargs = self.generation_kwargs(k)
        out = self.generate(model, tokenizer, rows, batch_size, k, kwargs)
        width = kwargs["num_return_sequences"]
        widths = [width] * len(rows)
        while width < MAX_SEARCH and any(len(c) < k for c in out):
            width = min(MAX_SEARCH, 2 * width)
            wider = ({**kwargs, "num_return_sequences": width} if kwargs["do_sample"]
                     else {"do_sample": False, "num_beams": width, "num_return_sequences": width})  # fmt: skip
            short = [i for i, c in enumerate(out) if len(c) < k]
            again = self.generate(model, tokenizer, [rows[i] for i in short], batch_size, k, wider)
            for i, candidates in zip(short, again, strict=True):
                widths[i] = width
                if len(candidates) > len(out[i]):
                    out[i] = candidates
        return out, widths

    # --- a loaded run
    def predict(self, run, texts: list[str], top_k: int = 3, batch_size: int = 64, **inputs) -> list[dict[str, Any]]:
        """Up to top_k rewrites per query; earlier turns may precede it, separated by ' ||| '. When fewer than top_k
        distinct rewrites remain after the widest search, `note` says so."""
        rows = []
        for text in texts:
            *context, query = [t.strip() for t in text.split(CONTEXT_SEPARATOR)]
            rows.append({"group": query, "query": query, "context": context, "targets": []})
        k = max(1, top_k)
        candidates, widths = self.generate_distinct(run.model, run.tokenizer, rows, batch_size, k)
        what = "samples" if self.generation_kwargs(k)["do_sample"] else "beams"
        copies = "a copy of the query or " if self.args.rewrite_drop_copies else ""
        results = []
        for r, c, width in zip(rows, candidates, widths, strict=True):
            result = {"query": r["query"], **({"context": r["context"]} if r["context"] else {}), "rewrites": c}
            if len(c) < k:
                result["note"] = (f"{len(c)} of {k} rewrites: the other candidates of {width} {what} were "
                                  f"{copies}repeats")  # fmt: skip
            results.append(result)
        return results

    def evaluate(self, run, split: str, out_dir: Path, batch_size: int = 64) -> dict[str, Any]:
        """Score a loaded run on a split; an unsplit corpus is split by group exactly as in training."""
        data, args = self.config.data, self.args
        by_split, fmt = load_rows(data, args)
        if split in by_split and (fmt == "columns" or split != data.train_split):
            rows = by_split[split]
        else:
            test_pct = args.rewrite_test_percentage if data.test_split else 0.0
            parts = group_split(by_split[data.train_split], data.validation_split_percentage, test_pct,
                                self.config.training.seed)  # fmt: skip
            role = {data.validation_split: "validation", data.test_split: "test", data.train_split: "train"}.get(split)
            if role not in parts:
                raise DataError(f"{data.dataset_name or data.train_file}: no split {split!r}; it has "
                                f"{sorted(set(by_split) | {data.train_split, data.validation_split, data.test_split} - {None})}")  # fmt: skip
            rows = parts[role]
        rows = sample([r for r in rows if r["targets"]], data.max_eval_samples, self.config.training.seed)
        candidates = self.generate(run.model, run.tokenizer, rows, batch_size=batch_size)
        write_predictions(out_dir / f"{split}_predictions.jsonl", rows, candidates)
        return {"num_examples": len(rows), **score(candidates, [r["targets"] for r in rows])}


def score(candidates: list[list[str]], references: list[list[str]]) -> dict[str, float]:
    return load_metric("rewrite").compute(predictions=candidates, references=references)


def write_predictions(path: Path, rows: list[Row], candidates: list[list[str]]) -> None:
    with path.open("w") as fh:
        for r, c in zip(rows, candidates, strict=True):
            fh.write(json.dumps({"query": r["query"], "context": r["context"], "references": r["targets"],
                                 "candidates": c}, ensure_ascii=False) + "\n")  # fmt: skip


def _argmax(logits, labels):
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.argmax(dim=-1)


def _flat(row: Row) -> dict[str, Any]:
    """Dataset rows hold the lists as JSON text, so an all-empty context column needs no feature type."""
    return {"group": row["group"], "query": row["query"], "context": json.dumps(row["context"]),
            "targets": json.dumps(row["targets"])}  # fmt: skip


def _unflat(row: dict[str, Any]) -> Row:
    return {**row, "context": json.loads(row["context"]), "targets": json.loads(row["targets"])}
