"""Exporting a finished run for serving: merged PyTorch weights, ONNX (fp32 or dynamic int8) for ONNX Runtime, or
OpenVINO IR (fp32).

querytune export RUN_DIR --format merged          # adapter folded into the base weights (where the method allows)
querytune export RUN_DIR --format onnx --quantize int8
querytune export RUN_DIR --format openvino        # the plain ONNX graph converted by OpenVINO, weights in fp32

An ONNX graph goes through transformer fusions (attention, skip + LayerNorm, bias + GELU: `optimize_graph`) before
any quantization; the fused graph is kept only when it matches the PyTorch run (`--no_optimize` skips the pass).
`--quantize int8` applies a recorded quantization setting (`QUANT_SETTINGS`; `DEFAULT_QUANT` is the one
`benchmarks/quantization.py` chose on CLINC150 validation: see benchmarks/results/quantization.md), and the export
marker says which fusions and which setting were applied.

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
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from querytune import __version__
from querytune.errors import ExportError
from querytune.extras import require_extra
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
from querytune.serving.fusion import ATTENTION_FUSIONS, FUSION_TOLERANCE, optimize_graph
from querytune.serving.onnx_graph import export_onnx
from querytune.serving.quantize import (
    DEFAULT_QUANT,
    QUANT_SETTINGS,
    QuantSetting,
    calibration_feeds,
    quant_setting,
    quantize_graph,
)
from querytune.serving.verify import compare_outputs, graph_outputs, held_out_sample, training_sample

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_QUANT", "FORMATS", "FUSION_TOLERANCE", "QUANTIZE", "QUANT_SETTINGS", "VERIFY_FILE", "default_export_dir",
           "export_run", "finish_graph"]  # fmt: skip

VERIFY_FILE = "verification.json"
FORMATS = ("merged", "onnx", "openvino")
QUANTIZE = ("int8",)


def default_export_dir(run_dir: str | Path, fmt: str, quantize: str | None = None) -> Path:
    return Path(run_dir) / "exports" / (fmt if quantize is None else f"{fmt}-{quantize}")


# --- from the exported graph to the served one
def finish_graph(run: LoadedRun, raw: Path, dst: Path, work: Path, model_config: Any, input_names: list[str],
                 optimize: bool, setting: QuantSetting | None, check: tuple, exporter: str = "dynamo",
                 attention: str | None = None) -> dict[str, Any]:  # fmt: skip
    """From the exported graph to the served one (`dst`, one file): fusions if they match the run, then int8.
    `attention` is the attention fusion (default: the int8 setting's, else "packed").

    `check` is (texts, pairs, the run's outputs on them): the verification sample. Returns the marker's record of
    both steps.
    """
    import onnx

    texts, pairs, reference = check
    record: dict[str, Any] = {}
    graph = raw
    if optimize:
        fused = work / "fused.onnx"
        try:
            attention = attention or (setting.attention if setting is not None else "packed")
            result = optimize_graph(raw, fused, model_config, exporter, attention)
        except Exception as err:  # noqa: BLE001  (a pattern the optimizer cannot handle: serve the plain graph)
            record["optimizer"] = {"applied": False, "reason": f"the optimizer failed: {type(err).__name__}: {err}"}
        else:
            groups = texts if pairs is not None else None
            comparison = compare_outputs(reference, graph_outputs(run, fused, texts, pairs), groups=groups)
            worst = max(c["max_abs_logit_diff"] for c in comparison.values())
            agree = min(c["top1_agreement"] for c in comparison.values())
            applied = agree == 1.0 and worst <= FUSION_TOLERANCE
            record["optimizer"] = {"applied": applied, **result, "check": {"max_abs_logit_diff": worst,
                                   "top1_agreement": agree, "tolerance": FUSION_TOLERANCE}}  # fmt: skip
            if applied:
                graph = fused
            else:
                record["optimizer"]["reason"] = (f"the fused graph differs from the run (largest logit difference "
                                                 f"{worst:.2g}, agreement {agree:.4f}): serving the plain graph")  # fmt: skip
                logger.warning("export: %s", record["optimizer"]["reason"])
    else:
        record["optimizer"] = {"applied": False, "reason": "--no_optimize"}
    if setting is None:
        onnx.save(onnx.load(str(graph)), str(dst))  # one file, weights inside
        return record
    calibration_texts, calibration_pairs = training_sample(run, setting.calibration_queries)
    feeds = calibration_feeds(run, calibration_texts, calibration_pairs, input_names,
                              one_shape=setting.static and setting.calibrate_method != "MinMax")  # fmt: skip
    record["quantization"] = quantize_graph(graph, dst, setting, feeds, work)
    record["quantization"]["calibration"] = f"{len(calibration_texts)} queries of the train split"
    return record


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
    optimize: bool = True,
    quantization: str | None = None,
    allow_status: tuple[str, ...] | str | None = ("finished",),
    trust_remote_code: bool = False,
    attention: str | None = None,
) -> dict[str, Any]:
    """Export a finished run, verify it against the PyTorch run, and mark the export finished; returns the marker.

    ONNX: `optimize` runs the transformer optimizer (kept where the fused graph matches the run; `attention`, its
    attention fusion, defaults to the int8 setting's or "packed"); `quantization` names the int8 setting
    (`QUANT_SETTINGS`, default `DEFAULT_QUANT`) of `quantize="int8"`. OpenVINO: the plain graph, converted in fp32
    (`optimize`, `attention` and `quantize` do not apply). `trust_remote_code` lets the base model's custom code run
    (a run's saved value is ignored: see `LoadedRun`).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportError(f"unknown quantization {quantize!r}; use int8")
    if quantize is not None and fmt != "onnx":
        raise ExportError("--quantize int8 applies to --format onnx (ONNX Runtime dynamic quantization)")
    if verify_samples < 1:
        raise ExportError("--verify_samples must be at least 1")
    if attention is not None and attention not in ATTENTION_FUSIONS:
        raise ExportError(f"unknown attention fusion {attention!r}; use one of {', '.join(ATTENTION_FUSIONS)}")
    if quantization is not None and quantize is None:
        raise ExportError("--quantization names an int8 setting: it needs --quantize int8")
    if fmt in ("onnx", "openvino"):  # before any work: torch.onnx, the fusions and the verification need the stack
        require_extra("export", f"querytune export --format {fmt}")
    if fmt == "openvino":
        require_extra("openvino", "querytune export --format openvino")
    if fmt == "openvino" and attention is not None:
        raise ExportError("--attention chooses an ONNX Runtime fusion; an OpenVINO export converts the plain graph")
    if fmt == "openvino" and not optimize:
        raise ExportError("--no_optimize skips ONNX Runtime's fusions; an OpenVINO export converts the plain graph")
    setting = quant_setting(quantization or DEFAULT_QUANT) if quantize == "int8" else None
    start = time.perf_counter()
    run_dir = Path(run_dir)
    # the run exactly as trained: the reference
    reference = LoadedRun(run_dir, merge=False, device="cpu", trust_remote_code=trust_remote_code,
                          allow_status=allow_status)  # fmt: skip
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

    cached: list[dict[str, Any]] = []

    def reference_outputs() -> dict[str, Any]:
        """The PyTorch run's outputs on the verification sample (computed once)."""
        if not cached:
            cached.append(reference.task.verification_outputs(reference, texts, pairs))
        return cached[0]

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
    extra_files = reference.task.export_files(reference, out)  # e.g. a retrieval run's catalogue and embeddings
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = outputs = None
    if fmt == "merged":
        model.save_pretrained(out)
        if not merged:
            inner.config.save_pretrained(out)
    else:
        inner.config.save_pretrained(out)
        work = out / ".build"  # intermediate graphs, removed once the served graph is written
        work.mkdir()
        raw = work / "exported.onnx"
        try:
            inputs, outputs = export_onnx(model, reference.tokenizer, raw, pairs is not None, opset, exporter)
        except ExportError:
            raise
        except Exception as err:  # noqa: BLE001  (torch.onnx raises many types; say which run and method failed)
            raise ExportError(f"ONNX export of {run_dir} (method {method}) failed with {exporter}: {err}") from err
        if fmt == "onnx":
            graph_record = finish_graph(reference, raw, out / ONNX_FILE, work, inner.config, inputs, optimize,
                                        setting, (texts, pairs, reference_outputs()), exporter, attention)  # fmt: skip
        else:  # OpenVINO reads the plain graph (ONNX Runtime's fused operators are not standard ONNX)
            from querytune.serving.openvino import convert_onnx

            graph_record = convert_onnx(raw, out)
        shutil.rmtree(work)

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
        "extra_files": extra_files,
    }
    if fmt in ("onnx", "openvino"):
        info |= {"onnx_file": ONNX_FILE} if fmt == "onnx" else {}
        info |= {"inputs": inputs, "outputs": outputs, "opset": opset, "exporter": exporter,
                 "torch_version": torch.__version__, **graph_record}  # fmt: skip
    # Verify the export as it will be served, before it is marked finished.
    exported = LoadedRun(out, device="cpu", export_info=info, trust_remote_code=trust_remote_code)
    with progress_label(f"verifying the export on {len(texts)} queries: PyTorch run"):
        expected = reference_outputs()
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
