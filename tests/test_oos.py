"""Out-of-scope detection: scores, thresholds chosen on validation only, and the threshold honoured by every path
that answers a query (predict, eval, export, serve)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from sklearn.metrics import roc_auc_score

from querytune.tasks.shared import oos

from .conftest import make_rows, tiny_experiment, write_jsonl

OOS_QUERIES = ["tell me a joke", "what is the meaning of life", "sing a song", "who won the game", "weather on mars"]


def _logits(n_in: int, n_oos: int, seed: int, classes: int = 4, with_oos_class: bool = True):
    """Synthetic logits: in-scope rows peaked on their class, OOS rows flat; gold ids (OOS = last class)."""
    rng = np.random.default_rng(seed)
    k = classes + int(with_oos_class)
    gold_in = rng.integers(0, classes, n_in)
    rows_in = rng.normal(0, 1, (n_in, k))
    rows_in[np.arange(n_in), gold_in] += rng.uniform(0.5, 6, n_in)
    rows_oos = rng.normal(0, 1, (n_oos, k))
    if with_oos_class:
        rows_oos[:, classes] += rng.uniform(-1, 3, n_oos)
    logits = np.vstack([rows_in, rows_oos])
    gold = np.concatenate([gold_in, np.full(n_oos, classes)])
    return logits, gold


def test_scores_by_hand():
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    np.testing.assert_allclose(oos.scores(logits, "msp", 2), softmax(logits, -1)[:, :2].max(-1))
    np.testing.assert_allclose(oos.scores(logits, "energy", 2), logsumexp(logits[:, :2], -1))
    np.testing.assert_allclose(oos.scores(logits, "oos_class", 2), 1 - softmax(logits, -1)[:, 2])
    np.testing.assert_allclose(oos.scores(logits, "msp", None), softmax(logits, -1).max(-1))
    with pytest.raises(ValueError, match="needs an out-of-scope class"):
        oos.scores(logits, "oos_class", None)
    # the best in-scope answer never is the OOS class
    assert oos.best_in_scope(logits, 2).tolist() == [0, 0]


def _brute(logits, gold, detector, oos_id):
    s = oos.scores(logits, detector, oos_id)
    correct = oos.best_in_scope(logits, oos_id) == gold
    is_oos = gold == oos_id
    rows = []
    for t in [*np.unique(s), np.inf]:
        acc = np.mean((s >= t) & correct & ~is_oos) / np.mean(~is_oos)
        rec = np.mean(s[is_oos] < t)
        rows.append((t, acc, rec))
    return rows


@pytest.mark.parametrize("detector", ["msp", "energy", "oos_class"])
def test_rules_pick_what_they_promise(detector):
    logits, gold = _logits(300, 80, seed=1)
    brute = _brute(logits, gold, detector, 4)
    det = oos.choose_threshold(logits, gold, detector, 4, "max_sum", 0.5, 0.95)
    best = max(brute, key=lambda r: r[1] + r[2])
    assert det.threshold == pytest.approx(best[0]) and det.rule == "max_sum"

    det = oos.choose_threshold(logits, gold, detector, 4, "in_scope_drop", 2.0, 0.95)
    base = np.mean((np.argmax(logits, -1) == gold)[gold != 4])
    allowed = [r for r in brute if r[1] >= base - 0.02 - 1e-12]
    assert det.chosen_on["oos_recall"] == pytest.approx(max(r[2] for r in allowed))
    assert det.chosen_on["in_scope_accuracy"] >= base - 0.02 - 1e-12

    det = oos.choose_threshold(logits, gold, detector, 4, "in_scope_recall", 0.5, 0.9)
    s = oos.scores(logits, detector, 4)[gold != 4]
    assert np.mean(s >= det.threshold) == pytest.approx(0.9, abs=1 / len(s))


def test_threshold_depends_on_validation_only():
    val_logits, val_gold = _logits(200, 50, seed=2)
    a = oos.choose_threshold(val_logits, val_gold, "msp", 4, "auto", 0.5, 0.95)
    b = oos.choose_threshold(val_logits.copy(), val_gold.copy(), "msp", 4, "auto", 0.5, 0.95)
    other_logits, other_gold = _logits(200, 50, seed=3)
    c = oos.choose_threshold(other_logits, other_gold, "msp", 4, "auto", 0.5, 0.95)
    assert a.threshold == b.threshold != c.threshold and a.rule == "in_scope_drop"
    assert a.chosen_on["num_examples"] == 250 and a.chosen_on["num_oos"] == 50


def test_a_corpus_without_oos_examples_uses_in_scope_recall():
    logits, gold = _logits(200, 0, seed=4, with_oos_class=False)
    det = oos.choose_threshold(logits, gold, "energy", None, "auto", 0.5, 0.95)
    assert det.rule == "in_scope_recall" and det.oos_id is None
    assert np.mean(oos.scores(logits, "energy", None) >= det.threshold) == pytest.approx(0.95, abs=0.01)
    with pytest.raises(ValueError, match="oos_threshold_rule 'max_sum' needs out-of-scope examples"):
        oos.choose_threshold(logits, gold, "energy", None, "max_sum", 0.5, 0.95)
    # rejected queries are answered with the id after the last label
    preds = oos.predict_ids(logits, det, oos_answer=4)
    assert set(np.unique(preds)) <= {0, 1, 2, 3, 4} and (preds == 4).mean() == pytest.approx(0.05, abs=0.01)


def test_detection_metrics_by_hand():
    logits, gold = _logits(400, 100, seed=5)
    det = oos.choose_threshold(logits, gold, "msp", 4, "max_sum", 0.5, 0.95)
    m = oos.detection_metrics(logits, gold, det, 4, 4)
    s = oos.scores(logits, "msp", 4)
    is_oos = gold == 4
    assert m["oos_auroc"] == pytest.approx(roc_auc_score(~is_oos, s))
    cut = np.sort(s[~is_oos])[int(np.floor(0.05 * (~is_oos).sum()))]
    assert m["oos_fpr_at_95_in_scope_recall"] == pytest.approx(np.mean(s[is_oos] >= cut))
    said = oos.predict_ids(logits, det, 4) == 4
    assert m["oos_recall"] == pytest.approx(np.mean(said[is_oos]))
    assert m["oos_precision"] == pytest.approx(np.mean(is_oos[said]))


# --- a trained run: the threshold is saved and honoured everywhere a query is answered
@pytest.fixture(scope="module")
def oos_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("oos_data")
    for split, n, seed in (("train", 16, 0), ("validation", 6, 1), ("test", 6, 2)):
        rows = make_rows(n, seed) + [{"text": q, "intent": "oos"} for q in OOS_QUERIES[: 3 if split == "train" else 5]]
        write_jsonl(root / f"{split}.jsonl", rows)
    return root


@pytest.fixture(scope="module")
def msp_run(tmp_path_factory, tiny_bert, oos_data):
    from querytune.config import load_config
    from querytune.train import run

    tmp = tmp_path_factory.mktemp("msp_run")
    exp = tiny_experiment(tmp, tiny_bert, oos_data, oos_label="oos", oos_detector="msp", max_steps=30,
                          learning_rate=3e-3, oos_threshold_rule="max_sum")  # fmt: skip
    return run(load_config(exp)).output_dir


def test_a_trained_run_saves_the_threshold_and_reports_detection_metrics(msp_run):
    label_map = json.loads((msp_run / "label_map.json").read_text())
    det = label_map["oos_detector"]
    assert det["detector"] == "msp" and det["rule"] == "max_sum" and det["oos_label"] == "oos"
    assert det["chosen_on"]["num_examples"] == 4 * 6 + 5  # the validation split, never test
    metrics = json.loads((msp_run / "all_results.json").read_text())
    for key in ("in_scope_accuracy", "oos_recall", "oos_precision", "oos_f1", "oos_auroc",
                "oos_fpr_at_95_in_scope_recall", "argmax_in_scope_accuracy", "oos_threshold"):  # fmt: skip
        assert f"test_{key}" in metrics, key
    assert metrics["test_oos_threshold"] == det["threshold"]
    assert (msp_run / "test_oos_tradeoff.png").is_file() and (msp_run / "validation_oos_tradeoff.png").is_file()


def _with_threshold(run_dir, threshold: float):
    path = run_dir / "label_map.json"
    info = json.loads(path.read_text())
    info["oos_detector"]["threshold"] = threshold
    path.write_text(json.dumps(info))


def test_predict_eval_and_export_honour_the_threshold(msp_run, oos_data, tmp_path):
    import shutil

    from querytune.inference import LoadedRun
    from querytune.serving.export import export_run

    run = tmp_path / "run"
    shutil.copytree(msp_run, run)
    texts = ["where is my order 12", "tell me a joke"]
    _with_threshold(run, 2.0)  # msp <= 1: every query is rejected
    out = LoadedRun(run).predict(texts)
    assert all(r["label"] == "oos" and r["oos"] and r["score"] == r["in_scope_score"] for r in out)
    metrics = LoadedRun(run).task.evaluate(LoadedRun(run), "test", tmp_path)
    assert metrics["oos_recall"] == 1.0 and metrics["in_scope_accuracy"] == 0.0
    export = export_run(run, fmt="onnx", output_dir=tmp_path / "onnx")
    assert all(r["label"] == "oos" for r in LoadedRun(export["export_dir"]).predict(texts))
    _with_threshold(run, -1.0)  # nothing is rejected: the best in-scope intent answers, never the OOS class
    out = LoadedRun(run).predict(texts)
    assert all(r["label"] != "oos" and not r["oos"] for r in out)


def test_a_corpus_without_oos_examples_trains_a_detector(tmp_path, tiny_bert, tiny_data):
    from querytune.config import load_config
    from querytune.inference import LoadedRun
    from querytune.train import run

    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, oos_label="none_of_these", oos_detector="energy",
                          oos_in_scope_recall=0.75, max_steps=10)  # fmt: skip
    result = run(load_config(exp))
    det = json.loads((result.output_dir / "label_map.json").read_text())["oos_detector"]
    assert det["rule"] == "in_scope_recall" and det["oos_id"] is None
    assert det["chosen_on"]["in_scope_acceptance"] == pytest.approx(0.75, abs=1 / 16)
    answers = LoadedRun(result.output_dir).predict([r["text"] for r in make_rows(8, 3)])
    assert {r["label"] for r in answers} >= {"none_of_these"}  # about a quarter are rejected


def test_detector_options_are_checked(tmp_path, tiny_bert, tiny_data):
    from querytune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="oos_detector 'msp' needs oos_label"):
        load_config(tiny_experiment(tmp_path, tiny_bert, tiny_data, oos_detector="msp"))
    with pytest.raises(ConfigError, match="oos_threshold_rule must be one of"):
        load_config(tiny_experiment(tmp_path, tiny_bert, tiny_data, oos_label="oos", oos_detector="msp",
                                    oos_threshold_rule="best"))  # fmt: skip


def test_the_server_honours_the_threshold(msp_run, tmp_path):
    """The served run answers with the detector of its label map, in both directions: a threshold above every MSP
    rejects every query, one below every MSP rejects none (the argmax answer stands); the server stops cleanly."""
    import shutil

    import httpx

    from querytune.inference import LoadedRun

    from .test_serve import start_server, stop_server

    queries = ["where is my order 12", "cheap shoes for kids"]
    argmax = [r["top_k"][0]["label"] for r in LoadedRun(msp_run).predict(queries)]
    for threshold, rejected in ((2.0, True), (-1.0, False)):  # MSP lies in [0, 1]
        run = tmp_path / f"run-{threshold}"
        shutil.copytree(msp_run, run)
        _with_threshold(run, threshold)
        proc, url = start_server([f"run={run}"], tmp_path / f"serve-{threshold}.log")
        try:
            body = httpx.post(f"{url}/predict", json={"queries": queries}, timeout=30).json()
        finally:
            assert stop_server(proc) == 0, (tmp_path / f"serve-{threshold}.log").read_text()[-2000:]
        answers = [r["predictions"]["run"] for r in body["results"]]
        if rejected:
            assert all(a["label"] == "oos" and a["oos"] is True for a in answers)
        else:
            assert [a["label"] for a in answers] == argmax and not any(a["oos"] for a in answers)
