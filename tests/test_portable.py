"""Runs load anywhere: a run saved by querytune loads with plain PEFT / transformers in a fresh process that never
imports querytune, with the same logits and label names as querytune's own loader.

The tiny models are put in a temporary Hugging Face cache under Hub ids (`querytune-tests/tiny-bert`, ...), as a
download would have left them, so that `base_model_name_or_path` in adapter_config.json is a Hub id and plain PEFT
resolves it with HF_HUB_OFFLINE=1, exactly as on a teammate's machine after `hf download`. Training and the
querytune side run in one subprocess (the cache location is read when huggingface_hub is imported). Each run is then
"pushed" into that cache under its own Hub id: the files `querytune push` uploads and the card it writes for that id.
The plain side, in another process, reads each card from the cache and runs its snippet, which loads by the Hub id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from querytune.hub import model_card, upload_files, usage_section
from querytune.runs import read_run
from querytune.tasks import get_task

from .conftest import COLUMNS, tiny_experiment
from .test_rewrite import conv_data, tiny_gen_models  # noqa: F401  (fixtures)

INTENT_TEXTS = ["where is my order 5", "cheap shoes for kids", "return my lamp", "store near 12"]
SLOT_TEXTS = ["cheap wool socks for kids", "track my order"]
PAIRS = (["red shoes", "red shoes"], ["red shoes size 10", "lamp for kids"])
REWRITE_TEXTS = ["what is throat cancer ?", "is it treatable ?"]
PEFT_METHODS = ("lora", "adalora", "ia3", "prefix", "prompt")


def hub_cache(root: Path, repos: dict[str, Path]) -> Path:
    """An HF_HOME whose hub cache holds each folder as the `main` snapshot of a Hub id (the layout a download
    leaves: refs/main names the commit, snapshots/<commit>/ holds the files)."""
    for repo_id, folder in repos.items():
        repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(folder, repo / "snapshots" / commit, dirs_exist_ok=True)
    return root


def env_for(hf_home: Path, with_querytune: bool) -> dict[str, str]:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled"}  # fmt: skip
    env.pop("HF_HUB_CACHE", None)
    if not with_querytune:
        env.pop("PYTHONPATH", None)  # and the process asserts that it never imported querytune
    return env


# Trains every run, then records what querytune's loader computes on the same inputs the plain side will use.
TRAIN = textwrap.dedent("""
    import json, sys
    import torch
    from querytune.config import load_config
    from querytune.inference import LoadedRun
    from querytune.train import run

    jobs, results = json.loads(open(sys.argv[1]).read()), {}
    for name, job in jobs.items():
        out = run(load_config(job["experiment"])).output_dir
        loaded = LoadedRun(out, merge=False)
        enc = loaded.tokenizer(job["texts"], job["pairs"], padding=True, return_tensors="pt")
        if loaded.model.config.is_encoder_decoder:  # one decoder step from the start token scores the first token
            enc["decoder_input_ids"] = torch.full((len(job["texts"]), 1), loaded.model.config.decoder_start_token_id)
        with torch.inference_mode():
            output = loaded.model(**enc)
        logits = output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state
        results[name] = {"run": str(out), "logits": logits.tolist(), "labels": loaded.task.labels}
        if job["predict"]:  # what `querytune predict --no_merge` answers (the same arithmetic as plain PEFT)
            results[name]["predict"] = [r["label"] for r in loaded.predict(job["texts"])]
    json.dump(results, open(sys.argv[2], "w"))
""")

# Runs each card's first Python block (the load snippet) and scores the same inputs.
LOAD = textwrap.dedent("""
    import json, re, sys
    import torch
    from huggingface_hub import hf_hub_download

    jobs, results = json.loads(open(sys.argv[1]).read()), {}
    for name, job in jobs.items():
        card = open(hf_hub_download(job["run"], "README.md")).read()  # the pushed card, as a teammate sees it
        snippet = re.search(r"```python\\n(.*?)```", card, re.S).group(1)
        scope = {}
        exec(snippet, scope)
        model, tokenizer = scope["model"], scope["tokenizer"]
        model.eval()
        enc = tokenizer(job["texts"], job["pairs"], padding=True, return_tensors="pt")
        if model.config.is_encoder_decoder:
            enc["decoder_input_ids"] = torch.full((len(job["texts"]), 1), model.config.decoder_start_token_id)
        with torch.inference_mode():
            output = model(**enc)
        logits = output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state
        config = (model.get_base_model() if hasattr(model, "peft_config") else model).config
        results[name] = {"logits": logits.tolist(), "id2label": {int(k): v for k, v in config.id2label.items()},
                         "snippet": snippet}
        if job["pipeline"]:
            from transformers import pipeline

            results[name]["pipeline"] = [r["label"] for r in pipeline("text-classification", model=job["run"])(
                job["texts"])]
    results["querytune imported"] = any(m.split(".")[0] == "querytune" for m in sys.modules)
    json.dump(results, open(sys.argv[2], "w"))
""")


def _run_script(script: str, jobs: dict, tmp_path: Path, name: str, env: dict) -> dict:
    (tmp_path / f"{name}.py").write_text(script)
    (tmp_path / f"{name}-jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(tmp_path / f"{name}.py"), str(tmp_path / f"{name}-jobs.json"),
                           str(tmp_path / f"{name}-out.json")], env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((tmp_path / f"{name}-out.json").read_text())


@pytest.fixture(scope="module")
def portable(tmp_path_factory, tiny_models, tiny_data, slot_bert, slot_data, ranking_bert, ranking_data,  # noqa: F811
             tiny_gen_models, conv_data):  # noqa: F811  # fmt: skip
    """Every run trained from Hub ids, querytune's outputs for it, and the plain load of its card's snippet."""
    tmp = tmp_path_factory.mktemp("portable")
    hf_home = hub_cache(tmp / "hf_home", {"querytune-tests/tiny-bert": tiny_models["bert"],
                                          "querytune-tests/slot-bert": slot_bert,
                                          "querytune-tests/ranking-bert": ranking_bert,
                                          "querytune-tests/tiny-llama": tiny_gen_models["llama"],
                                          "querytune-tests/tiny-t5": tiny_gen_models["t5"]})  # fmt: skip
    jobs: dict[str, dict] = {}

    def add(name, texts, pairs=None, predict=False, model="querytune-tests/tiny-bert", data=tiny_data, **keys):
        (tmp / name).mkdir()
        exp = tiny_experiment(tmp / name, model, data, **keys)  # the model by its Hub id, found in the cache
        jobs[name] = {"experiment": str(exp), "texts": texts, "pairs": pairs, "predict": predict}

    for method in (*PEFT_METHODS, "full", "adapter"):
        add(f"intent-{method}", INTENT_TEXTS, predict=True, method=method)
    add("slots-lora", SLOT_TEXTS, model="querytune-tests/slot-bert", data=slot_data, task="slots",
        label_column="intent", method="lora")  # fmt: skip
    ranking = {**COLUMNS, "validation_split_percentage": 25.0, "ranking_test_percentage": 25.0,
               "catalogue_cache_dir": str(tmp / "cache"), "retrieval_top_k": 20}  # fmt: skip
    add("rerank-lora", PAIRS[0], list(PAIRS[1]), model="querytune-tests/ranking-bert", data=ranking_data,
        task="rerank", method="lora", **ranking)  # fmt: skip
    add("retrieval-lora", PAIRS[1], model="querytune-tests/ranking-bert", data=ranking_data, task="retrieval",
        method="lora", **ranking)  # fmt: skip
    rewrite = {"task": "rewrite", "method": "lora", "max_seq_length": 48, "rewrite_group_column": "conv",
               "rewrite_max_new_tokens": 6, "per_device_train_batch_size": 4,
               "per_device_eval_batch_size": 8}  # fmt: skip
    add("rewrite-lora", REWRITE_TEXTS, model="querytune-tests/tiny-llama", data=conv_data, **rewrite)
    add("rewrite-t5-lora", REWRITE_TEXTS, model="querytune-tests/tiny-t5", data=conv_data, **rewrite)

    trained = _run_script(TRAIN, jobs, tmp, "train", env_for(hf_home, with_querytune=True))
    pushed = {}
    for name, result in trained.items():  # what `querytune push RUN --repo-id ID` uploads, put where a download goes
        run, repo_id, folder = Path(result["run"]), f"querytune-tests/pushed-{name}", tmp / "pushed" / name
        folder.mkdir(parents=True)
        for path in upload_files(run):
            shutil.copy2(path, folder / path.name)
        model_card(run, read_run(run), repo_id).save(folder / "README.md")
        pushed[repo_id] = folder
        result["repo_id"] = repo_id
    hub_cache(hf_home, pushed)
    plain_jobs = {name: {"run": r["repo_id"], "texts": jobs[name]["texts"], "pairs": jobs[name]["pairs"],
                         "pipeline": name == "intent-full"}
                  for name, r in trained.items() if name != "intent-adapter"}  # fmt: skip
    plain = _run_script(LOAD, plain_jobs, tmp, "plain", env_for(hf_home, with_querytune=False))
    adapter = {"intent-adapter": {"run": trained["intent-adapter"]["repo_id"], "texts": INTENT_TEXTS, "pairs": None,
                                  "pipeline": False}}  # fmt: skip
    # a bottleneck adapter needs querytune's registration: its card's two lines, then plain PEFT
    with_registration = _run_script(LOAD, adapter, tmp, "adapter", env_for(hf_home, with_querytune=True))
    plain["intent-adapter"] = with_registration["intent-adapter"]
    return trained, plain


def tmp_root(trained: dict) -> Path:
    """The folder every run of the fixture was trained in (a path of the "training machine")."""
    return Path(trained["intent-lora"]["run"]).parents[1]


RUNS = [*(f"intent-{m}" for m in (*PEFT_METHODS, "full", "adapter")), "slots-lora", "rerank-lora", "retrieval-lora",
        "rewrite-lora", "rewrite-t5-lora"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_plain_peft_load_gives_querytunes_logits_and_labels(portable, name):
    trained, plain = portable
    assert plain["querytune imported"] is False, "the plain side never imported querytune"
    ours, theirs = np.asarray(trained[name]["logits"]), np.asarray(plain[name]["logits"])
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
    id2label = {int(k): v for k, v in plain[name]["id2label"].items()}  # JSON made the keys strings
    if name.startswith(("intent-", "slots-")):
        assert id2label == dict(enumerate(trained[name]["labels"])), "config.json carries the run's label names"
    if "predict" in trained[name]:  # the label `querytune predict` prints is the plain model's argmax
        assert [id2label[int(i)] for i in theirs.argmax(-1)] == trained[name]["predict"]


@pytest.mark.slow
def test_full_fine_tune_works_with_transformers_pipeline(portable):
    trained, plain = portable
    assert plain["intent-full"]["pipeline"] == trained["intent-full"]["predict"]


@pytest.mark.slow
def test_adapter_config_names_the_hub_id_and_the_card_fits_the_task(portable):
    trained, plain = portable
    for name in RUNS:
        run = Path(trained[name]["run"])
        card = (run / "README.md").read_text()
        meta = yaml.safe_load(card.split("---")[1])
        info = json.loads((run / "querytune_run.json").read_text())
        task = get_task(info["task"])
        label_info = json.loads((run / "label_map.json").read_text())
        assert meta["pipeline_tag"] == task.card_info(label_info)[0]
        assert set(task.card_info(label_info)[1]) <= set(meta["tags"]) and info["method"] in meta["tags"]
        if info["peft"]:
            base = json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"]
            assert base.startswith("querytune-tests/"), "a Hub id, not a path of the training machine"
            assert (run / "config.json").is_file()
    one_per_task = ("intent-lora", "slots-lora", "rerank-lora", "retrieval-lora", "rewrite-lora", "rewrite-t5-lora")
    assert [yaml.safe_load((Path(trained[n]["run"]) / "README.md").read_text().split("---")[1])["pipeline_tag"]
            for n in one_per_task] == ["text-classification", "token-classification", "text-ranking",
                                       "sentence-similarity", "text-generation", "text2text-generation"]  # fmt: skip
    for name in RUNS:  # the pushed card's snippet loads by the Hub id it was pushed to, not by a local path
        assert f'.from_pretrained("{trained[name]["repo_id"]}"' in plain[name]["snippet"]
        assert str(tmp_root(trained)) not in plain[name]["snippet"]
    adapter_snippet = plain["intent-adapter"]["snippet"]
    assert adapter_snippet.splitlines()[:2] == ["import querytune.methods", "querytune.methods.register_bottleneck()"]
    assert not re.search(r"^\s*(import|from) querytune", plain["intent-lora"]["snippet"], re.M), "plain PEFT only"


@pytest.mark.slow
def test_a_pushed_retrieval_run_searches_its_catalogue_from_the_hub_cache(portable, tmp_path):
    """The pushed retrieval run, as `hf download` leaves it, in another process and folder: it loads through querytune
    and searches the catalogue it carries (`catalogue.jsonl`), whatever its training data."""
    trained, _ = portable
    hf_home = tmp_root(trained) / "hf_home"
    code = textwrap.dedent("""
        import json, sys
        from huggingface_hub import snapshot_download
        from querytune.inference import LoadedRun
        folder = snapshot_download(sys.argv[1])
        run = LoadedRun(folder)
        ids = {json.loads(line)["id"] for line in open(f"{folder}/catalogue.jsonl")}
        hits = run.task.search(run, ["red shoes"], top_k=3)[0]["hits"]
        print(json.dumps({"hits": [h["id"] for h in hits], "in_catalogue": all(h["id"] in ids for h in hits)}))
    """)  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, trained["retrieval-lora"]["repo_id"]], cwd=tmp_path,
                          env=env_for(hf_home, with_querytune=True), capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(found["hits"]) == 3 and found["in_catalogue"]


def test_minilm_short_name_is_recorded_as_its_hub_id():
    from querytune.hub import hub_model_id

    assert hub_model_id("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_model_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id("querytune-tests/tiny-bert") == "querytune-tests/tiny-bert"


def test_card_of_a_model_class_of_querytunes_own_says_so():
    info = {"task": "intent_slots", "method": "lora", "peft": True, "base_model": "all-MiniLM-L6-v2"}
    text = usage_section(get_task("intent_slots"), {"labels": ["O"], "intents": ["a"]}, info, "acme/x")
    assert "querytune's own" in text and "```" not in text
    assert re.search(r"AutoPeftModelForTokenClassification", usage_section(
        get_task("slots"), {"labels": ["O"]}, info | {"task": "slots"}, "acme/x"))  # fmt: skip
