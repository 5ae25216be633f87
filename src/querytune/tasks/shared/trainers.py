"""Trainers shared by the classification heads (intent, text classification, the joint task's intent head)."""

from __future__ import annotations

import torch
from transformers import Trainer

from querytune import distill

IGNORE_INDEX = -100


class UnseenLabelsTrainer(Trainer):
    """A Trainer whose loss skips eval labels kept with `unseen_labels: as_wrong` (ids below -100: the head has no
    class for them) while prediction_step still hands them, unchanged, to the metrics, which count them as wrong."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        names = set(self.label_names or ())
        inputs = {k: v.clamp(min=IGNORE_INDEX) if k in names and torch.is_tensor(v) and not v.is_floating_point()
                  else v for k, v in inputs.items()}  # fmt: skip
        return super().compute_loss(model, inputs, *args, **kwargs)


class DistillationUnseenLabelsTrainer(UnseenLabelsTrainer, distill.DistillationTrainer):
    """Distillation (`distill_teacher`) with the eval loss skipping unseen labels, as `UnseenLabelsTrainer`."""


def trainer_class_for(distill_args) -> type[Trainer]:
    """The Trainer of a classification (or joint intent) run: distilling from a teacher or not."""
    return DistillationUnseenLabelsTrainer if distill_args.distill_teacher else UnseenLabelsTrainer
