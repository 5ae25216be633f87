"""Knowledge distillation: a student learns from a finished teacher run's logits as well as from the labels.

    querytune train experiments/intent/clinc150-student-3layer.yaml --distill_teacher runs/clinc150-full \\
        --model_name_or_path runs/clinc150-full

- `distill_teacher: RUN_DIR` (a finished run or export of the same kind of task), `distill_temperature: T`,
  `distill_alpha: a`: the distilled head's label loss becomes (1 - a) * CE(labels) + a * T^2 * KL(teacher_T ||
  student_T), the KL between the softmaxes at temperature T (Hinton et al. 2015; T^2 keeps the gradient scale of
  the soft term independent of T). Any other loss of the model (the joint model's slot loss) is left as it is.
- The teacher's logits are computed once, before training, and stored as a column of the train split
  (`teacher_logits`) through `datasets.Dataset.map` under a fingerprint of the teacher and the data: a second run on
  the same teacher and data (a sweep over T and a) reads them from the datasets cache instead of running the teacher.
- `student_layers: [0, 2, 4]` keeps those encoder layers of `model_name_or_path` (a 6-layer teacher's own encoder:
  set model_name_or_path to the teacher run) and drops the others before training.
- `distill_hidden_weight: b` (> 0) adds b times the hidden-state loss (TinyBERT, Jiao et al. 2020): the mean squared
  error between the output of each student layer m = 1..M and that of teacher layer m * N // M, over the batch's
  real (non-padding) tokens, averaged over the M layers. The teacher (a PyTorch run, not an export, with the
  student's tokenizer and hidden size) runs beside the student on every train batch: per-token hidden states are too
  large to cache.

A task opts in with the `distill_output` attribute (the output name its teacher logits are read from, as in
`Task.verification_outputs`) and `distill_labels()` (the names of that output's classes); its `tokenize` keeps the
`teacher_logits` column, and its trainer is `DistillationTrainer`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from querytune.runs import EXPORT_MARKER, MARKER

logger = logging.getLogger(__name__)

TEACHER_COLUMN = "teacher_logits"
_CACHE_VERSION = "querytune-distill-1"  # part of the fingerprint: bump when the stored column changes meaning


# --- the student: a teacher's own encoder with layers dropped
def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of an encoder (`encoder.layer` of BERT / RoBERTa / MPNet / DeBERTa, ...).

    Found as the one ModuleList whose length is `config.num_hidden_layers`, so any encoder with one layer stack works.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    count = getattr(inner.config, "num_hidden_layers", None)
    stacks = [(name, m) for name, m in inner.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(stacks) != 1:
        found = ", ".join(name for name, _ in stacks) or "none"
        raise ValueError(f"student_layers: cannot tell the layer stack of {type(inner).__name__} "
                         f"({count} layers; ModuleLists of that length: {found})")  # fmt: skip
    return stacks[0][1]


def keep_layers(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """Keep only `layers` (0-based, increasing) of the model's encoder, in place; the config says the new depth."""
    stack = encoder_layers(model)
    total = len(stack)
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise ValueError(f"student_layers {list(layers)}: layer(s) {bad} do not exist in a {total}-layer model")
    kept = [stack[i] for i in layers]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # attention modules index caches by layer_idx: number the kept ones afresh
            if getattr(module, "layer_idx", None) is not None:
                module.layer_idx = new_index
    del stack[:]  # the kept layers become children 0..n-1: the saved weight names follow
    stack.extend(kept)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.config.num_hidden_layers = len(kept)
    if isinstance(getattr(inner.config, "layer_types", None), list) and len(inner.config.layer_types) == total:
        inner.config.layer_types = [inner.config.layer_types[i] for i in layers]
    logger.info("student: kept layers %s of %d", list(layers), total)
    return model


# --- the teacher's logits, once, as a column of the train split
def teacher_fingerprint(teacher_dir: str | Path, data_fingerprint: str, output: str, labels: Sequence[str]) -> str:
    """What the cached teacher column depends on: the teacher (its marker, written when it finished), the data it
    scores (the split's datasets fingerprint), which output and the student's label order."""
    teacher = Path(teacher_dir)
    marker = next((teacher / name for name in (MARKER, EXPORT_MARKER) if (teacher / name).is_file()), None)
    if marker is None:
        raise FileNotFoundError(f"distill_teacher {teacher} is not a finished querytune run or export (no {MARKER})")
    key = json.dumps([_CACHE_VERSION, str(teacher.resolve()), marker.read_text(), data_fingerprint, output,
                      list(labels)])  # fmt: skip
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def label_order(teacher_labels: Sequence[str], student_labels: Sequence[str], teacher_dir: str | Path) -> list[int]:
    """The teacher's column of each student label; an error names the labels the two do not share."""
    missing = [label for label in student_labels if label not in teacher_labels]
    extra = [label for label in teacher_labels if label not in student_labels]
    if missing or extra:
        raise ValueError(f"distill_teacher {teacher_dir} was trained on other labels: the student has "
                         f"{missing[:10]} that the teacher lacks, the teacher {extra[:10]} that the student lacks")  # fmt: skip
    return [list(teacher_labels).index(label) for label in student_labels]


def add_teacher_logits(ds, teacher_dir: str | Path, output: str, labels_of: Callable[[Any], list[str]],
                       student_labels: Sequence[str], texts_of: Callable[[dict], tuple[list[str], list[str] | None]],
                       batch_size: int = 128):  # fmt: skip
    """`ds` with a `teacher_logits` column: the teacher run's `output` for each row, in the student's label order.

    - `labels_of(task)`: the class names of `output` on a loaded task (the teacher's, to line its columns up);
    - `texts_of(batch)`: the (texts, pairs) of a batch of raw rows, as the teacher's `verification_outputs` takes.
    The teacher is loaded only when the column is not in the datasets cache already.
    """
    fingerprint = teacher_fingerprint(teacher_dir, getattr(ds, "_fingerprint", "") or "", output, student_labels)

    def score(batch: dict) -> dict:
        from querytune.inference import LoadedRun  # here: querytune.inference imports the task registry

        teacher = LoadedRun(teacher_dir, merge=True)
        order = label_order(labels_of(teacher.task), student_labels, teacher_dir)
        texts, pairs = texts_of(batch)
        outputs = teacher.task.verification_outputs(teacher, texts, pairs, batch_size=batch_size)
        if output not in outputs:
            raise ValueError(f"distill_teacher {teacher_dir} ({teacher.config.data.task}) has no output {output!r}; "
                             f"it has {sorted(outputs)}")  # fmt: skip
        logits = np.asarray(outputs[output], dtype=np.float32)[:, order]
        logger.info("teacher %s: %s for %d rows", teacher_dir, output, len(texts))
        return {TEACHER_COLUMN: logits.tolist()}

    # One batch for the whole split: the teacher is loaded once and batches by length itself.
    return ds.map(score, batched=True, batch_size=None, new_fingerprint=fingerprint, desc="teacher logits")


# --- the losses
def hidden_state_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                      attention_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Mean over the student's layers m = 1..M of the MSE between its output and teacher layer m * N // M (uniform
    mapping; index 0 of both is the embeddings' output), over the tokens `attention_mask` keeps.

    `student` / `teacher`: the models' `hidden_states` (M + 1 and N + 1 tensors of [batch, tokens, hidden])."""
    m_layers, n_layers = len(student) - 1, len(teacher) - 1
    if not 0 < m_layers <= n_layers:
        raise ValueError(f"distill_hidden_weight: a {m_layers}-layer student cannot follow a {n_layers}-layer teacher")
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    losses = []
    for m in range(1, m_layers + 1):
        s, t = student[m].float(), teacher[m * n_layers // m_layers].float()
        if s.shape != t.shape:
            raise ValueError(f"distill_hidden_weight: student layer {m} gives {tuple(s.shape)}, teacher layer "
                             f"{m * n_layers // m_layers} {tuple(t.shape)}: the hidden sizes must be equal")  # fmt: skip
        losses.append(((s - t) ** 2 * mask).sum() / (mask.sum() * s.shape[-1]).clamp(min=1.0))
    return torch.stack(losses).mean()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the rows."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=-1), F.log_softmax(teacher.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)  # fmt: skip


class DistillationTrainer(Trainer):
    """Trainer whose loss on the distilled head is (1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher || student).

    Rows come with a `teacher_logits` column (train split only); batches without it (evaluation) get the model's own
    loss. `logits_key` / `labels_key` name the distilled head's output and labels (`logits` / `labels`, or the joint
    model's `intent_logits` / `intent_labels`).
    """

    def __init__(self, *args: Any, distill_temperature: float = 2.0, distill_alpha: float = 0.5,
                 logits_key: str = "logits", labels_key: str = "labels", distill_hidden_weight: float = 0.0,
                 distill_teacher: str | None = None, **kwargs: Any) -> None:  # fmt: skip
        # Loaded before Trainer sets up its accelerator: loading a run builds its TrainingArguments, which reset
        # accelerate's shared state (as the teacher's logits are computed while the data loads, before the trainer).
        teacher_model = None
        if distill_hidden_weight > 0:
            teacher_model = load_hidden_teacher(distill_teacher, kwargs.get("processing_class"))
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError("label_smoothing_factor cannot be combined with distill_teacher: the teacher's soft "
                             "targets take its place")  # fmt: skip
        self.distill_temperature, self.distill_alpha = distill_temperature, distill_alpha
        self.logits_key, self.labels_key = logits_key, labels_key
        self.distill_hidden_weight = distill_hidden_weight
        self.teacher_model = None if teacher_model is None else teacher_model.to(self.args.device)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if TEACHER_COLUMN not in self._signature_columns:  # keep the column through remove_unused_columns
            self._signature_columns.append(TEACHER_COLUMN)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = inputs.pop(TEACHER_COLUMN, None)
        labels = inputs.get(self.labels_key)
        hidden = teacher is not None and self.teacher_model is not None  # train batches only
        if hidden:
            inputs = {**inputs, "output_hidden_states": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if teacher is not None and self.distill_alpha > 0:
            student = outputs[self.logits_key]
            soft = distillation_loss(student, teacher.to(student.device), self.distill_temperature)
            # The model's loss holds CE(labels) of this head: swap alpha of it for the teacher's term.
            hard = F.cross_entropy(student.float(), labels) if labels is not None else torch.zeros_like(soft)
            loss = loss + self.distill_alpha * (soft - hard)
        if hidden:
            states = outputs.get("hidden_states") if hasattr(outputs, "get") else None
            if states is None:
                raise ValueError(f"distill_hidden_weight: {type(model).__name__} returns no hidden_states")
            encoded = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs}
            with torch.no_grad():
                teacher_states = self.teacher_model(**encoded, output_hidden_states=True).hidden_states
            mask = inputs.get("attention_mask")
            mask = torch.ones(states[0].shape[:2], device=states[0].device) if mask is None else mask
            loss = loss + self.distill_hidden_weight * hidden_state_loss(states, teacher_states, mask)
        return (loss, outputs) if return_outputs else loss


def load_hidden_teacher(teacher_dir: str | None, tokenizer: Any) -> nn.Module:
    """The teacher run's PyTorch model, frozen, for `distill_hidden_weight`: refused with a reason when it is an
    export (no hidden states) or reads the text with another vocabulary than the student's tokenizer."""
    from querytune.inference import LoadedRun  # here: querytune.inference imports the task registry

    if not teacher_dir:
        raise ValueError("distill_hidden_weight needs distill_teacher (the run whose hidden states to follow)")
    loaded = LoadedRun(teacher_dir, merge=True)
    if loaded.is_export:
        raise ValueError(f"distill_hidden_weight: distill_teacher {teacher_dir} is an export, which gives logits "
                         "only; use the run it was exported from")  # fmt: skip
    if tokenizer is not None and loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"distill_hidden_weight: distill_teacher {teacher_dir} reads text with another vocabulary "
                         "than the student; start the student from the teacher (model_name_or_path: the teacher run)")  # fmt: skip
    model = loaded.model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def trainer_kwargs(distill_args: Any, logits_key: str = "logits", labels_key: str = "labels") -> dict[str, Any]:
    """`DistillationTrainer`'s own keyword arguments, from the config's `DistillArguments`."""
    return {"distill_temperature": distill_args.distill_temperature, "distill_alpha": distill_args.distill_alpha,
            "logits_key": logits_key, "labels_key": labels_key,
            "distill_hidden_weight": distill_args.distill_hidden_weight,
            "distill_teacher": distill_args.distill_teacher}  # fmt: skip
