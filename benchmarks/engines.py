"""Other CPU inference engines for `benchmarks/inference.py`: OpenVINO (fp32, NNCF int8, NNCF accuracy-controlled
int8) and CTranslate2 (int8, int8_float32), each made from a querytune run or export and called like the run's model.

An engine directory holds the engine's files and `engine.json` (what made it: the engine, its mode, the source it was
made from, the int8 agreement on validation where NNCF measured one). `EngineRun` loads it with the tokenizer, labels
and task of the run it came from, so the task's own `logits` / `predict` batch and read it exactly as they do an
ONNX Runtime export. Optional: `pip install openvino nncf ctranslate2` (not querytune dependencies).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from querytune.serving.onnx_graph import int64_feed
from querytune.serving.openvino import OPENVINO_FILE, OpenVinoModel  # what `export --format openvino` serves

ENGINE_FILE = "engine.json"


class _EngineModel:
    """What the task helpers read from a model besides calling it."""

    def eval(self):
        return self

    def parameters(self):
        yield torch.empty(0)


class Ct2Model(_EngineModel):
    """A CTranslate2 BERT encoder and the run's classification head on its pooled output (BERT's pooler is part of
    the CTranslate2 model; the head's dense layer is applied here in fp32)."""

    inputs = ["input_ids", "attention_mask", "token_type_ids"]

    def __init__(self, path: str | Path, compute_type: str, threads: int | None = None) -> None:
        import ctranslate2

        self.encoder = ctranslate2.Encoder(str(path), device="cpu", compute_type=compute_type,
                                           intra_threads=threads or 0)  # fmt: skip
        head = np.load(Path(path) / "head.npz")
        self.weight, self.bias = head["weight"].T.copy(), head["bias"]
        self.storage = ctranslate2.StorageView

    def __call__(self, **tensors: Any) -> SimpleNamespace:
        feed = int64_feed(tensors, [n for n in self.inputs if tensors.get(n) is not None], "CTranslate2")
        ids = feed["input_ids"].astype(np.int32)
        lengths = feed["attention_mask"].sum(axis=1).astype(np.int32)
        types = feed.get("token_type_ids")
        out = self.encoder.forward_batch(self.storage.from_array(ids), self.storage.from_array(lengths),
                                         token_type_ids=types.tolist() if types is not None else None)  # fmt: skip
        pooled = np.array(out.pooler_output)
        return SimpleNamespace(logits=torch.from_numpy(pooled @ self.weight + self.bias))


class EngineRun:
    """An engine directory with the tokenizer, labels and task of its source: what `LoadedRun` gives for an export,
    so `run.logits(texts)` and `run.predict(texts)` go through the task's own batching and OOS detector."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from querytune.config import load_config
        from querytune.models import load_tokenizer
        from querytune.runs import CONFIG_FILE, LABEL_MAP
        from querytune.tasks import get_task

        self.run_dir = Path(path)
        self.info = json.loads((self.run_dir / ENGINE_FILE).read_text())
        source = Path(self.info["source"])
        self.config = load_config(source / CONFIG_FILE)
        self.task = get_task(self.config.data.task)(self.config)
        self.task.set_label_info(json.loads((source / LABEL_MAP).read_text()))
        self.task.loaded_from(source)
        self.tokenizer = load_tokenizer(str(source))
        if self.info["engine"] == "openvino":
            self.model: Any = OpenVinoModel(self.run_dir / OPENVINO_FILE, threads)
        else:
            self.model = Ct2Model(self.run_dir, self.info["compute_type"], threads)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def logits(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> np.ndarray:
        return self.task.logits(self, texts, pairs, batch_size=batch_size)

    def predict(self, texts: list[str], top_k: int | None = None, batch_size: int = 64) -> list[dict]:
        return self.task.predict(self, texts, top_k=1 if top_k is None else top_k, batch_size=batch_size)


def _write_info(out: Path, info: dict) -> None:
    (out / ENGINE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def made_as(out: Path, info: dict) -> bool:
    """Whether `out` is an engine directory made with these settings (so it can be reused)."""
    path = out / ENGINE_FILE
    if not path.is_file():
        return False
    have = json.loads(path.read_text())
    return all(have.get(k) == v for k, v in info.items())


def _validation_batches(source: Path, texts: list[str], reference: np.ndarray, batch_size: int = 64) -> list:
    """(model inputs as int64 arrays, the PyTorch run's top-1 on them) per length-sorted batch of validation."""
    from querytune.batching import encoded_batches
    from querytune.config import load_config
    from querytune.models import load_tokenizer
    from querytune.runs import CONFIG_FILE

    tokenizer = load_tokenizer(str(source))
    max_length = load_config(source / CONFIG_FILE).model.max_length(tokenizer)
    items = []
    for idx, enc in encoded_batches(tokenizer, texts, None, batch_size, max_length, "np"):
        items.append(({k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}, reference[idx]))
    return items


def make_openvino(onnx_export: Path, out: Path, mode: str, run: Path, val_texts: list[str], reference: np.ndarray,
                  max_drop: float = 0.005, threads: int | None = None) -> dict:  # fmt: skip
    """OpenVINO IR from an fp32 ONNX export. `mode`: "fp32"; "int8" (NNCF post-training quantisation, transformer
    model type, 300 calibration batches drawn from validation); "int8-ac" (NNCF accuracy-controlled quantisation:
    layers go back to fp32 until top-1 agreement with the PyTorch run on validation drops at most `max_drop`)."""
    import nncf
    import openvino as ov

    from querytune.runs import ONNX_FILE

    info = {"engine": "openvino", "mode": mode, "source": str(run), "onnx": str(onnx_export)}
    if made_as(out, info):
        return json.loads((out / ENGINE_FILE).read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / ENGINE_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    model = ov.Core().read_model(str(onnx_export / ONNX_FILE))
    extra: dict[str, Any] = {}
    if mode != "fp32":
        items = _validation_batches(run, val_texts, reference)
        calibration = nncf.Dataset(items, lambda item: item[0])

        def agreement(compiled, data) -> tuple[float, list[float]]:
            """Top-1 agreement over all queries, and per dataset item (one batch each), as NNCF ranks by items."""
            hits, per_item = [], []
            for feed, ref in data:
                logits = compiled(feed)[compiled.output(0)]
                same = np.argmax(logits, axis=-1) == ref
                hits.append(same)
                per_item.append(float(same.mean()))
            return float(np.concatenate(hits).mean()), per_item

        if mode == "int8":
            model = nncf.quantize(model, calibration, model_type=nncf.ModelType.TRANSFORMER, subset_size=300)
        elif mode == "int8-ac":
            model = nncf.quantize_with_accuracy_control(
                model, calibration, nncf.Dataset(items), agreement, max_drop=max_drop,
                drop_type=nncf.DropType.ABSOLUTE, model_type=nncf.ModelType.TRANSFORMER, subset_size=300)  # fmt: skip
        else:
            raise ValueError(f"unknown OpenVINO mode {mode!r}")
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads} if threads else {})
        extra["validation_agreement"] = agreement(compiled, items)[0]
    ov.save_model(model, str(out / OPENVINO_FILE), compress_to_fp16=False)
    info.update(extra, make_s=time.perf_counter() - start)
    _write_info(out, info)
    return info


def make_ctranslate2(run: Path, out: Path, compute_type: str) -> dict:
    """A CTranslate2 encoder (weights stored int8) from a full fine-tune or merged export of a BERT classifier, the
    classification head beside it (`head.npz`). `compute_type`: "int8" or "int8_float32" at load time."""
    import ctranslate2
    from safetensors.numpy import load_file

    info = {"engine": "ctranslate2", "compute_type": compute_type, "source": str(run)}
    if made_as(out, info):
        return json.loads((out / ENGINE_FILE).read_text())
    import transformers

    # CTranslate2 4.8's BERT loader asserts on `config.position_embedding_type`, which transformers 5 no longer sets
    # (BERT's positions are absolute there): give the class the value it had.
    if not hasattr(transformers.BertConfig, "position_embedding_type"):
        transformers.BertConfig.position_embedding_type = "absolute"
    start = time.perf_counter()
    ctranslate2.converters.TransformersConverter(str(run)).convert(str(out), quantization="int8", force=True)
    weights = load_file(str(run / "model.safetensors"))
    head = {k.rsplit(".", 1)[1]: v for k, v in weights.items() if k.startswith("classifier.")}
    if set(head) != {"weight", "bias"}:
        raise ValueError(f"{run}: no classifier.weight / classifier.bias in model.safetensors (found {sorted(head)})")
    np.savez(out / "head.npz", weight=head["weight"].astype(np.float32), bias=head["bias"].astype(np.float32))
    info["make_s"] = time.perf_counter() - start
    _write_info(out, info)
    return info
