"""OpenVINO for `querytune export --format openvino`: the plain (unfused) ONNX graph of a run converted to OpenVINO IR
in fp32, and the compiled model called like a transformers model.

Chosen by measurement (benchmarks/results/engines.md, 2-core AVX2 CPU, median of 3 rounds): OpenVINO fp32 ran the
6-layer CLINC150 model about 5% faster than ONNX Runtime int8 at batch 64 with every top-1 answer of the PyTorch run
kept, and about a third slower at batch 1. int8 through NNCF was slower than OpenVINO's own fp32 on that CPU (no VNNI),
so this format is fp32 only.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from querytune.extras import require
from querytune.serving.onnx_graph import int64_feed

OPENVINO_FILE = "model.xml"  # and model.bin beside it: the IR's weights


class OpenVinoModel:
    """An OpenVINO compiled model (CPU plugin, latency hint, `threads` inference threads): torch tensors in, an object
    with one attribute per model output (`logits`, ...) out."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        ov = require("openvino", extra="openvino", feature="running an OpenVINO export")
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.inputs = [p.get_any_name() for p in self.compiled.inputs]
        self.outputs = [p.get_any_name() for p in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def __call__(self, **tensors: Any) -> SimpleNamespace:
        result = self.request.infer(int64_feed(tensors, self.inputs, "OpenVINO"))
        return SimpleNamespace(**{name: torch.from_numpy(np.array(result[port]))
                                  for name, port in zip(self.outputs, self.compiled.outputs, strict=True)})  # fmt: skip

    def eval(self) -> OpenVinoModel:
        return self

    def parameters(self):
        """Task helpers read the device from the first parameter (`next(model.parameters()).device`): CPU."""
        yield torch.empty(0)


def convert_onnx(onnx_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write `out_dir/model.xml` (+ model.bin) from an ONNX graph, weights kept in fp32; returns the marker's record."""
    ov = require("openvino", extra="openvino", feature="querytune export --format openvino")
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(out_dir / OPENVINO_FILE), compress_to_fp16=False)
    return {"openvino_file": OPENVINO_FILE, "openvino_version": ov.get_version(), "precision": "fp32"}
