"""Graph optimisation of an exported encoder: transformer fusions (attention, skip + LayerNorm, bias + GELU), which
the export keeps only where the fused graph matches the PyTorch run."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from querytune.errors import ExportError

logger = logging.getLogger(__name__)

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
