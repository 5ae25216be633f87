"""`querytune export` on tiny runs: merged, ONNX (fp32, int8) and OpenVINO exports of intent, slot, joint and text-pair runs,
verified against the PyTorch run; the marker that tells a finished export from a half-written one; the error paths."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from querytune.cli import main
from querytune.errors import ExportError
from querytune.inference import LoadedRun, load_run
from querytune.runs import EXPORT_MARKER, ONNX_FILE, read_export
from querytune.serving import export as export_module
from querytune.serving.export import DEFAULT_QUANT, FUSION_TOLERANCE, QUANT_SETTINGS, VERIFY_FILE, export_run
from querytune.serving.quantize import QuantSetting, calibration_feeds, run_graph, smooth_graph
from querytune.serving.verify import training_sample

from .conftest import SLOT_WORDS, make_slot_rows, tiny_experiment, write_jsonl

TEXTS = ["where is my order 5", "cheap shoes", "return my lamp", "store near 12", "best laptop under 40 dollars"]

INT8_AGREEMENT_FLOOR = 0.75  # top-1 agreement of an int8 export with its fp32 run, on the tiny test runs


def _train(tmp, model_dir, data_dir, **overrides):
    exp = tiny_experiment(tmp, model_dir, data_dir, **overrides)
    assert main(["train", str(exp)]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_bert, tiny_data):
    return _train(tmp_path_factory.mktemp("export_lora"), tiny_bert, tiny_data, method="lora", max_steps=4)


def _same_predictions(a: list[dict], b: list[dict], tol: float = 1e-4) -> None:
    for x, y in zip(a, b, strict=True):
        assert x["query"] == y["query"]
        if "label" in x:
            assert x["label"] == y["label"] and x["score"] == pytest.approx(y["score"], abs=tol)
        if "intent" in x:
            assert x["intent"] == y["intent"] and x["intent_score"] == pytest.approx(y["intent_score"], abs=tol)
        if "spans" in x:
            assert [(s["label"], s["start"], s["end"]) for s in x["spans"]] == [
                (s["label"], s["start"], s["end"]) for s in y["spans"]
            ]


def test_merged_export_is_self_describing_and_matches_the_run(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--format", "merged", "--output_dir", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["export_dir"] == str(out) and printed["num_queries"] == 16  # the tiny test split
    names = {p.name for p in out.iterdir()}
    for expected in ("model.safetensors", "config.json", "tokenizer.json", "label_map.json", "querytune_config.yaml",
                     VERIFY_FILE, EXPORT_MARKER):  # fmt: skip
        assert expected in names, expected
    assert "adapter_model.safetensors" not in names and ".querytune_export_partial" not in names
    info = read_export(out)
    assert info["format"] == "merged" and info["merged"] is True and info["method"] == "lora"
    check = json.loads((out / VERIFY_FILE).read_text())["outputs"]["logits"]
    assert check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-4 and check["compared"] == 16
    reference = LoadedRun(lora_run, merge=False)
    _same_predictions(LoadedRun(out).predict(TEXTS), reference.predict(TEXTS))


def test_onnx_fp32_and_int8_exports(lora_run, tmp_path):
    reference = LoadedRun(lora_run, merge=False)
    fp32 = export_run(lora_run, fmt="onnx", output_dir=tmp_path / "onnx")
    assert fp32["inputs"] == ["input_ids", "token_type_ids", "attention_mask"] or set(fp32["inputs"]) == {
        "input_ids",
        "token_type_ids",
        "attention_mask",
    }
    assert fp32["outputs"] == ["logits"]
    check = fp32["verification"]["outputs"]["logits"]
    assert check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-4
    exported = LoadedRun(tmp_path / "onnx")
    # batch 1 and a longer batch than the export's sample: the axes are dynamic
    for batch in (["track package 7"], TEXTS * 7):
        np.testing.assert_allclose(exported.logits(batch), reference.logits(batch), atol=1e-4)
    _same_predictions(exported.predict(TEXTS, top_k=2), reference.predict(TEXTS, top_k=2))

    int8 = export_run(lora_run, fmt="onnx", quantize="int8", output_dir=tmp_path / "onnx-int8")
    assert int8["quantize"] == "int8" and (tmp_path / "onnx-int8" / ONNX_FILE).is_file()
    assert not (tmp_path / "onnx-int8" / "model_fp32.onnx").exists()
    check = int8["verification"]["outputs"]["logits"]
    assert check["max_abs_logit_diff"] > 0, "int8 really changed the weights"
    # int8 moves a logit here and there, not the answers: a floor under what this tiny run measures (PRINTED below)
    print("int8 agreement", check["top1_agreement"], check["compared"])
    assert check["top1_agreement"] >= INT8_AGREEMENT_FLOOR, check
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "onnx-int8" / ONNX_FILE)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    q = LoadedRun(tmp_path / "onnx-int8").predict(TEXTS)
    assert [r["query"] for r in q] == TEXTS
    same = sum(a["label"] == b["label"] for a, b in zip(q, reference.predict(TEXTS), strict=True))
    print("int8 same labels", same, len(TEXTS))
    assert same >= INT8_AGREEMENT_FLOOR * len(TEXTS), "int8 answers as the fp32 run does"


@pytest.mark.parametrize("task", ["slots", "intent_slots"])
def test_slot_runs_export_to_onnx(task, tmp_path, tmp_path_factory):
    from .conftest import build_tiny_checkpoint

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", make_slot_rows(24, 0))
    write_jsonl(data / "validation.jsonl", make_slot_rows(6, 1))
    write_jsonl(data / "test.jsonl", make_slot_rows(6, 2))
    model = build_tiny_checkpoint("bert", tmp_path / "bert", extra_words=SLOT_WORDS)
    run = _train(tmp_path, model, data, task=task, method="lora", max_steps=3)
    info = export_run(run, fmt="onnx", output_dir=tmp_path / "onnx")
    expected = ["intent_logits", "slot_logits"] if task == "intent_slots" else ["logits"]
    assert info["outputs"] == expected
    outputs = info["verification"]["outputs"]
    assert set(outputs) == ({"slot_logits", "intent_logits"} if task == "intent_slots" else {"slot_logits"})
    for check in outputs.values():
        assert check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-4 and check["compared"] > 0
    queries = ["red nike walking shoes size 10", "track my rain jacket order", "wool socks"]
    _same_predictions(LoadedRun(tmp_path / "onnx").predict(queries), LoadedRun(run, merge=False).predict(queries))


def test_openvino_export_matches_the_run_and_loads_in_plain_openvino(lora_run, tmp_path, capsys):
    """`--format openvino`: fp32 IR of the plain graph, verified and marked like every export; `predict` loads it
    through the run loader, and plain OpenVINO in a fresh process gives the run's logits."""
    import subprocess
    import sys

    out = tmp_path / "ov"
    assert main(["export", str(lora_run), "--format", "openvino", "--output_dir", str(out)]) == 0
    info = read_export(out)
    assert info["format"] == "openvino" and info["precision"] == "fp32" and info["outputs"] == ["logits"]
    assert {"model.xml", "model.bin", VERIFY_FILE, EXPORT_MARKER} <= {p.name for p in out.iterdir()}
    assert not (out / ONNX_FILE).exists() and not (out / ".build").exists()
    check = json.loads((out / VERIFY_FILE).read_text())["outputs"]["logits"]
    assert check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-4 and check["compared"] == 16
    reference, exported = LoadedRun(lora_run, merge=False), LoadedRun(out, threads=1)
    assert exported.format == "openvino"
    for batch in (["track package 7"], TEXTS * 7):  # dynamic batch and sequence axes
        np.testing.assert_allclose(exported.logits(batch), reference.logits(batch), atol=1e-4)
    _same_predictions(exported.predict(TEXTS, top_k=2), reference.predict(TEXTS, top_k=2))
    capsys.readouterr()
    assert main(["predict", str(out), *TEXTS[:2]]) == 0
    assert [json.loads(line)["query"] for line in capsys.readouterr().out.splitlines()] == TEXTS[:2]
    # a teammate's OpenVINO and tokenizer, no querytune
    script = (
        "import json, sys, numpy as np, openvino as ov\n"
        "from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "model = ov.Core().compile_model(sys.argv[1] + '/model.xml', 'CPU')\n"
        "enc = tok(json.loads(sys.argv[2]), padding=True, return_tensors='np')\n"
        "feed = {p.get_any_name(): enc[p.get_any_name()].astype(np.int64) for p in model.inputs}\n"
        "print(json.dumps(model(feed)[model.output(0)].tolist()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(TEXTS)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.array(json.loads(proc.stdout)), reference.logits(TEXTS), atol=1e-4)


def test_openvino_export_of_a_joint_run_keeps_both_outputs(tmp_path):
    from .conftest import build_tiny_checkpoint

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", make_slot_rows(24, 0))
    write_jsonl(data / "validation.jsonl", make_slot_rows(6, 1))
    write_jsonl(data / "test.jsonl", make_slot_rows(6, 2))
    model = build_tiny_checkpoint("bert", tmp_path / "bert", extra_words=SLOT_WORDS)
    run = _train(tmp_path, model, data, task="intent_slots", method="lora", max_steps=3)
    info = export_run(run, fmt="openvino", output_dir=tmp_path / "ov")
    assert info["outputs"] == ["intent_logits", "slot_logits"]
    for check in info["verification"]["outputs"].values():
        assert check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-4 and check["compared"] > 0
    queries = ["red nike walking shoes size 10", "track my rain jacket order", "wool socks"]
    _same_predictions(LoadedRun(tmp_path / "ov").predict(queries), LoadedRun(run, merge=False).predict(queries))


def test_openvino_export_refuses_onnx_runtime_options(lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), "--format", "openvino", "--quantize", "int8"]) == 2
    assert "--quantize int8 applies to --format onnx" in capsys.readouterr().err
    with pytest.raises(ExportError, match="--attention chooses an ONNX Runtime fusion"):
        export_run(lora_run, fmt="openvino", output_dir=tmp_path / "ov", attention="mha")
    assert (
        main(["export", str(lora_run), "--format", "openvino", "--no_optimize", "--output_dir", str(tmp_path / "ov")])
        == 2
    )
    assert "--no_optimize skips ONNX Runtime's fusions" in capsys.readouterr().err
    assert not (tmp_path / "ov").exists(), "refused before anything was written"


def test_int64_feed_converts_the_graph_inputs_and_names_a_missing_one():
    from querytune.serving.onnx_graph import int64_feed

    feed = int64_feed({"input_ids": torch.tensor([[101, 7, 102]], dtype=torch.int32), "attention_mask": [[1, 1, 0]],
                       "extra": torch.ones(1)}, ["input_ids", "attention_mask"], "ONNX")  # fmt: skip
    assert list(feed) == ["input_ids", "attention_mask"] and all(a.dtype == np.int64 for a in feed.values())
    np.testing.assert_array_equal(feed["input_ids"], [[101, 7, 102]])
    np.testing.assert_array_equal(feed["attention_mask"], [[1, 1, 0]])
    with pytest.raises(ValueError, match="the OpenVINO model needs input 'token_type_ids'"):
        int64_feed({"input_ids": torch.ones(1, 2, dtype=torch.long)}, ["input_ids", "token_type_ids"], "OpenVINO")


def test_text_pairs_and_models_without_token_type_ids(tmp_path, tiny_models):
    """A cross-encoder-like run (query, product) exports its pair inputs; MPNet exports no token_type_ids."""
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        product = rng.choice(["shoes", "jacket", "laptop", "lamp"])
        match = rng.random() < 0.5
        other = product if match else rng.choice(["sofa", "tent", "kettle"])
        rows.append({"text": f"cheap {product}", "text2": f"red {other}", "label": "match" if match else "other"})
    data = tmp_path / "pairs"
    write_jsonl(data / "train.jsonl", rows[:32])
    write_jsonl(data / "validation.jsonl", rows[32:40])
    write_jsonl(data / "test.jsonl", rows[40:])
    for arch in ("bert", "mpnet"):
        (tmp_path / arch).mkdir()
        run = _train(tmp_path / arch, tiny_models[arch], data, method="full", text_pair_column="text2",
                     label_column="label", max_steps=2)  # fmt: skip
        info = export_run(run, fmt="onnx", output_dir=tmp_path / arch / "onnx")
        assert ("token_type_ids" in info["inputs"]) == (arch == "bert"), info["inputs"]
        check = info["verification"]["outputs"]["logits"]
        assert info["verification"]["num_queries"] == 8 and check["top1_agreement"] == 1.0
        assert check["max_abs_logit_diff"] < 1e-4
        exported, reference = LoadedRun(tmp_path / arch / "onnx"), LoadedRun(run)
        pairs = ["red shoes", "red tent"]
        np.testing.assert_allclose(exported.logits(["cheap shoes"] * 2, pairs), reference.logits(["cheap shoes"] * 2,
                                   pairs), atol=1e-4)  # fmt: skip


def test_unmergeable_method_is_exported_unmerged_with_a_reason(tmp_path, tiny_bert, tiny_data):
    run = _train(tmp_path, tiny_bert, tiny_data, method="prompt", max_steps=2, prompt_num_virtual_tokens=4)
    info = export_run(run, fmt="merged", output_dir=tmp_path / "merged")
    assert info["merged"] is False and "cannot be merged" in info["merge_note"]
    assert (tmp_path / "merged" / "adapter_model.safetensors").is_file()
    assert info["verification"]["outputs"]["logits"]["top1_agreement"] == 1.0
    _same_predictions(LoadedRun(tmp_path / "merged").predict(TEXTS), LoadedRun(run).predict(TEXTS))
    onnx_info = export_run(run, fmt="onnx", output_dir=tmp_path / "onnx")
    assert onnx_info["merged"] is False and onnx_info["verification"]["outputs"]["logits"]["top1_agreement"] == 1.0


def test_a_half_written_export_never_looks_finished(lora_run, tmp_path, monkeypatch):
    out = tmp_path / "onnx"

    def crash(*args, **kwargs):
        raise RuntimeError("killed during verification")

    monkeypatch.setattr(export_module, "compare_outputs", crash)
    with pytest.raises(RuntimeError, match="killed"):
        export_run(lora_run, fmt="onnx", output_dir=out)
    assert (out / "config.json").is_file() and not (out / EXPORT_MARKER).exists()
    with pytest.raises(ExportError, match="not a finished querytune export"):
        LoadedRun(out)
    assert not load_run(lora_run).is_export  # a run dir still loads as a run
    monkeypatch.undo()
    export_run(lora_run, fmt="onnx", output_dir=out)  # the partial directory is replaced without --overwrite
    assert load_run(out).is_export


def test_export_errors_exit_2_and_name_the_problem(lora_run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(lora_run, unfinished)
    (unfinished / "querytune_run.json").unlink()
    assert main(["export", str(unfinished), "--output_dir", str(tmp_path / "x")]) == 2
    assert "not a finished querytune run" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--format", "merged", "--quantize", "int8"]) == 2
    assert "--quantize int8 applies to --format onnx" in capsys.readouterr().err
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--output_dir", str(out)]) == 0
    assert main(["export", str(lora_run), "--output_dir", str(out)]) == 2
    assert "already holds a finished export; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--output_dir", str(out), "--overwrite"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["export", str(lora_run), "--output_dir", str(other)]) == 2
    assert "not a querytune export" in capsys.readouterr().err and (other / "notes.txt").exists()
    assert main(["export", str(lora_run), "--output_dir", str(tmp_path / "y"), "--verify_file", "nope.txt"]) == 2
    assert "verify file not found" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--output_dir", str(lora_run)]) == 2
    assert "is a run directory" in capsys.readouterr().err


def test_rerank_cross_encoder_exports_its_pairs(tmp_path, ranking_bert, ranking_data):  # noqa: F811
    """A rerank run (one score per (query, document) pair) exports and verifies on its held-out pairs."""
    from querytune.tasks.ranking.common import score_pairs

    from .conftest import ranking_experiment

    exp = ranking_experiment(tmp_path, ranking_bert, ranking_data, "rerank", method="lora", max_steps=3)
    assert main(["train", str(exp)]) == 0
    run = tmp_path / "run"
    info = export_run(run, fmt="onnx", output_dir=tmp_path / "onnx")
    assert "token_type_ids" in info["inputs"] and info["outputs"] == ["logits"]
    check = info["verification"]["outputs"]["logits"]
    assert check["compared_unit"] == "best document per query" and check["compared"] > 0
    assert check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-4
    exported, reference = LoadedRun(tmp_path / "onnx"), LoadedRun(run, merge=False)
    pairs = (["red shoes", "red shoes", "blue tent"], ["red shoes set", "blue lamp", "blue tent pack"])
    np.testing.assert_allclose(score_pairs(exported.model, exported.tokenizer, *pairs, max_length=32),
                               score_pairs(reference.model, reference.tokenizer, *pairs, max_length=32), atol=1e-4)  # fmt: skip
    candidates = ["blue tent pack", "red shoes set", "red lamp"]
    got = exported.task.predict(exported, ["red shoes"], top_k=0, candidates=candidates)
    want = reference.task.predict(reference, ["red shoes"], top_k=0, candidates=candidates)
    assert [h["text"] for h in got[0]["ranked"]] == [h["text"] for h in want[0]["ranked"]]
    assert main(["export", str(run), "--format", "onnx", "--output_dir", str(tmp_path / "x"), "--verify_file",
                 str(exp)]) == 2  # fmt: skip


# --- issue 20: fused graphs and the int8 setting
def test_fused_export_matches_pytorch_and_records_the_fusions(lora_run, tmp_path):
    """ONNX Runtime's transformer optimizer fuses the exported graph; the fused graph is served only because it
    matches the PyTorch run within FUSION_TOLERANCE (and --no_optimize serves the plain graph)."""
    import onnx

    info = export_run(lora_run, fmt="onnx", output_dir=tmp_path / "fused")
    opt = info["optimizer"]
    assert opt["applied"] is True, opt
    assert opt["check"]["top1_agreement"] == 1.0 and opt["check"]["max_abs_logit_diff"] <= FUSION_TOLERANCE
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fused" / ONNX_FILE)).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops and {"Softmax", "Erf"}.isdisjoint(ops), ops
    assert opt["fused"]["attention"] == 2 and opt["fused"]["skip_layer_normalization"] >= 2  # both layers
    check = info["verification"]["outputs"]["logits"]
    assert check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] <= FUSION_TOLERANCE
    reference, exported = LoadedRun(lora_run, merge=False), LoadedRun(tmp_path / "fused")
    for batch in (["track package 7"], TEXTS * 7):  # batch 1 and more than one padded length
        np.testing.assert_allclose(exported.logits(batch), reference.logits(batch), atol=FUSION_TOLERANCE)
    assert read_export(tmp_path / "fused")["optimizer"]["applied"] is True

    plain = export_run(lora_run, fmt="onnx", output_dir=tmp_path / "plain", optimize=False)
    assert plain["optimizer"] == {"applied": False, "reason": "--no_optimize"}
    assert "Attention" not in {n.op_type for n in onnx.load(str(tmp_path / "plain" / ONNX_FILE)).graph.node}

    # A TorchScript graph goes through ONNX Runtime's own optimizer: LayerNorm and GELU fusions, no attention.
    legacy = export_run(lora_run, fmt="onnx", output_dir=tmp_path / "ts", exporter="torchscript")
    assert legacy["optimizer"]["applied"] is True and legacy["optimizer"]["tool"].startswith("onnxruntime")
    assert legacy["optimizer"]["fused"].get("SkipLayerNormalization", 0) >= 2
    assert legacy["verification"]["outputs"]["logits"]["top1_agreement"] == 1.0


def test_mha_attention_fusion_leaves_qkv_to_int8(lora_run, tmp_path):
    """attention "mha": a MultiHeadAttention core per layer with Q, K, V as MatMul nodes, matching the run in fp32;
    its int8 settings quantize those projections, which the packed Attention keeps fp32."""
    import onnx

    fp32 = export_run(lora_run, fmt="onnx", output_dir=tmp_path / "mha", attention="mha")
    assert fp32["optimizer"]["applied"] is True and fp32["optimizer"]["attention"] == "mha"
    ops = [n.op_type for n in onnx.load(str(tmp_path / "mha" / ONNX_FILE)).graph.node]
    assert ops.count("MultiHeadAttention") == 2 and "Attention" not in ops and "SkipLayerNormalization" in ops
    assert fp32["verification"]["outputs"]["logits"]["max_abs_logit_diff"] <= FUSION_TOLERANCE

    def integer_matmuls(name: str) -> int:
        export_run(lora_run, fmt="onnx", quantize="int8", output_dir=tmp_path / name, quantization=name)
        ops = [n.op_type for n in onnx.load(str(tmp_path / name / ONNX_FILE)).graph.node]
        return ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul")

    assert integer_matmuls("mha-dynamic-matmul-pc") >= integer_matmuls("dynamic-matmul-pc") + 2 * 3  # Q, K, V x 2
    with pytest.raises(ExportError, match="unknown attention fusion 'flash'"):
        export_run(lora_run, fmt="onnx", output_dir=tmp_path / "bad", attention="flash")


def test_a_fused_graph_that_differs_from_the_run_is_not_served(lora_run, tmp_path, monkeypatch):
    """The optimizer's output is checked, not trusted: a graph whose logits moved is replaced by the plain one."""
    import onnx

    real = export_module.optimize_graph

    def broken(src, dst, *rest):
        result = real(src, dst, *rest)
        model = onnx.load(str(dst))
        out = model.graph.output[0].name
        for node in model.graph.node:  # scale the logits: a wrong fusion, as far as the check can tell
            node.output[:] = [f"{o}_pre" if o == out else o for o in node.output]
        scale = onnx.helper.make_tensor("scale_by_two", onnx.TensorProto.FLOAT, [], [2.0])
        model.graph.initializer.append(scale)
        model.graph.node.append(onnx.helper.make_node("Mul", [f"{out}_pre", "scale_by_two"], [out]))
        onnx.save(model, str(dst))
        return result

    monkeypatch.setattr(export_module, "optimize_graph", broken)
    info = export_run(lora_run, fmt="onnx", output_dir=tmp_path / "onnx")
    assert info["optimizer"]["applied"] is False and "differs from the run" in info["optimizer"]["reason"]
    check = info["verification"]["outputs"]["logits"]
    assert check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-4


def test_the_int8_setting_is_applied_and_recorded(lora_run, tmp_path, capsys):
    import onnx

    default = export_run(lora_run, fmt="onnx", quantize="int8", output_dir=tmp_path / "default")
    record = read_export(tmp_path / "default")["quantization"]
    assert record["setting"] == QUANT_SETTINGS[DEFAULT_QUANT].describe() == default["quantization"]["setting"]
    assert record["calibration"].endswith("queries of the train split")

    skip = export_run(lora_run, fmt="onnx", quantize="int8", output_dir=tmp_path / "skip",
                      quantization="dynamic-matmul-pc-skip2")  # fmt: skip
    record = skip["quantization"]
    assert record["setting"]["name"] == "dynamic-matmul-pc-skip2" and len(record["excluded_nodes"]) == 2
    ranked = [r["disturbance"] for r in record["sensitivity"]]
    assert [r["node"] for r in record["sensitivity"][:2]] == record["excluded_nodes"] and ranked == sorted(ranked)[
        ::-1
    ]
    nodes = {n.name: n.op_type for n in onnx.load(str(tmp_path / "skip" / ONNX_FILE)).graph.node}
    assert all(nodes.get(name) in ("MatMul", "Attention") for name in record["excluded_nodes"]), record  # still fp32
    assert any(op in ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention") for op in nodes.values())

    static = export_run(lora_run, fmt="onnx", quantize="int8", output_dir=tmp_path / "static",
                        quantization="static-qdq-matmul-pc")  # fmt: skip
    ops = {n.op_type for n in onnx.load(str(tmp_path / "static" / ONNX_FILE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and static["quantization"]["setting"]["static"] is True
    q = LoadedRun(tmp_path / "static").predict(TEXTS)
    assert [r["query"] for r in q] == TEXTS and all(0 <= r["score"] <= 1 for r in q)

    smooth = export_run(lora_run, fmt="onnx", quantize="int8", output_dir=tmp_path / "smooth",
                        quantization="dynamic-matmul-pc-smooth0.5")  # fmt: skip
    assert smooth["quantization"]["smoothing"]["smoothed_matmuls"] == 2 * 3  # per layer: attention out, FFN in, out
    nodes = {n.name: n.op_type for n in onnx.load(str(tmp_path / "smooth" / ONNX_FILE)).graph.node}
    assert sum(name.startswith("smooth_") and op == "Mul" for name, op in nodes.items()) >= 6

    assert main(["export", str(lora_run), "--format", "onnx", "--quantization", "static-qdq-matmul-pc",
                 "--output_dir", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "--quantization names an int8 setting: it needs --quantize int8" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--format", "onnx", "--quantize", "int8", "--quantization", "magic",
                 "--output_dir", str(tmp_path / "y")]) == 2  # fmt: skip
    assert "unknown quantization setting 'magic'" in capsys.readouterr().err


def test_a_skip_count_above_the_node_count_leaves_half_int8(lora_run, tmp_path, monkeypatch):
    """A setting's k most sensitive nodes are capped at half of them: a small model keeps int8 where it can."""
    import onnx

    setting = QuantSetting("skip-everything", exclude_sensitive=1000)
    monkeypatch.setitem(QUANT_SETTINGS, setting.name, setting)
    info = export_run(lora_run, fmt="onnx", quantize="int8", output_dir=tmp_path / "q", quantization=setting.name)
    ranked = info["quantization"]["sensitivity"]
    assert len(ranked) >= 4 and len(info["quantization"]["excluded_nodes"]) == len(ranked) // 2
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q" / ONNX_FILE)).graph.node]
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == len(ranked) - len(ranked) // 2


def test_smoothing_changes_no_output_in_fp32(lora_run, tmp_path):
    """SmoothQuant's rescaling is exact in fp32: X / s times s W. Only int8 rounding sees the difference."""
    export_run(lora_run, fmt="onnx", output_dir=tmp_path / "onnx")
    src = tmp_path / "onnx" / ONNX_FILE
    run = LoadedRun(lora_run, merge=False)
    texts, _ = training_sample(run, 64)
    feeds = calibration_feeds(run, texts, None, ["input_ids", "token_type_ids", "attention_mask"])
    record = smooth_graph(src, tmp_path / "smoothed.onnx", feeds, alpha=0.5)
    assert record["smoothed_matmuls"] > 0
    before, after = run_graph(src, feeds), run_graph(tmp_path / "smoothed.onnx", feeds)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-4, atol=1e-4)
