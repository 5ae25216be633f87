"""The one loader of finished runs and exports, used by predict, eval, export and serve.

`LoadedRun(path)` takes a run directory (base model + adapter, merged where the method allows, or a full
fine-tune) or an export directory (merged PyTorch weights, an unmerged adapter, an ONNX graph run by ONNX
Runtime, or an OpenVINO model). Whatever it loaded, the task's `predict` / `evaluate` / `verification_outputs` call it
the same way: `run.model(**inputs)` returns an object with the logits, `run.tokenizer`, `run.device`, `run.config`, `run.task`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from querytune.config import ExperimentConfig, load_config
from querytune.methods import get_method, register_bottleneck
from querytune.models import load_tokenizer, quiet_load_report
from querytune.runs import (
    CONFIG_FILE,
    FINISHED,
    LABEL_MAP,
    ONNX_FILE,
    PARTIAL_EXPORT_MARKER,
    is_export,
    read_export,
    read_run,
)
from querytune.serving.onnx_graph import int64_feed
from querytune.tasks import get_task

logger = logging.getLogger(__name__)


class OnnxModel:
    """An ONNX Runtime session called like a transformers model: torch tensors in, an object with logits out."""

    def __init__(self, path: str | Path, threads: int | None = None, profile_prefix: str | None = None) -> None:
        from querytune.extras import require

        ort = require("onnxruntime", extra="export", feature="running an ONNX export")

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, **tensors: Any) -> SimpleNamespace:
        arrays = self.session.run(self.outputs, int64_feed(tensors, self.inputs, "ONNX"))
        return SimpleNamespace(**{name: torch.from_numpy(a) for name, a in zip(self.outputs, arrays, strict=True)})

    def eval(self) -> OnnxModel:
        return self

    def parameters(self):
        """Task helpers read the device from the first parameter (`next(model.parameters()).device`): CPU."""
        yield torch.empty(0)


class LoadedRun:
    """A finished run or export: its model, tokenizer, labels and config, ready to score queries.

    - `merge`: fold a mergeable adapter (LoRA, AdaLoRA, IA3) into the base weights (a run directory only; an export
      is loaded as it was exported).
    - `threads`: torch / ONNX Runtime intra-op threads.
    - `trust_remote_code`: allow the base model's custom code from the Hub. A run's saved `trust_remote_code: true`
      is ignored (with a notice) unless this is set: loading a downloaded run must not run its code unasked.
    - `export_info`: the marker of an export that is being verified before its marker is written.
    - `allow_status`: the run statuses accepted besides `finished` (`pruned`, `failed_after_training`, or "any");
      by default a run that did not finish cleanly is refused, with the reason.
    """

    def __init__(self, path: str | Path, merge: bool = True, device: str | None = None, threads: int | None = None,
                 *, trust_remote_code: bool = False, export_info: dict | None = None,
                 allow_status: tuple[str, ...] | str | None = (FINISHED,)) -> None:  # fmt: skip
        self.run_dir = Path(path)
        self.is_export = (export_info is not None or is_export(self.run_dir)
                          or (self.run_dir / PARTIAL_EXPORT_MARKER).exists())  # fmt: skip
        self.info = export_info if export_info is not None else (
            read_export(self.run_dir) if self.is_export else read_run(self.run_dir, allow_status))  # fmt: skip
        self.format = self.info.get("format", "pytorch") if self.is_export else "pytorch"
        self.config: ExperimentConfig = load_config(self.run_dir / CONFIG_FILE)
        if self.config.model.trust_remote_code and not trust_remote_code:
            logger.warning("%s was trained with trust_remote_code: true; its model code is not run unless you pass "
                           "--trust_remote_code (trust_remote_code=True)", self.run_dir)  # fmt: skip
        self.config.model.trust_remote_code = trust_remote_code
        self.trust_remote_code = trust_remote_code
        self.task = get_task(self.config.data.task)(self.config)
        self.task.set_label_info(json.loads((self.run_dir / LABEL_MAP).read_text()))
        self.task.loaded_from(self.run_dir)
        self.tokenizer = load_tokenizer(str(self.run_dir), trust_remote_code=trust_remote_code)
        self.method = self.config.method.method
        self.merged = False
        if threads and self.format not in ("onnx", "openvino"):
            torch.set_num_threads(threads)
        if self.format == "onnx":
            self.model: Any = OnnxModel(self.run_dir / ONNX_FILE, threads)
        elif self.format == "openvino":
            from querytune.serving.openvino import OPENVINO_FILE, OpenVinoModel

            self.model = OpenVinoModel(self.run_dir / OPENVINO_FILE, threads)
        else:
            device = device or ("cuda" if torch.cuda.is_available() and not self.is_export else "cpu")
            self.model = self._load_model(merge).to(device)
        self.model.eval()

    def _load_model(self, merge: bool) -> nn.Module:
        spec = get_method(self.method)
        if not spec.peft or (self.is_export and self.info.get("merged")):
            with quiet_load_report():
                model, _ = self.task.load_model(str(self.run_dir))
            self.merged = spec.peft
            return model
        import peft

        register_bottleneck()  # a bottleneck-adapter run names a PEFT type that only querytune registers
        with quiet_load_report():  # the base checkpoint lacks the head that the adapter brings
            base, _ = self.task.load_model()
        model = peft.PeftModel.from_pretrained(base, str(self.run_dir))
        if merge and spec.mergeable and not self.is_export:
            from querytune.methods.builders import merge_peft_model

            self.merged = True
            return merge_peft_model(model)
        if merge and not self.is_export:
            logger.info("method %r cannot be merged into the base weights; serving the unmerged PeftModel",
                        self.method)  # fmt: skip
        return model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> np.ndarray:
        return self.task.logits(self, texts, pairs, batch_size=batch_size)

    def count_truncated(self, texts: list[str]) -> int:
        """How many queries are longer than the run's max_seq_length in tokens (their end is cut when scored)."""
        limit = self.config.model.max_length(self.tokenizer)
        lengths = self.tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
        return sum(len(ids) > limit for ids in lengths)

    def predict(self, texts: list[str], top_k: int | None = None, batch_size: int = 64, **inputs) -> list[dict]:
        """The task's prediction for each query; `inputs` are the task's `request_inputs` (e.g. candidates)."""
        top_k = self.task.default_top_k if top_k is None else top_k
        return self.task.predict(self, texts, top_k=top_k, batch_size=batch_size, **inputs)


def load_run(path: str | Path, threads: int | None = None, device: str | None = "cpu",
             trust_remote_code: bool = False, allow_status: tuple[str, ...] | str | None = (FINISHED,)) -> LoadedRun:  # fmt: skip
    """A run (adapter merged where the method allows) or an export, for serving."""
    return LoadedRun(path, merge=True, device=device, threads=threads, trust_remote_code=trust_remote_code,
                     allow_status=allow_status)  # fmt: skip
