"""Loading a finished run for prediction and re-evaluation: base model + adapter, merged where the method allows."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from querytune.config import ExperimentConfig, load_config
from querytune.methods import MERGEABLE, PEFT_METHODS
from querytune.models import load_tokenizer
from querytune.runs import CONFIG_FILE, LABEL_MAP, read_run
from querytune.tasks import get_task

logger = logging.getLogger(__name__)


def merge_peft_model(model) -> nn.Module:
    """Fold the adapter into the base weights and return a plain transformers model.

    The trained copies of `modules_to_save` (the head) are put in place first: PEFT's IA3 unload tries to copy a
    `.weight` from each wrapper and fails on heads that are not a single Linear, e.g. RoBERTa's.
    """
    from peft.utils import ModulesToSaveWrapper

    inner = model.base_model.model
    adapter = model.active_adapter
    for name, module in list(inner.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = inner.get_submodule(parent_name) if parent_name else inner
            setattr(parent, child, module.modules_to_save[adapter])
    return model.merge_and_unload()


class LoadedRun:
    """A finished run's model, tokenizer, labels and config, ready to score queries."""

    def __init__(self, run_dir: str | Path, merge: bool = True, device: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.info = read_run(self.run_dir)
        self.config: ExperimentConfig = load_config(self.run_dir / CONFIG_FILE)
        self.task = get_task(self.config.data.task)(self.config)
        self.task.set_label_info(json.loads((self.run_dir / LABEL_MAP).read_text()))
        self.tokenizer = load_tokenizer(str(self.run_dir))
        self.method = self.config.method.method
        self.model = self._load_model(merge).to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.eval()

    def _load_model(self, merge: bool) -> nn.Module:
        if self.method not in PEFT_METHODS:
            model, _ = self.task.load_model(str(self.run_dir))
            return model
        import peft

        import querytune.peft_adapter  # noqa: F401  (registers the bottleneck adapter type with PEFT)

        base, _ = self.task.load_model()
        model = peft.PeftModel.from_pretrained(base, str(self.run_dir))
        if merge and self.method in MERGEABLE:
            model = merge_peft_model(model)
        elif merge:
            logger.info("method %r cannot be merged into the base weights; serving the unmerged PeftModel",
                        self.method)  # fmt: skip
        return model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> np.ndarray:
        return self.task.logits(self, texts, pairs, batch_size=batch_size)

    def predict(self, texts: list[str], top_k: int = 3, batch_size: int = 64) -> list[dict[str, Any]]:
        return self.task.predict(self, texts, top_k=top_k, batch_size=batch_size)
