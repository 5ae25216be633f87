"""Exporting a finished run for serving: merged PyTorch weights, or ONNX (fp32 or dynamic int8) for ONNX Runtime.

querytune export RUN_DIR --format merged          # adapter folded into the base weights (where the method allows)
querytune export RUN_DIR --format onnx --quantize int8

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
import inspect
import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
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


# --- graph optimisation: ONNX Runtime's transformer fusions, kept only where they match the run
FUSION_TOLERANCE = 1e-3  # largest logit difference a fused fp32 graph may show against the PyTorch run


def graph_ops(path: str | Path) -> dict[str, int]:
    """Operator counts of an ONNX graph, most frequent first."""
    import onnx

    return dict(
        Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node).most_common()
    )


ATTENTION_FUSIONS = ("packed", "mha")


def _ort_fusions(model: Any, attention: str) -> tuple[Any, dict[str, int]]:
    """onnxscript's `optimize_for_ort`; with attention "mha" its last attention step (packing the Q, K, V
    projections into one `Attention` op) is left out, so the projections stay MatMul nodes (int8 can reach them) in
    front of a fused `MultiHeadAttention` core."""
    from onnxscript.rewriter.ort_fusions import _core, optimize_for_ort

    if attention == "packed":
        return optimize_for_ort(model)
    packed = _core.fuse_attention
    _core.fuse_attention = lambda model, debug=False: 0  # the one step fuse_xformers offers no switch for
    try:
        return optimize_for_ort(model)
    finally:
        _core.fuse_attention = packed


def optimize_graph(src: Path, dst: Path, model_config: Any, exporter: str = "dynamo",
                   attention: str = "packed") -> dict[str, Any]:  # fmt: skip
    """Fuse attention, skip + LayerNorm and bias + GELU in an encoder graph; writes `dst` as one file and returns
    what was fused. The caller checks the fused graph against the run before serving it.

    `attention` (dynamo graphs): "packed" fuses each block into one `Attention` op with packed Q, K, V weights (no
    int8 form: ONNX Runtime's QAttention takes no additive attention bias, which this graph's mask becomes);
    "mha" keeps the three projections as MatMul nodes before a `MultiHeadAttention` op, so int8 reaches them.

    Which tool fuses depends on how the graph was exported (measured on all-MiniLM-L6-v2, transformers 5.23,
    onnxruntime 1.32, onnxscript 0.7.2): on the dynamo graph onnxscript's `optimize_for_ort` fuses all 6 attention
    blocks (`Attention`), 12 `SkipLayerNormalization` and 6 `BiasGelu`; ONNX Runtime's transformer optimizer
    (`optimize_model`, model type bert) fuses the LayerNorms and GELUs but no attention, on the dynamo graph and on
    the TorchScript graph alike (transformers 5's mask code is not the pattern it looks for). So dynamo graphs go
    through onnxscript, TorchScript graphs through ONNX Runtime's optimizer.
    """
    if exporter == "dynamo":
        import onnx_ir as ir

        if attention not in ATTENTION_FUSIONS:
            raise ExportError(f"unknown attention fusion {attention!r}; use one of {', '.join(ATTENTION_FUSIONS)}")
        model, counts = _ort_fusions(ir.load(str(src)), attention)
        ir.save(model, str(dst))
        tool = "onnxscript.rewriter.ort_fusions.optimize_for_ort"
        fused = {name: n for name, n in counts.items() if n}
    else:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        options = FusionOptions("bert")
        options.use_raw_attention_mask(True)  # a raw 0/1 mask: right- and left-padded batches both work
        heads, hidden = getattr(model_config, "num_attention_heads", 0), getattr(model_config, "hidden_size", 0)
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # its per-fusion INFO lines
        optimized = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden,
                                   optimization_options=options, opt_level=0)  # fmt: skip
        optimized.save_model_to_file(str(dst))
        tool = "onnxruntime.transformers.optimizer (model_type bert)"
        fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    return {"tool": tool, "fused": fused, "ops": graph_ops(dst), "attention": attention}


# --- int8 quantization: recorded settings, a per-node sensitivity pass, calibration on training queries
@dataclass(frozen=True)
class QuantSetting:
    """One way to quantize a graph to int8 with ONNX Runtime (`onnxruntime.quantization`)."""

    name: str
    static: bool = False  # quantize_static, activations calibrated on training queries; else quantize_dynamic
    quant_format: str = "QOperator"  # QOperator (MatMulInteger / QAttention ...) or QDQ (static only)
    per_channel: bool = True  # one weight scale per output channel, not one per tensor
    op_types: tuple[str, ...] = ("MatMul",)  # operator types quantized (Attention: fused attention -> QAttention)
    exclude_sensitive: int = 0  # leave fp32 the k nodes whose quantization alone moves the logits most (<= half)
    reduce_range: bool = False  # 7-bit weights (for CPUs without VNNI, where 8-bit products can saturate)
    calibrate_method: str = "MinMax"  # static: MinMax, Entropy or Percentile
    calibration_queries: int = 512  # training queries for calibration and for the sensitivity pass
    smooth_alpha: float | None = None  # SmoothQuant (`smooth_graph`) with this migration strength before quantizing
    attention: str = "packed"  # the fused graph it applies to (`optimize_graph`): "mha" lets int8 reach Q, K, V

    def describe(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


QUANT_SETTINGS: dict[str, QuantSetting] = {
    s.name: s
    for s in (
        # Before issue 20: dynamic, MatMul weights per channel (97.55% top-1 agreement on CLINC150, plain graph).
        # A fused graph's packed Attention (onnxscript's, with an additive attention bias) has no QAttention form:
        # its Q, K, V weights stay fp32 whatever the op types.
        QuantSetting("dynamic-matmul-pc"),
        QuantSetting("dynamic-matmul-pt", per_channel=False),
        QuantSetting("dynamic-matmul-pc-reduce", reduce_range=True),
        *(QuantSetting(f"dynamic-matmul-pc-skip{k}", exclude_sensitive=k) for k in (2, 4, 6, 8)),
        *(QuantSetting(f"dynamic-matmul-pc-smooth{a}", smooth_alpha=a) for a in (0.5, 0.75)),
        *(QuantSetting(f"dynamic-matmul-pc-smooth0.5-skip{k}", smooth_alpha=0.5, exclude_sensitive=k) for k in (2, 4)),
        QuantSetting("static-qdq-matmul-pc", static=True, quant_format="QDQ"),
        QuantSetting(
            "static-qdq-matmul-pc-percentile", static=True, quant_format="QDQ", calibrate_method="Percentile"
        ),
        QuantSetting("static-qdq-matmul-pc-smooth0.5", static=True, quant_format="QDQ", smooth_alpha=0.5),
        QuantSetting("static-qoperator-matmul-pc", static=True),
        # The same on a graph whose attention is fused without packing Q, K, V (their MatMuls int8 too).
        QuantSetting("mha-dynamic-matmul-pc", attention="mha"),
        *(QuantSetting(f"mha-dynamic-matmul-pc-skip{k}", attention="mha", exclude_sensitive=k) for k in (4, 8)),
        *(
            QuantSetting(f"mha-dynamic-matmul-pc-smooth{a}", attention="mha", smooth_alpha=a)
            for a in (0.5, 0.75, 0.85)
        ),
        *(
            QuantSetting(
                f"mha-dynamic-matmul-pc-smooth{a}-skip{k}", attention="mha", smooth_alpha=a, exclude_sensitive=k
            )
            for a in (0.75, 0.85)
            for k in (1, 2)
        ),  # fmt: skip
        *(
            QuantSetting(
                f"mha-dynamic-matmul-pc-smooth0.5-skip{k}", attention="mha", smooth_alpha=0.5, exclude_sensitive=k
            )
            for k in (4, 8)
        ),  # fmt: skip
    )
}
# Chosen by benchmarks/quantization.py on CLINC150 validation (benchmarks/results/quantization.md): no setting keeps
# 99% agreement on out-of-scope input (100 validation OOS queries + 3,699 queries of other corpora; best 98.34%); of
# those within 0.5 point of the best, the one with the most MatMuls in int8 (30 of 38, Q, K, V included; 97.92%):
# test agreement 99.44%, in-scope accuracy -0.13 point. Before: "dynamic-matmul-pc-smooth0.5-skip4" (packed graph),
# and before issue 20 "dynamic-matmul-pc" (plain graph).
DEFAULT_QUANT = "mha-dynamic-matmul-pc-smooth0.5-skip8"


def quant_setting(name: str) -> QuantSetting:
    if name not in QUANT_SETTINGS:
        raise ExportError(f"unknown quantization setting {name!r}; use one of {', '.join(QUANT_SETTINGS)}")
    return QUANT_SETTINGS[name]


def calibration_feeds(run: LoadedRun, texts: list[str], pairs: list[str] | None, input_names: list[str],
                      batch_size: int = 32, one_shape: bool = False) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """Model inputs for `texts` in length-sorted batches, as ONNX Runtime takes them (int64 arrays by input name).

    `one_shape` pads every batch to the longest query: histogram calibration (Percentile, Entropy) stacks the
    activations of all batches, which needs one sequence length.
    """
    from querytune.batching import encoded_batches

    max_len = run.config.model.max_seq_length
    pad_to = None
    if one_shape:
        pad_to = max(len(ids) for ids in run.tokenizer(texts, pairs, truncation=True, max_length=max_len)["input_ids"])
    batches = encoded_batches(run.tokenizer, texts, pairs, batch_size, max_len, return_tensors="np", pad_to=pad_to)
    return [{name: np.asarray(enc[name], dtype=np.int64) for name in input_names} for _, enc in batches]


def _session(path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_graph(path: str | Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Every output of a graph on each batch of feeds."""
    session = _session(path)
    return [session.run(None, feed) for feed in feeds]


def _disturbance(reference: list[list[np.ndarray]], other: list[list[np.ndarray]]) -> float:
    """How far a graph's outputs moved: squared logit error over the reference's variance, summed over outputs."""
    total = 0.0
    for k in range(len(reference[0])):
        ref = np.concatenate([b[k].reshape(-1) for b in reference])
        got = np.concatenate([b[k].reshape(-1) for b in other])
        keep = ~np.isnan(ref)
        total += float(np.mean((ref[keep] - got[keep]) ** 2) / (np.var(ref[keep]) + 1e-12))
    return total


def quantizable_nodes(path: str | Path, op_types: tuple[str, ...], dynamic: bool = True) -> list[str]:
    """Names of the nodes that int8 quantization with `op_types` would change: those with a constant weight (a
    MatMul whose B is an initializer, a fused Attention); activation x activation MatMuls stay fp32.

    Dynamic quantization first rewrites every Gemm as MatMul + Add (onnxruntime's `replace_gemm_with_matmul`,
    named `<gemm>_MatMul`), so with "MatMul" the pooler and the classifier head are quantized too, under that name.
    """
    import onnx

    graph = onnx.load(str(path)).graph
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    names = []
    for n in graph.node:
        if n.op_type == "Gemm" and dynamic and "MatMul" in op_types and n.input[1] in constants:
            names.append(f"{n.name}_MatMul")
        elif n.op_type in op_types and (n.op_type != "MatMul" or n.input[1] in constants):
            names.append(n.name)
    return names


def _quantize(src: Path, dst: Path, setting: QuantSetting, feeds: list[dict[str, np.ndarray]] | None,
              nodes_to_quantize: list[str] | None = None, nodes_to_exclude: list[str] | None = None) -> None:  # fmt: skip
    from onnxruntime import quantization as q

    common = {"op_types_to_quantize": list(setting.op_types), "per_channel": setting.per_channel,
              "reduce_range": setting.reduce_range, "weight_type": q.QuantType.QInt8,
              "nodes_to_quantize": nodes_to_quantize, "nodes_to_exclude": nodes_to_exclude or []}  # fmt: skip
    if not setting.static:
        q.quantize_dynamic(str(src), str(dst), **common)
        return

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, np.ndarray]] = iter(feeds or [])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    q.quantize_static(str(src), str(dst), Reader(), quant_format=getattr(q.QuantFormat, setting.quant_format),
                      activation_type=q.QuantType.QInt8 if setting.quant_format == "QDQ" else q.QuantType.QUInt8,
                      calibrate_method=getattr(q.CalibrationMethod, setting.calibrate_method),
                      extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": setting.quant_format == "QDQ"},
                      **common)  # fmt: skip


def smooth_graph(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], alpha: float = 0.5) -> dict[str, Any]:
    """SmoothQuant (Xiao et al. 2022): move activation outliers into the weights before int8, exactly in fp32.

    Transformer activations have a few channels far larger than the rest; one scale per activation tensor (dynamic
    quantization) then leaves the other channels a handful of levels. For every MatMul with a constant weight W the
    input X is divided per channel by s_k = max|X_k|^alpha / max|W_k|^(1 - alpha) (a `Mul` before it, shared by the
    MatMuls that read the same X) and W's rows are multiplied by s, so X W is unchanged while X's channels even out.
    max|X_k| is measured on `feeds` (training queries). onnxruntime offers this only through Intel Neural
    Compressor 2.x (`extra_options={"SmoothQuant": True}`, static quantization only), whose ONNX module current
    releases no longer ship; hence this small graph pass. Writes `dst`; returns what it changed.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    groups: dict[str, list] = {}  # activation name -> the MatMuls with a constant 2-D weight that read it
    for node in graph.node:
        w = node.input[1] if node.op_type == "MatMul" else None
        if w in weights and len(weights[w].dims) == 2 and uses[w] == 1:  # a shared (tied) weight is left alone
            groups.setdefault(node.input[0], []).append(node)
    if not groups:
        onnx.save(model, str(dst))
        return {"alpha": alpha, "smoothed_matmuls": 0}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)
                              for x in groups if x not in known)  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor observable
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = list(groups)
    amax = {x: np.zeros(0, dtype=np.float32) for x in names}
    for feed in feeds:
        for x, value in zip(names, session.run(names, feed), strict=True):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            amax[x] = peak if amax[x].size == 0 else np.maximum(amax[x], peak)
    first_reader = {}
    for index, node in enumerate(graph.node):
        for x in node.input:
            first_reader.setdefault(x, index)
    inserts = []
    for n, (x, nodes) in enumerate(groups.items()):
        w_arrays = [numpy_helper.to_array(weights[node.input[1]]) for node in nodes]
        wmax = np.max([np.abs(w).max(axis=1) for w in w_arrays], axis=0)
        scale = np.power(np.maximum(amax[x], 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        scale = np.clip(scale, 1e-4, 1e4).astype(np.float32)
        for node, w in zip(nodes, w_arrays, strict=True):
            weights[node.input[1]].CopyFrom(numpy_helper.from_array((w * scale[:, None]).astype(w.dtype),
                                                                    node.input[1]))  # fmt: skip
        inverse, smoothed = f"smooth_{n}_inverse", f"smooth_{n}_{x}"
        graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
        inserts.append((first_reader[x], onnx.helper.make_node("Mul", [x, inverse], [smoothed], name=f"smooth_{n}")))
        for node in nodes:
            node.input[0] = smoothed
    nodes = list(graph.node)
    for index, mul in sorted(inserts, key=lambda item: -item[0]):  # from the back: earlier indices stay valid
        nodes.insert(index, mul)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return {"alpha": alpha, "smoothed_matmuls": sum(len(v) for v in groups.values()), "activations": len(groups)}


def sensitivity(src: Path, feeds: list[dict[str, np.ndarray]], op_types: tuple[str, ...], work: Path,
                per_channel: bool = True) -> list[tuple[str, float]]:  # fmt: skip
    """Each quantizable node's disturbance when it alone is quantized (dynamic int8), most sensitive first."""
    reference = run_graph(src, feeds)
    scores = []
    probe = QuantSetting("probe", op_types=op_types, per_channel=per_channel)
    for node in quantizable_nodes(src, op_types, dynamic=True):
        one = work / "sensitivity.onnx"
        _quantize(src, one, probe, None, nodes_to_quantize=[node])
        scores.append((node, _disturbance(reference, run_graph(one, feeds))))
        one.unlink()
    return sorted(scores, key=lambda item: -item[1])


def quantize_graph(src: Path, dst: Path, setting: QuantSetting, calibration: list[dict[str, np.ndarray]],
                   work: Path, sensitivity_cache: dict | None = None) -> dict[str, Any]:  # fmt: skip
    """Quantize `src` to int8 into `dst` with `setting`; returns what was done (for the export marker).

    `sensitivity_cache` keeps sensitivity rankings across calls on the same graph and calibration (a search).
    """
    record: dict[str, Any] = {"setting": setting.describe()}
    excluded: list[str] = []
    if setting.smooth_alpha is not None:
        smoothed = work / f"smoothed-{setting.smooth_alpha}.onnx"
        record["smoothing"] = smooth_graph(src, smoothed, calibration, setting.smooth_alpha)
        src = smoothed
    if setting.exclude_sensitive:
        key = (str(src), setting.op_types, setting.per_channel)
        cache = sensitivity_cache if sensitivity_cache is not None else {}
        if key not in cache:
            cache[key] = sensitivity(src, calibration, setting.op_types, work, setting.per_channel)
        ranked = cache[key]
        # at most half the nodes stay fp32: on a small model (a 2-layer student) k would otherwise take them all
        excluded = [node for node, _ in ranked[: min(setting.exclude_sensitive, len(ranked) // 2)]]
        record["sensitivity"] = [
            {"node": n, "disturbance": round(d, 6)} for n, d in ranked[: 2 * setting.exclude_sensitive]
        ]
    _quantize(src, dst, setting, calibration, nodes_to_exclude=excluded)
    record |= {"excluded_nodes": excluded, "ops": graph_ops(dst)}
    return record


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


def training_sample(run: LoadedRun, n: int, seed: int = 0) -> tuple[list[str], list[str] | None]:
    """Up to `n` queries (and text pairs) of the run's train split: calibration never sees the held-out queries."""
    texts, pairs = run.task.verification_texts(run, run.config.data.train_split)
    keep = sorted(random.Random(seed).sample(range(len(texts)), min(n, len(texts))))
    return [texts[i] for i in keep], [pairs[i] for i in keep] if pairs else None


def graph_outputs(run: LoadedRun, graph: Path, texts: list[str], pairs: list[str] | None) -> dict[str, Any]:
    """A task's verification outputs with `graph` in place of the run's model (an intermediate graph to check)."""
    from querytune.inference import OnnxModel

    probe = copy.copy(run)  # same tokenizer, task and config; only the model differs
    probe.model = OnnxModel(graph, threads=torch.get_num_threads())
    return probe.task.verification_outputs(probe, texts, pairs)


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
    attention fusion, defaults to the int8 setting's or "packed"); `quantization`
    names the int8 setting (`QUANT_SETTINGS`, default `DEFAULT_QUANT`) of `quantize="int8"`. `trust_remote_code` lets the base model's custom code run (a run's saved value is ignored:
    see `LoadedRun`).
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
        graph_record = finish_graph(reference, raw, out / ONNX_FILE, work, inner.config, inputs, optimize, setting,
                                    (texts, pairs, reference_outputs()), exporter, attention)  # fmt: skip
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
    if fmt == "onnx":
        info |= {"onnx_file": ONNX_FILE, "inputs": inputs, "outputs": outputs, "opset": opset, "exporter": exporter,
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
