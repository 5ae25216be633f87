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
import json
import logging
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from querytune import __version__
from querytune.config import load_config
from querytune.inference import LoadedRun, merge_peft_model
from querytune.methods import MERGEABLE, PEFT_METHODS
from querytune.models import load_tokenizer
from querytune.runs import CONFIG_FILE, LABEL_MAP, METRICS_FILE, RunError, write_json_atomic
from querytune.tagging import split_words
from querytune.tasks import get_task
from querytune.tasks.slots import SlotsTask

logger = logging.getLogger(__name__)

EXPORT_MARKER = "querytune_export.json"  # written last, atomically: its presence means the export finished
PARTIAL_MARKER = ".querytune_export_partial"  # written first: the directory is ours to replace
VERIFY_FILE = "verification.json"
ONNX_FILE = "model.onnx"
FORMATS = ("merged", "onnx")
QUANTIZE = ("int8",)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_NOT_OUTPUTS = {"loss", "hidden_states", "attentions", "past_key_values"}


class ExportError(RunError):
    """An export that cannot be made, or a directory that is not a finished export."""


def default_export_dir(run_dir: str | Path, fmt: str, quantize: str | None = None) -> Path:
    return Path(run_dir) / "exports" / (fmt if quantize is None else f"{fmt}-{quantize}")


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_MARKER).is_file()


def read_export(export_dir: str | Path) -> dict[str, Any]:
    """The marker of a finished export; a clear error for a missing or half-written one."""
    path = Path(export_dir)
    if not path.is_dir():
        raise ExportError(f"export directory not found: {path}")
    if not is_export(path):
        raise ExportError(
            f"{path} is not a finished querytune export (no {EXPORT_MARKER}): it was interrupted or is still being "
            "written; run `querytune export` again"
        )
    return json.loads((path / EXPORT_MARKER).read_text())


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


class OnnxModel:
    """An ONNX Runtime session called like a transformers model: torch tensors in, an object with logits out."""

    def __init__(self, path: str | Path, threads: int | None = None, profile_prefix: str | None = None) -> None:
        import onnxruntime as ort

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
        feed = {}
        for name in self.inputs:
            value = tensors.get(name)
            if value is None:
                raise ValueError(f"the ONNX model needs input {name!r}; the tokenizer did not produce it")
            feed[name] = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value, dtype=np.int64)
        arrays = self.session.run(self.outputs, feed)
        return SimpleNamespace(**{name: torch.from_numpy(a) for name, a in zip(self.outputs, arrays, strict=True)})

    def eval(self) -> OnnxModel:
        return self

    def parameters(self):
        """Task helpers read the device from the first parameter (`next(model.parameters()).device`): CPU."""
        yield torch.empty(0)


class ExportedRun:
    """A finished export loaded for prediction, with the interface of `LoadedRun` (the tasks' `predict` runs on it)."""

    def __init__(self, export_dir: str | Path, threads: int | None = None, *, info: dict | None = None) -> None:
        self.run_dir = Path(export_dir)
        # `info` is given only by `export_run`, to verify an export before its marker is written.
        self.info = info if info is not None else read_export(self.run_dir)
        self.config = load_config(self.run_dir / CONFIG_FILE)
        self.task = get_task(self.config.data.task)(self.config)
        self.task.set_label_info(json.loads((self.run_dir / LABEL_MAP).read_text()))
        self.tokenizer = load_tokenizer(str(self.run_dir))
        self.method = self.config.method.method
        self.model: Any
        if self.info["format"] == "onnx":
            self.model = OnnxModel(self.run_dir / ONNX_FILE, threads)
        elif self.info["merged"] or self.method not in PEFT_METHODS:
            self.model, _ = self.task.load_model(str(self.run_dir))
        else:
            import peft

            import querytune.peft_adapter  # noqa: F401  (registers the bottleneck adapter type with PEFT)

            base, _ = self.task.load_model()
            self.model = peft.PeftModel.from_pretrained(base, str(self.run_dir))
        self.model.eval()
        if threads and self.info["format"] != "onnx":
            torch.set_num_threads(threads)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def logits(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> np.ndarray:
        return self.task.logits(self, texts, pairs, batch_size=batch_size)

    def predict(self, texts: list[str], top_k: int = 3, batch_size: int = 64) -> list[dict[str, Any]]:
        return self.task.predict(self, texts, top_k=top_k, batch_size=batch_size)


def load_for_serving(path: str | Path, threads: int | None = None) -> LoadedRun | ExportedRun:
    """An export directory, or a run directory (adapter merged where the method allows)."""
    if is_export(path):
        return ExportedRun(path, threads)
    if threads:
        torch.set_num_threads(threads)
    return LoadedRun(path, merge=True, device="cpu")


def serving_metadata(loaded: LoadedRun | ExportedRun) -> dict[str, Any]:
    """What `GET /metadata` says about a loaded run or export."""
    info = loaded.info or {}
    task = loaded.task
    meta = {
        "path": str(loaded.run_dir),
        "task": loaded.config.data.task,
        "base_model": info.get("base_model", loaded.config.model.model_name_or_path),
        "method": loaded.method,
        "format": info.get("format", "pytorch"),
        "quantize": info.get("quantize"),
        "merged": info.get("merged", isinstance(loaded, LoadedRun) and loaded.method in MERGEABLE),
        "labels": task.labels,
        "metrics": info.get("metrics", {}),
    }
    if getattr(task, "intents", None) is not None:
        meta["intents"] = task.intents
    return meta


# --- verification
def held_out_sample(loaded: LoadedRun, n: int, seed: int = 0) -> tuple[list[str], list[str] | None, str]:
    """Up to `n` queries (and text pairs) from the run's test split, else its validation split, seeded."""
    from querytune.data import load_eval_split
    from querytune.slot_data import load_tagging_eval_split

    data = loaded.config.data
    errors = []
    for split in dict.fromkeys([data.test_split, data.validation_split]):
        try:
            if _is_rerank(loaded.task):  # (query, document) pairs of the query-grouped split
                ds = loaded.task._eval_split(split)
                texts, pairs = list(ds["query"]), list(ds["document"])
            elif isinstance(loaded.task, SlotsTask):
                ds = load_tagging_eval_split(data, split, loaded.task.labels, loaded.task.intents)
                texts, pairs = [" ".join(words) for words in ds["words"]], None
            else:
                ds = load_eval_split(data, split, loaded.task.labels)
                texts = [t or "" for t in ds[data.text_column]]
                pairs = list(ds[data.text_pair_column]) if data.text_pair_column else None
        except Exception as err:  # noqa: BLE001  (any failure to read the split: try the next, then explain)
            errors.append(f"{split}: {err}")
            continue
        if pairs is not None and _is_rerank(loaded.task):  # whole queries, so that rankings can be compared
            keep = list(range(min(n, len(texts))))
        else:
            keep = sorted(random.Random(seed).sample(range(len(texts)), min(n, len(texts))))
        return [texts[i] for i in keep], [pairs[i] for i in keep] if pairs else None, split
    raise ExportError(
        f"could not read a held-out split of {data.dataset_name or data.test_file} to verify the export "
        f"({'; '.join(errors)}); pass --verify_file with one query per line"
    )


def _is_rerank(task: Any) -> bool:
    from querytune.tasks.ranking import RerankTask

    return isinstance(task, RerankTask)


def model_outputs(loaded: Any, texts: list[str], pairs: list[str] | None, batch_size: int = 64) -> dict[str, Any]:
    """Per-query logits by output: `logits` for sequence classification (one score per pair for a cross-encoder);
    word-level `slot_logits` (NaN past a query's words) and `intent_logits` for slot runs, read as each task's
    `predict` reads them."""
    task = loaded.task
    if _is_rerank(task):
        from querytune.tasks.ranking import score_pairs

        max_len = task.config.model.max_seq_length
        return {"logits": score_pairs(loaded.model, loaded.tokenizer, texts, pairs, max_len, batch_size)[:, None]}
    if not isinstance(task, SlotsTask):
        return {"logits": task.logits(loaded, texts, pairs, batch_size=batch_size)}
    outs = task.infer(loaded, [split_words(t)[0] for t in texts], batch_size)
    width = max((len(o.positions) for o in outs), default=0)
    slots = np.full((len(outs), width, len(task.labels)), np.nan, dtype=np.float32)
    for i, o in enumerate(outs):
        slots[i, : len(o.positions)] = o.slot_logits
    result: dict[str, Any] = {"slot_logits": slots}
    if task.with_intent:
        result["intent_logits"] = np.stack([o.intent_logits for o in outs])
    return result


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
    if out.resolve() == source.resolve() or (out / "querytune_run.json").exists():
        raise ExportError(f"{out} is a run directory; export into another folder")
    if out.exists() and any(out.iterdir()):
        if is_export(out) and not overwrite:
            raise ExportError(f"{out} already holds a finished export; pass --overwrite to replace it")
        if not is_export(out) and not (out / PARTIAL_MARKER).exists() and not overwrite:
            raise ExportError(f"{out} is not empty and is not a querytune export; choose another --output_dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_MARKER).write_text("export in progress; a directory without querytune_export.json is unfinished\n")


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
) -> dict[str, Any]:
    """Export a finished run, verify it against the PyTorch run, and mark the export finished; returns the marker."""
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
    reference = LoadedRun(run_dir, merge=False, device="cpu")  # the run exactly as trained: the reference
    out = Path(output_dir) if output_dir else default_export_dir(run_dir, fmt, quantize)
    if verify_file is not None:
        if _is_rerank(reference.task):
            raise ExportError("a rerank run is verified on its held-out (query, document) pairs; drop --verify_file")
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

    method = reference.method
    model = reference.model
    if method in MERGEABLE:
        model, merged, note = merge_peft_model(copy.deepcopy(reference.model)), True, f"{method} merged into the base"
    elif method in PEFT_METHODS:
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
    exported = ExportedRun(out, info=info)
    comparison = compare_outputs(model_outputs(reference, texts, pairs), model_outputs(exported, texts, pairs),
                                 groups=texts if pairs is not None else None)  # fmt: skip
    verification = {"sample": sample_source, "num_queries": len(texts), "reference": "PyTorch run, unmerged",
                    "outputs": comparison}  # fmt: skip
    write_json_atomic(out / VERIFY_FILE, verification)
    (out / PARTIAL_MARKER).unlink()
    info |= {"verification": verification, "export_time_s": round(time.perf_counter() - start, 2)}
    write_json_atomic(out / EXPORT_MARKER, info)
    return {**info, "export_dir": str(out)}
