"""The low-data path: per-label sampling, every augmenter (labels kept, slot tags aligned), the guards (duplicates,
held-out copies, the consistency filter), the cache and a killed run, the offline error, the schedule floor, and
augmentation chosen from the command line and by a sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

from querytune.augment import register_augmenter, unregister_augmenter
from querytune.augment.base import AugmentContext, Augmenter, Example, retag, spans
from querytune.augment.pipeline import DROPPED_FILE, KEPT_FILE, augment_train
from querytune.config import ConfigError, load_config
from querytune.inference import LoadedRun
from querytune.runs import MARKER, read_run
from querytune.tasks import get_task
from querytune.train import run

from .conftest import (
    INTENTS,
    PRODUCTS,
    REPO,
    SLOT_WORDS,
    build_tiny_checkpoint,
    make_rows,
    make_slot_rows,
    tiny_experiment,
    write_jsonl,
)


def loaded(exp: Path, *overrides: str):
    """The task of an experiment and its loaded splits, as `train.run` has them before augmentation."""
    config = load_config(exp, list(overrides))
    task = get_task(config.data.task)(config)
    return config, task, task.load_data()


def is_bio(tags: list[str]) -> bool:
    return all(t == "O" or (t[:2] in ("B-", "I-") and t[2:]) for t in tags) and not (tags and tags[0].startswith("I-"))


# --- per-label sampling
def test_per_label_sampling_is_seeded_nested_and_leaves_eval_alone(tmp_path, tiny_bert, tiny_data):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data)
    _, task, full = loaded(exp)
    _, _, five = loaded(exp, "--max_train_samples_per_label", "5")
    _, _, three = loaded(exp, "--max_train_samples_per_label", "3")
    _, _, again = loaded(exp, "--max_train_samples_per_label", "5")
    _, _, other = loaded(exp, "--max_train_samples_per_label", "5", "--seed", "1")
    counts = Counter(task.labels[i] for i in five["train"]["labels"])
    assert counts == dict.fromkeys(INTENTS, 5), "every label, 5 rows each (all have 16)"
    assert five["train"]["text"] == again["train"]["text"], "seeded"
    assert five["train"]["text"] != other["train"]["text"], "another seed, another sample"
    assert set(three["train"]["text"]) <= set(five["train"]["text"]), "the 3-sample is inside the 5-sample"
    for role in ("validation", "test"):
        assert five[role]["text"] == full[role]["text"], f"{role} is never sampled by it"


def test_per_label_sampling_keeps_rare_labels_that_a_row_sample_loses(tmp_path, tiny_bert):
    rows = make_rows(30, 0)
    rare = [{"text": f"gift card {i}", "intent": "gift_card"} for i in range(2)]
    data = tmp_path / "skewed"
    write_jsonl(data / "train.jsonl", rows + rare)
    write_jsonl(data / "validation.jsonl", make_rows(2, 1))
    exp = tiny_experiment(tmp_path, tiny_bert, data, test_split=None)
    _, task, splits = loaded(exp, "--max_train_samples_per_label", "4")
    counts = Counter(task.labels[i] for i in splits["train"]["labels"])
    assert counts["gift_card"] == 2 and all(counts[i] == 4 for i in INTENTS)


def test_slot_corpus_samples_per_intent(tmp_path, slot_bert, slot_data):
    exp = tiny_experiment(tmp_path, slot_bert, slot_data, task="slots", label_column="intent")
    _, task, splits = loaded(exp, "--max_train_samples_per_label", "3")
    assert Counter(splits["train"]["intent"]) == {"product_search": 3, "order_status": 3}
    joint = tiny_experiment(tmp_path, slot_bert, slot_data, task="intent_slots", label_column="intent")
    _, task, splits = loaded(joint, "--max_train_samples_per_label", "3")
    assert Counter(task.intents[i] for i in splits["train"]["intent_labels"]) == {
        "product_search": 3,
        "order_status": 3,
    }
    # a slot corpus without an intent column: N rows
    rows = [{k: v for k, v in r.items() if k != "intent"} for r in make_slot_rows(20, 0)]
    plain = tmp_path / "plain"
    write_jsonl(plain / "train.jsonl", rows)
    write_jsonl(plain / "validation.jsonl", rows[:4])
    exp = tiny_experiment(tmp_path, slot_bert, plain, task="slots", test_split=None)
    _, _, splits = loaded(exp, "--max_train_samples_per_label", "7")
    assert len(splits["train"]) == 7


# --- augmenters
def examples_of(exp: Path, *overrides: str):
    config, task, splits = loaded(exp, *overrides)
    return config, task, task.augment_examples(splits["train"])


def make(name: str, config, train: list[Example], **options):
    from querytune.augment import get_augmenter

    cls = get_augmenter(name)
    opts = cls.options(**options)
    aug = cls(opts, AugmentContext(config.model.model_name_or_path, train, 8, 0, train[0].tags is not None))
    aug.prepare()
    return aug


def candidates(aug, train: list[Example], k: int = 3) -> list[tuple[Example, Example]]:
    items = [(ex, j) for ex in train for j in range(k)]
    made = aug.generate([ex for ex, _ in items], [j for _, j in items], 0)
    return [(ex, m) for (ex, _), m in zip(items, made, strict=True) if m is not None]


def test_eda_keeps_labels_changes_rows_and_is_seeded_per_row(tmp_path, tiny_bert, tiny_data):
    config, _, train = examples_of(tiny_experiment(tmp_path, tiny_bert, tiny_data))
    aug = make("eda", config, train)
    pairs = candidates(aug, train)
    assert len(pairs) > 0.9 * 3 * len(train)
    assert all(m.label == ex.label and m.source == ex.source and m.augmenter == "eda" for ex, m in pairs)
    assert sum(m.words != ex.words for ex, m in pairs) == len(pairs), "every candidate differs from its source"
    # a row's candidate depends on the row, not on the batch it came in
    in_batch = aug.generate(train, [1] * len(train), 0)[5]
    assert aug.generate([train[5]], [1], 0)[0].words == in_batch.words


def test_eda_operations_each_do_what_they_say(tmp_path, tiny_bert, tiny_data):
    config, _, train = examples_of(tiny_experiment(tmp_path, tiny_bert, tiny_data))
    vocab = {w for ex in train for w in ex.words}
    for op in ("swap", "delete", "insert"):
        aug = make("eda", config, train, eda_operations=[op], eda_alpha=0.2)
        for ex, m in candidates(aug, train, 1):
            if op == "swap":
                assert sorted(m.words) == sorted(ex.words) and m.words != ex.words
            elif op == "delete":
                assert len(m.words) < len(ex.words) and all(w in ex.words for w in m.words)
            else:
                assert len(m.words) == len(ex.words) + 1 and set(m.words) <= vocab, "inserts train-corpus words"


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory) -> Path:
    """A tiny random BERT with its masked-LM head, and a tokenizer knowing the slot corpus's words."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder = build_tiny_checkpoint("bert", tmp_path_factory.mktemp("mlm") / "bert", extra_words=SLOT_WORDS)
    model = AutoModelForMaskedLM.from_config(__import__("transformers").AutoConfig.from_pretrained(folder))
    model.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).mask_token == "[MASK]"
    return folder


@pytest.mark.parametrize("name", ["eda", "mlm"])
def test_word_editors_touch_only_o_words_on_slot_corpora(tmp_path, slot_bert, slot_data, tiny_mlm, name):
    config, _, train = examples_of(tiny_experiment(tmp_path, slot_bert, slot_data, task="intent_slots",
                                                   label_column="intent"))  # fmt: skip
    options = {"mlm_model": str(tiny_mlm), "mlm_p": 0.5} if name == "mlm" else {"eda_alpha": 0.3}
    if name == "eda":  # the synonym source must know the corpus's words
        options["eda_synonym_model"] = str(tiny_mlm)
    pairs = candidates(make(name, config, train, **options), train)
    assert len(pairs) > len(train), f"{name} made rows"
    for ex, m in pairs:
        assert len(m.tags) == len(m.words) and is_bio(m.tags)
        assert spans(m.words, m.tags) == spans(ex.words, ex.tags), "slot values and types untouched"
        assert m.words != ex.words and m.label == ex.label


def test_slot_swap_replaces_values_with_train_values_of_the_same_type(tmp_path, slot_bert, slot_data):
    config, _, train = examples_of(tiny_experiment(tmp_path, slot_bert, slot_data, task="intent_slots",
                                                   label_column="intent"))  # fmt: skip
    values = {(ex.label, kind, tuple(words)) for ex in train for kind, words in spans(ex.words, ex.tags)}
    pairs = candidates(make("slot_swap", config, train), train)
    assert len(pairs) > 2 * len(train)
    for ex, m in pairs:
        assert len(m.tags) == len(m.words) and is_bio(m.tags)
        new, old = spans(m.words, m.tags), spans(ex.words, ex.tags)
        assert [k for k, _ in new] == [k for k, _ in old], "same slot types in the same order"
        assert new != old, "at least one value replaced"
        assert all((ex.label, kind, tuple(w)) in values for kind, w in new), "values of that type and intent"
        outside = [w for w, t in zip(m.words, m.tags, strict=True) if t == "O"]
        assert outside == [w for w, t in zip(ex.words, ex.tags, strict=True) if t == "O"]


def test_slot_swap_needs_a_slot_corpus(tmp_path, tiny_bert, tiny_data):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, augment=["slot_swap"])
    with pytest.raises(ConfigError, match="slot_swap.*needs a slot corpus"):
        run(load_config(exp))


def test_a_rewrite_of_a_slot_query_is_kept_only_with_every_value():
    source = Example("play adele on spotify".split(), "PlayMusic", ["O", "B-artist", "O", "B-service"])
    assert retag(source, "please put on Adele using spotify".split()) == ["O", "O", "O", "B-artist", "O", "B-service"]
    assert retag(source, "play some music on spotify".split()) is None, "the artist is gone"
    assert retag(source, "on spotify play adele".split()) is None, "values out of order"
    two = Example("fly from new york to rome".split(), "", ["O", "O", "B-from", "I-from", "O", "B-to"])
    assert retag(two, "a flight to rome from new york".split()) is None
    assert retag(two, "flights from new york into rome".split()) == ["O", "O", "B-from", "I-from", "O", "B-to"]


# --- model-based rewriters on tiny random models
def _save_tokenizer(folder: Path, words: tuple[str, ...]):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    return tok


WORDS = tuple({w for ts in INTENTS.values() for t in ts for w in t.replace("{p}", "").replace("{n}", "").split()}
              | set(PRODUCTS) | {str(i) for i in range(100)} | {"rewrite", "query", ":"})  # fmt: skip


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny random Marian translation models (forward and backward)."""
    from transformers import MarianConfig, MarianMTModel

    out = []
    for i, name in enumerate(("en-xx", "xx-en")):
        folder = tmp_path_factory.mktemp("marian") / name
        tok = _save_tokenizer(folder, WORDS)
        config = MarianConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                              decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0,
                              decoder_start_token_id=0, eos_token_id=3, forced_eos_token_id=3)  # fmt: skip
        torch.manual_seed(i)
        model = MarianMTModel(config)
        model.save_pretrained(folder)
        out.append(folder)
    return out[0], out[1]


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama") / "llama"
    tok = _save_tokenizer(folder, WORDS)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # random weights never end a line: end every output at its length limit, as a real model ends its line
    model.generation_config.forced_eos_token_id = 3
    model.save_pretrained(folder)
    return folder


def test_backtranslate_and_paraphrase_run_on_tiny_random_models(tmp_path, tiny_bert, tiny_data, tiny_marian,
                                                                 tiny_causal_lm):  # fmt: skip
    config, _, train = examples_of(tiny_experiment(tmp_path, tiny_bert, tiny_data))
    train = train[:12]
    back = make("backtranslate", config, train, backtranslate_models=[str(p) for p in tiny_marian])
    para = make("paraphrase", config, train, paraphrase_model=str(tiny_causal_lm), paraphrase_max_new_tokens=6)
    for aug in (back, para):
        pairs = candidates(aug, train, 2)
        assert pairs, f"{aug.name}: random weights still produce some new wordings"
        for ex, m in pairs:
            assert m.label == ex.label and m.augmenter == aug.name and m.words and m.text.lower() != ex.text.lower()
        again = candidates(aug, train, 2)
        assert [m.words for _, m in again] == [m.words for _, m in pairs], "seeded: the same batch, the same rows"


def test_backtranslate_without_a_reachable_model_stops_before_training(tmp_path, tiny_bert, tiny_data):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, augment=["backtranslate"])
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's querytune, installed or not
    env = {"HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "PYTHONPATH": src}
    proc = subprocess.run([sys.executable, "-m", "querytune", "train", str(exp)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("querytune: error")]
    assert len(errors) == 1 and "Helsinki-NLP/opus-mt-en-de" in errors[0] and "Traceback" not in proc.stderr
    out = tmp_path / "run"
    assert not (out / MARKER).exists() and not list(out.glob("checkpoint-*")), "no finished marker, nothing trained"


# --- the pipeline: guards, filter, cache
class Scripted(Augmenter):
    """An augmenter whose outputs are given by the test: text -> list of new texts; counts what it generated."""

    name = "scripted"
    options = None
    uses_model = True  # batched by augment_batch_size
    outputs: ClassVar[dict[str, list[str]]] = {}
    calls: ClassVar[list[int]] = []
    fail_after: ClassVar[int | None] = None

    def identity(self):
        return {"name": self.name, "outputs": self.outputs}

    def generate(self, examples, k, seed):
        if Scripted.fail_after is not None and len(Scripted.calls) >= Scripted.fail_after:
            raise KeyboardInterrupt("killed")
        Scripted.calls.append(len(examples))
        made = []
        for ex, j in zip(examples, k, strict=True):
            texts = self.outputs.get(ex.text, [])
            made.append(ex.derived(texts[j].split(), None, self.name) if j < len(texts) else None)
        return made


@pytest.fixture
def scripted():
    register_augmenter("scripted", Scripted)
    Scripted.outputs, Scripted.calls, Scripted.fail_after = {}, [], None
    yield Scripted
    unregister_augmenter("scripted")


def test_duplicates_and_held_out_copies_are_dropped_and_counted(tmp_path, tiny_bert, tiny_data, scripted):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, augment=["scripted"], augment_per_example=2,
                          augment_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    config, task, splits = loaded(exp)
    train, test = splits["train"]["text"], splits["test"]["text"]
    first, second = train[0], train[1]
    novel = "a query nobody wrote"
    scripted.outputs = {first: [test[0].upper(), second], second: [novel, "  A query  NOBODY wrote "]}
    out = tmp_path / "out"
    out.mkdir()
    augmented, counts = augment_train(task, splits, config, out)
    assert counts["augment_generated"] == 4
    assert counts["augment_dropped_heldout"] == 1, "a copy of a test query never reaches train"
    assert counts["augment_dropped_duplicate"] == 3, "the held-out copy, a train query, a repeat"
    assert counts["augment_kept"] == 1 and augmented["train"]["text"][-1] == novel
    assert len(augmented["train"]) == len(train) + 1 and augmented["test"]["text"] == test
    kept = [json.loads(line) for line in (out / KEPT_FILE).read_text().splitlines()]
    assert kept == [{"text": novel, "label": task.labels[splits["train"]["labels"][1]], "augmenter": "scripted",
                     "source_row": 1, "source_text": second}]  # fmt: skip
    reasons = [json.loads(line)["dropped"] for line in (out / DROPPED_FILE).read_text().splitlines()]
    assert sorted(reasons) == ["duplicate", "duplicate", "heldout"]


def test_min_per_label_brings_every_label_up(tmp_path, tiny_bert, tiny_data, scripted):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, augment=["eda"], augment_min_per_label=7,
                          max_train_samples_per_label=3, augment_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    config, task, splits = loaded(exp)
    augmented, counts = augment_train(task, splits, config, None)
    per_label = Counter(task.labels[i] for i in augmented["train"]["labels"])
    assert counts["augment_requested"] == 4 * 4
    assert all(6 <= per_label[label] <= 7 for label in INTENTS), per_label  # 7, less what the guards dropped
    assert sum(per_label.values()) == 12 + counts["augment_kept"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert, tiny_data):
    tmp = tmp_path_factory.mktemp("filter_run")
    exp = tiny_experiment(tmp, tiny_bert, tiny_data, max_steps=6, learning_rate=0.05)
    run(load_config(exp))
    return tmp / "run"


def test_the_filter_keeps_exactly_the_rows_its_run_agrees_with(tmp_path, tiny_bert, tiny_data, finished_run):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, augment=["eda"], augment_per_example=3,
                          augment_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    config, task, splits = loaded(exp)
    unfiltered, counts = augment_train(task, splits, config, None)
    new = unfiltered["train"].select(range(len(splits["train"]), len(unfiltered["train"])))
    predicted = [r["label"] for r in LoadedRun(finished_run).predict(new["text"], top_k=1)]
    agree = [p == task.labels[i] for p, i in zip(predicted, new["labels"], strict=True)]
    assert 0 < sum(agree) < len(agree), "the test needs a run that agrees with some rows and not others"

    config, task, splits = loaded(exp, "--augment_filter_run", str(finished_run))
    filtered, fcounts = augment_train(task, splits, config, None)
    expected = [t for t, ok in zip(new["text"], agree, strict=True) if ok]
    assert filtered["train"]["text"][len(splits["train"]) :] == expected
    assert fcounts["augment_dropped_filter"] == len(agree) - sum(agree) and fcounts["augment_kept"] == sum(agree)


def test_generation_is_cached_and_a_killed_run_resumes_where_it_stopped(tmp_path, tiny_bert, tiny_data, scripted):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, augment=["scripted"], augment_cache_dir=str(tmp_path / "c"))
    config, task, splits = loaded(exp)
    scripted.outputs = {t: [f"{t} please"] for t in splits["train"]["text"]}
    # 64 rows in batches of 512 is one batch: make the batches small so that the kill falls between them
    from querytune.augment import pipeline

    original = pipeline.run_augmenter

    def small_batches(aug, items, seed, cache_dir, stats=None):
        aug.context.batch_size = 16
        return original(aug, items, seed, cache_dir, stats)

    pipeline.run_augmenter = small_batches
    try:
        scripted.fail_after = 2
        with pytest.raises(KeyboardInterrupt):
            augment_train(task, splits, config, None)
        assert scripted.calls == [16, 16]
        scripted.fail_after = None
        _, counts = augment_train(task, splits, config, None)
        distinct = len(set(zip(splits["train"]["text"], splits["train"]["labels"], strict=True)))  # one entry a row
        assert sum(scripted.calls[2:]) == distinct - 32, "only what the kill left is generated"
        calls = list(scripted.calls)
        augment_train(task, splits, config, None)
        assert scripted.calls == calls, "a rerun generates nothing"
    finally:
        pipeline.run_augmenter = original
    assert counts["augment_generated"] == 64


# --- a training run
def test_an_augmented_run_records_what_it_trained_on(tmp_path, tiny_bert, tiny_data):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, augment=["eda"], augment_per_example=2,
                          max_train_samples_per_label=4, augment_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    result = run(load_config(exp))
    out = result.output_dir
    metrics = json.loads((out / "all_results.json").read_text())
    kept = (out / KEPT_FILE).read_text().splitlines()
    assert metrics["train_rows_original"] == 16 and metrics["augment_kept"] == len(kept) > 16
    assert metrics["train_rows"] == 16 + len(kept)
    assert metrics["augment_generated"] == metrics["augment_kept"] + metrics["augment_dropped_duplicate"]
    card = (out / "README.md").read_text()
    assert "## Training data" in card and f"{len(kept)} kept" in card and "At most 4 train rows per label" in card
    saved = yaml.safe_load((out / "querytune_config.yaml").read_text())
    assert saved["augment"] == ["eda"] and saved["augment_per_example"] == 2
    assert read_run(out)["training_data"]["augment"] == ["eda"]
    assert load_config(out / "querytune_config.yaml").augment.augment == ["eda"], "the saved config re-runs"


def test_min_train_steps_raises_the_epochs_of_a_small_set(tmp_path, tiny_bert, tiny_data):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, max_steps=-1, num_train_epochs=1, min_train_steps=20,
                          max_train_samples_per_label=4)  # fmt: skip
    result = run(load_config(exp))  # 16 rows at batch 8: 2 steps an epoch
    assert result.trainer.state.global_step == 20
    metrics = json.loads((result.output_dir / "all_results.json").read_text())
    assert metrics["schedule_epochs"] == 10 and metrics["schedule_steps"] == 20
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, max_steps=-1, num_train_epochs=3, min_train_steps=2,
                          output_dir=str(tmp_path / "big"))  # fmt: skip
    assert run(load_config(exp)).trainer.state.global_step == 3 * 8, "a set already past the floor is unchanged"


# --- configuration, command line, sweeps
def test_augmenter_options_belong_to_the_augmenters_in_use(tmp_path, tiny_bert, tiny_data, caplog):
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, augment=["eda"], eda_alpha=0.3)
    assert load_config(exp).augmenter_sections  # fine: eda is in use
    with pytest.raises(ConfigError, match="mlm_p is set but augment does not include 'mlm'"):
        load_config(exp, ["--mlm_p", "0.3"])
    (tmp_path / "bad").mkdir()
    bad = tiny_experiment(tmp_path / "bad", tiny_bert, tiny_data, paraphrase_temperature=0.5)
    with pytest.raises(ConfigError, match="paraphrase_temperature is set but augment does not include 'paraphrase'"):
        load_config(bad)
    config = load_config(exp, ["--augment", "mlm", "--mlm_model", "x"])  # the file's eda options are dropped
    assert config.augment.augment == ["mlm"] and "ignoring the options" in caplog.text and "eda_alpha" in caplog.text
    with pytest.raises(ConfigError, match="unknown augmenter 'edaa'"):
        load_config(exp, ["--augment", "edaa"])
    with pytest.raises(ConfigError, match="augment_per_example or augment_min_per_label"):
        load_config(exp, ["--augment_per_example", "2", "--augment_min_per_label", "5"])
    assert load_config(exp, ["--augment=eda,mlm", "--mlm_model", "x"]).augment.augment == ["eda", "mlm"]
    assert load_config(exp, ["--augment", "null"]).augment.augment is None


def test_augmentation_is_refused_where_the_task_has_no_rows_to_edit(tmp_path, tiny_bert):
    data = tmp_path / "pairs"
    rows = [{"query": f"q{i}", "document": f"d{i}", "label": float(i % 2)} for i in range(8)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", [{**r, "query": "v" + r["query"]} for r in rows])
    exp = tiny_experiment(tmp_path, tiny_bert, data, task="rerank", augment=["eda"], test_split=None,
                          text_column="query", text_pair_column="document", label_column="label")  # fmt: skip
    with pytest.raises((ConfigError, ValueError), match="does not support augmentation"):
        run(load_config(exp))


@pytest.mark.slow
def test_a_sweep_chooses_augmenters(tmp_path, tiny_bert, tiny_data, tiny_mlm):
    from querytune.sweep import run_sweep

    from .test_sweep import wandb_sweeps, write_sweep

    # W&B has no conditional parameters: an augmenter's model stays in the experiment file, and the file's options
    # of the augmenters a trial leaves out are dropped with a notice
    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, max_train_samples_per_label=4, augment=["eda", "mlm"],
                          mlm_model=str(tiny_mlm), augment_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    spec = {"method": "grid", "parameters": {"augment": {"values": ["none", "eda", "eda,mlm"]}}}
    path = write_sweep(tmp_path, exp, **spec)
    _, violations = wandb_sweeps()
    assert violations(yaml.safe_load(Path(path).read_text())) == [], "W&B's own schema accepts it"
    summary = run_sweep(path, trials=3, output_dir=tmp_path / "sweep")
    trials = {t["params"]["augment"]: t for t in summary["trials"]}
    assert set(trials) == {"none", "eda", "eda,mlm"} and all(t["state"] == "COMPLETE" for t in trials.values())
    for value, trial in trials.items():
        metrics = json.loads((Path(trial["run_dir"]) / "all_results.json").read_text())
        saved = yaml.safe_load((Path(trial["run_dir"]) / "querytune_config.yaml").read_text())
        assert saved["augment"] == (None if value == "none" else value.split(","))
        assert ("augment_kept" in metrics) == (value != "none")
        assert metrics.get("augment_kept_mlm", 0) > 0 if "mlm" in value else "augment_kept_mlm" not in metrics


def test_committed_low_data_files_parse(monkeypatch):
    monkeypatch.chdir(REPO)
    for path in sorted((REPO / "experiments").rglob("*fewshot*.yaml")):
        config = load_config(path)
        assert config.training.min_train_steps, f"{path}: a low-data file sets the schedule floor"


def _low_data_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("low_data_bench", REPO / "benchmarks" / "low_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_low_data_table_reads_augmented_slot_rows_against_none_at_equal_steps(tmp_path):
    """benchmarks/low_data.py: at 5% the augmented rows train ~1,000 steps, so besides the delta to `none` (300 steps)
    the table gives the delta to `none_1000steps`; at 1% (all at the 300-step floor) both are the delta to `none`.
    Rows from a second CPU are named in the header."""
    bench = _low_data_script()
    plan = bench.plan()
    assert {"snips-slots-5pct-none_1000steps-s2", "snips-slots-1pct-none_1000steps-s1"} <= set(plan)

    def row(pct, setting, seed, f1, steps, cpu="CPU A"):
        return {"part": "snips", "task": "slots", "pct": pct, "setting": setting, "seed": seed, "test_f1": f1,
                "schedule_steps": steps, "train_rows": 10, "train_runtime": 1.0, "wall_s": 1.0, "load_before": 0.1,
                "load_after": 0.2, "commit": "abc1234", "cpu": cpu}  # fmt: skip

    raw = {"a": row(5, "none", 1, 0.70, 300), "b": row(5, "none_1000steps", 1, 0.75, 1000, cpu="CPU B"),
           "c": row(5, "slot_swap", 1, 0.78, 1000), "d": row(1, "none", 1, 0.60, 300),
           "e": row(1, "slot_swap", 1, 0.61, 300)}  # fmt: skip
    out = tmp_path / "low_data.md"
    bench.render(raw, out)
    text = out.read_text()
    cells = {
        tuple(line.split(" | ")[1:3]): line.split(" | ") for line in text.splitlines() if line.startswith("| slots")
    }
    assert cells[("5", "slot_swap")][4:6] == ["+8.00 ± 0.00", "+3.00 ± 0.00"]
    assert cells[("5", "none_1000steps")][4:6] == ["+5.00 ± 0.00", "–"]
    assert cells[("1", "slot_swap")][4:6] == ["+1.00 ± 0.00", "+1.00 ± 0.00"]
    assert "CPU A (4 rows) and CPU B (1 row); on CPU B: b " in text
