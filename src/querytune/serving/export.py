"""Exporting a finished run for serving: merged PyTorch weights, or ONNX (fp32 or dynamic int8) for ONNX Runtime.

querytune export RUN_DIR --format merged          # adapter folded into the base weights (where the method allows)
querytune export RUN_DIR --format onnx --quantize int8

An export directory is self-describing: tokenizer, `label_map.json`, the run's resolved config, the model config,
the weights (`model.safetensors`, an adapter, or `model.onnx`), `verification.json` (the exported model against the
PyTorch run on a held-out sample) and `querytune_export.json`, written last and atomically, as a run's marker is:
a directory without it is a half-written export and is never loaded.

ONNX goes through `torch.onnx` + ONNX Runtime directly, not Optimum: Optimum pins its own transformers range and
would fight our pinned transformers 5.23. The exporter is torch's default dynamo exporter (`torch.export`, needs
onnxscript): batch and sequence length are symbolic dimensions rather than traced constants, and it handles
transformers 5's mask code; `exporter="torchscript"` selects the legacy tracer (deprecated in torch 2.9+).
Exported inputs are `input_ids`, `attention_mask` and `token_type_ids` when the tokenizer produces them and the
model takes them, so sequence classification of text pairs (cross-encoders) exports like single queries.
"""

from __future__ import annotations

import copy
import inspect
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from querytune import __version__
from querytune.errors import ExportError
from querytune.inference import LoadedRun
from querytune.methods import get_method
from querytune.methods.builders import merge_peft_model
from querytune.progress import progress_label
from querytune.runs import (
    CONFIG_FILE,
    EXPORT_MARKER,
    LABEL_MAP,
    MARKER,
    METRICS_FILE,
    ONNX_FILE,
    PARTIAL_EXPORT_MARKER,
    is_export,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

VERIFY_FILE = "verification.json"
FORMATS = ("merged", "onnx")
QUANTIZE = ("int8",)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_NOT_OUTPUTS = {"loss", "hidden_states", "attentions", "past_key_values"}


def default_export_dir(run_dir: str | Path, fmt: str, quantize: str | None = None) -> Path:
    return Path(run_dir) / "exports" / (fmt if quantize is None else f"{fmt}-{quantize}")


# --- what a model takes and returns
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


# --- verification
def held_out_sample(loaded: LoadedRun, n: int, seed: int = 0) -> tuple[list[str], list[str] | None, str]:
    """Up to `n` queries (and text pairs) from the run's test split, else its validation split.

    A seeded random sample, or the split's first rows where the task compares whole groups (a query's documents).
    """
    data, task = loaded.config.data, loaded.task
    errors = []
    for split in dict.fromkeys([data.test_split, data.validation_split]):
        if not split:
            continue
        try:
            texts, pairs = task.verification_texts(loaded, split)
        except Exception as err:  # noqa: BLE001  (any failure to read the split: try the next, then explain)
            errors.append(f"{split}: {err}")
            continue
        if task.verification_grouped:
            keep = list(range(min(n, len(texts))))
        else:
            keep = sorted(random.Random(seed).sample(range(len(texts)), min(n, len(texts))))
        return [texts[i] for i in keep], [pairs[i] for i in keep] if pairs else None, split
    raise ExportError(
        f"could not read a held-out split of {data.dataset_name or data.test_file} to verify the export "
        f"({'; '.join(errors)}); pass --verify_file with one query per line"
    )


def compare_outputs(
    reference: dict[str, Any], exported: dict[str, Any], groups: list[str] | None = None
) -> dict[str, Any]:
    """Top-1 agreement and the largest absolute logit difference per output (NaN padding ignored).

    A one-score output (a cross-encoder) has no top-1 label: there, top-1 is the best-scored row of each group
    (the best document of each query in `groups`).
    """
    result: dict[str, Any] = {}
    for name, ref in reference.items():
        exp = exported[name]
        valid = ~np.isnan(ref).any(axis=-1)
        if ref.shape[-1] == 1 and groups is not None:
            rows: dict[str, list[int]] = {}
            for i, g in enumerate(groups):
                rows.setdefault(g, []).append(i)
            same = np.array([np.argmax(ref[r, 0]) == np.argmax(exp[r, 0]) for r in rows.values() if len(r) > 1])
            result[name] = {"top1_agreement": float(same.mean()) if same.size else 1.0,
                            "max_abs_logit_diff": float(np.max(np.abs(ref - exp))), "compared": int(same.size),
                            "compared_unit": "best document per query"}  # fmt: skip
            continue
        same = np.argmax(np.nan_to_num(ref[valid]), -1) == np.argmax(np.nan_to_num(exp[valid]), -1)
        result[name] = {
            "top1_agreement": float(same.mean()) if same.size else 1.0,
            "max_abs_logit_diff": float(np.max(np.abs(ref[valid] - exp[valid]))) if same.size else 0.0,
            "compared": int(same.size),
        }
    return result


# --- the export
def _prepare(out: Path, source: Path, overwrite: bool) -> None:
    if out.resolve() == source.resolve() or (out / MARKER).exists():
        raise ExportError(f"{out} is a run directory; export into another folder")
    if out.exists() and any(out.iterdir()):
        if is_export(out) and not overwrite:
            raise ExportError(f"{out} already holds a finished export; pass --overwrite to replace it")
        if not is_export(out) and not (out / PARTIAL_EXPORT_MARKER).exists() and not overwrite:
            raise ExportError(f"{out} is not empty and is not a querytune export; choose another --output_dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_EXPORT_MARKER).write_text(
        "export in progress; a directory without querytune_export.json is unfinished\n"
    )


def export_run(
    run_dir: str | Path,
    fmt: str = "merged",
    quantize: str | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    verify_samples: int = 256,
    verify_file: str | Path | None = None,
    opset: int = 18,
    exporter: str = "dynamo",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Export a finished run, verify it against the PyTorch run, and mark the export finished; returns the marker.

    `trust_remote_code` lets the base model's custom code run (a run's saved value is ignored: see `LoadedRun`)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportError(f"unknown quantization {quantize!r}; use int8")
    if quantize is not None and fmt != "onnx":
        raise ExportError("--quantize int8 applies to --format onnx (ONNX Runtime dynamic quantization)")
    if verify_samples < 1:
        raise ExportError("--verify_samples must be at least 1")
    start = time.perf_counter()
    run_dir = Path(run_dir)
    # the run exactly as trained: the reference
    reference = LoadedRun(run_dir, merge=False, device="cpu", trust_remote_code=trust_remote_code)
    if is_export(run_dir):
        raise ExportError(f"{run_dir} is already an export; export its run directory instead")
    reason = reference.task.export_unsupported()
    if reason:
        raise ExportError(f"cannot export {run_dir} (task {reference.config.data.task}): {reason}")
    out = Path(output_dir) if output_dir else default_export_dir(run_dir, fmt, quantize)
    if verify_file is not None:
        if reference.task.verification_grouped:
            raise ExportError(f"a {reference.config.data.task} run is verified on its held-out groups (a query's "
                              "documents); drop --verify_file")  # fmt: skip
        if not Path(verify_file).is_file():
            raise FileNotFoundError(f"verify file not found: {verify_file}")
        lines = [line.strip() for line in Path(verify_file).read_text().splitlines() if line.strip()]
        texts, pairs, sample_source = lines[:verify_samples], None, str(verify_file)
        if not texts:
            raise ExportError(f"verify file {verify_file} holds no queries")
    else:
        texts, pairs, split = held_out_sample(reference, verify_samples)
        sample_source = f"{split} split of {reference.config.data.dataset_name or reference.config.data.test_file}"
    _prepare(out, run_dir, overwrite)

    method, spec = reference.method, get_method(reference.method)
    model = reference.model
    if spec.mergeable:
        model, merged, note = merge_peft_model(copy.deepcopy(reference.model)), True, f"{method} merged into the base"
    elif spec.peft:
        merged = False
        note = (
            f"method {method!r} cannot be merged: its weights (virtual tokens / bottleneck layers) are not a change "
            "of the base weights, so the adapter is exported unmerged and runs next to the base model"
        )
        logger.warning(note)
    else:
        merged, note = True, f"method {method!r} trains the model itself: nothing to merge"
    model.eval()

    reference.tokenizer.save_pretrained(out)
    for name in (LABEL_MAP, CONFIG_FILE, METRICS_FILE):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = outputs = None
    if fmt == "merged":
        model.save_pretrained(out)
        if not merged:
            inner.config.save_pretrained(out)
    else:
        inner.config.save_pretrained(out)
        target = out / (ONNX_FILE if quantize is None else "model_fp32.onnx")
        try:
            inputs, outputs = export_onnx(model, reference.tokenizer, target, pairs is not None, opset, exporter)
        except ExportError:
            raise
        except Exception as err:  # noqa: BLE001  (torch.onnx raises many types; say which run and method failed)
            raise ExportError(f"ONNX export of {run_dir} (method {method}) failed with {exporter}: {err}") from err
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # Weights of the MatMuls only, one scale per output channel: on the CLINC150 MiniLM run this agreed with
            # fp32 on 97% of test queries against 94.5% for the defaults (which also quantize Gather/embeddings and
            # use one scale per tensor). Heads (Gemm) and activation x activation MatMuls stay fp32.
            quantize_dynamic(str(target), str(out / ONNX_FILE), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"])  # fmt: skip
            target.unlink()
            target.with_suffix(".onnx.data").unlink(missing_ok=True)

    info: dict[str, Any] = {
        "status": "finished",
        "querytune_version": __version__,
        "format": fmt,
        "quantize": quantize,
        "source_run": str(run_dir.resolve()),
        "task": reference.config.data.task,
        "method": method,
        "merged": merged,
        "merge_note": note,
        "base_model": reference.info.get("base_model", reference.config.model.model_name_or_path),
        "metrics": reference.info.get("metrics", {}),
    }
    if fmt == "onnx":
        info |= {"onnx_file": ONNX_FILE, "inputs": inputs, "outputs": outputs, "opset": opset, "exporter": exporter,
                 "torch_version": torch.__version__}  # fmt: skip
    # Verify the export as it will be served, before it is marked finished.
    exported = LoadedRun(out, device="cpu", export_info=info, trust_remote_code=trust_remote_code)
    with progress_label(f"verifying the export on {len(texts)} queries: PyTorch run"):
        expected = reference.task.verification_outputs(reference, texts, pairs)
    with progress_label(f"verifying the export on {len(texts)} queries: {fmt}{'-' + quantize if quantize else ''}"):
        got = exported.task.verification_outputs(exported, texts, pairs)
    comparison = compare_outputs(expected, got, groups=texts if pairs is not None else None)
    verification = {"sample": sample_source, "num_queries": len(texts), "reference": "PyTorch run, unmerged",
                    "outputs": comparison}  # fmt: skip
    write_json_atomic(out / VERIFY_FILE, verification)
    (out / PARTIAL_EXPORT_MARKER).unlink()
    info |= {"verification": verification, "export_time_s": round(time.perf_counter() - start, 2)}
    write_json_atomic(out / EXPORT_MARKER, info)
    return {**info, "export_dir": str(out)}
