"""Writing a model as an ONNX graph: which inputs it takes, which logits it returns, and torch.onnx's export with
dynamic batch and sequence axes (used by `querytune export --format onnx`)."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from querytune.errors import ExportError

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_NOT_OUTPUTS = {"loss", "hidden_states", "attentions", "past_key_values"}


# --- what a model takes and returns
def int64_feed(tensors: dict[str, Any], names: list[str], engine: str) -> dict[str, np.ndarray]:
    """The inputs `names` of an exported graph as int64 arrays; a missing one is an error naming it."""
    feed = {}
    for name in names:
        value = tensors.get(name)
        if value is None:
            raise ValueError(f"the {engine} model needs input {name!r}; the tokenizer did not produce it")
        feed[name] = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value, dtype=np.int64)
    return feed


def model_inputs(model: nn.Module, tokenizer) -> list[str]:
    """The encoder inputs to export: what the tokenizer produces (for a text pair too) and the model accepts."""
    produced = set(tokenizer(["a"], ["b"]).keys())
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = getattr(inner, getattr(inner, "base_model_prefix", ""), inner)
    # A joint model lists token_type_ids and drops it for encoders without segment embeddings (MPNet).
    accepted = set(inspect.signature(encoder.forward).parameters) & set(inspect.signature(inner.forward).parameters)
    return [name for name in MODEL_INPUTS if name in produced and (name in accepted or name != "token_type_ids")]


def output_names(model: nn.Module, sample: dict[str, torch.Tensor]) -> list[str]:
    """The logits tensors of a model's output (`logits`; `intent_logits` + `slot_logits` for the joint model)."""
    with torch.inference_mode():
        out = model(**sample)
    names = [k for k, v in out.items() if k not in _NOT_OUTPUTS and isinstance(v, torch.Tensor)]
    if not names:
        raise ExportError(f"{type(model).__name__} returned no logits to export")
    return names


class _LogitsOnly(nn.Module):
    """Positional tensors in, logits tuple out: the signature torch.onnx exports."""

    def __init__(self, model: nn.Module, inputs: list[str], outputs: list[str]) -> None:
        super().__init__()
        self.model, self.inputs, self.outputs = model, inputs, outputs

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.inputs, tensors, strict=True)))
        return tuple(out[name] for name in self.outputs)


def export_onnx(
    model: nn.Module, tokenizer, path: Path, pair: bool = False, opset: int = 18, exporter: str = "dynamo"
) -> tuple[list[str], list[str]]:
    """Write `model` as ONNX with dynamic batch and sequence axes; returns (input names, output names)."""
    texts = ["where is my package", "cheap red running shoes size 10 for kids"]
    enc = tokenizer(texts, texts[::-1] if pair else None, padding=True, return_tensors="pt")
    inputs = model_inputs(model, tokenizer)
    sample = {k: enc[k] for k in inputs}
    outputs = output_names(model, sample)
    wrapper = _LogitsOnly(model, inputs, outputs).eval()
    args = tuple(sample[k] for k in inputs)
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        torch.onnx.export(wrapper, args, str(path), input_names=inputs, output_names=outputs, opset_version=opset,
                          dynamic_shapes=(({0: batch, 1: seq},) * len(inputs),), dynamo=True, verbose=False)  # fmt: skip
    elif exporter == "torchscript":
        axes = {k: {0: "batch", 1: "sequence"} for k in inputs} | {k: {0: "batch", 1: "sequence"} for k in outputs}
        torch.onnx.export(wrapper, args, str(path), input_names=inputs, output_names=outputs, opset_version=opset,
                          dynamic_axes=axes, dynamo=False)  # fmt: skip
    else:
        raise ExportError(f"unknown exporter {exporter!r}; use dynamo or torchscript")
    return inputs, outputs
