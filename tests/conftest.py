"""Shared fixtures: tiny randomly initialised checkpoints and a tiny query corpus written to disk.

The checkpoints are saved like real pretrained models (config, weights, tokenizer) so that every test goes
through the same `from_pretrained` path as a user run.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `pytest -n N` (pytest-xdist): N test processes share the cores, so each one, and every process it starts, gets its
# share of threads (two processes with 2 threads each on 2 cores spin against each other, 10-20x slower)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // _WORKERS)))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 1 beside a benchmark (see CONTRIBUTING.md)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

INTENTS = {
    "order_status": ["where is my order {n}", "track package {n}", "order {n} status", "has order {n} shipped"],
    "product_search": ["red {p} size {n}", "cheap {p}", "{p} for kids", "best {p} under {n} dollars"],
    "return_refund": ["return my {p}", "refund for {p}", "how to send back {p}", "exchange {p} for size {n}"],
    "store_locator": ["store near {n}", "open stores in {n}", "closest shop to zip {n}", "store hours {n}"],
}
PRODUCTS = ["shoes", "jacket", "laptop", "phone", "lamp", "sofa", "boots", "watch", "tent", "kettle"]


def make_rows(n_per_intent: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for intent, templates in INTENTS.items():
        for _ in range(n_per_intent):
            text = rng.choice(templates).format(p=rng.choice(PRODUCTS), n=rng.randint(1, 99))
            rows.append({"text": text, "intent": intent})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus_slice(source: Path, folder: Path, keep, per_split: dict[str, int], key: str = "intent") -> Path:
    """The first `per_split[split]` rows of each label in `keep` (a set, or a function of all labels) as jsonl."""
    for split, n in per_split.items():
        rows = [json.loads(line) for line in (source / f"{split}.jsonl").read_text().splitlines()]
        labels = keep({r[key] for r in rows}) if callable(keep) else keep
        taken: dict[str, int] = {}
        subset = []
        for r in rows:
            if r[key] in labels and taken.get(r[key], 0) < n:
                taken[r[key]] = taken.get(r[key], 0) + 1
                subset.append(r)
        write_jsonl(folder / f"{split}.jsonl", subset)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A folder with train/validation/test jsonl: 4 intents, columns text and intent."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_jsonl(root / "train.jsonl", make_rows(16, 0))
    write_jsonl(root / "validation.jsonl", make_rows(4, 1))
    write_jsonl(root / "test.jsonl", make_rows(4, 2))
    return root


def _vocab(extra_words: tuple[str, ...] = ()) -> list[str]:
    words = {w for ts in INTENTS.values() for t in ts for w in t.replace("{p}", "").replace("{n}", "").split()}
    words |= set(PRODUCTS) | {str(i) for i in range(100)} | set(extra_words)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words), "##s", "##ing"]


ARCHITECTURES = ("bert", "roberta", "mpnet", "deberta-v2")


def build_tiny_checkpoint(arch: str, folder: Path, extra_words: tuple[str, ...] = (), **config_overrides) -> Path:
    """A 2-layer random encoder of `arch` with a WordPiece tokenizer (plus `extra_words`), saved with save_pretrained."""
    from transformers import AutoConfig, AutoModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(extra_words)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary as `vocab` (a path or dict) and silently ignores `vocab_file`.
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    if arch in ("mpnet", "roberta"):
        # These models take no token_type_ids (RoBERTa's type vocabulary has one entry).
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    common = dict(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=128, pad_token_id=0,
    )  # fmt: skip
    if arch == "deberta-v2":
        common.update(
            relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=64, type_vocab_size=0
        )
    if arch in ("roberta",):
        common.update(type_vocab_size=1, max_position_embeddings=130, bos_token_id=2, eos_token_id=3)
    config = AutoConfig.for_model(arch, **{**common, **config_overrides})
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_checkpoint(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_bert(tiny_models) -> Path:
    return tiny_models["bert"]


def tiny_experiment(tmp_path: Path, model_dir: Path, data_dir: Path, **overrides) -> Path:
    """Write an experiment YAML for a 2-step run of a tiny model and return its path."""
    values = {
        "model_name_or_path": str(model_dir),
        "max_seq_length": 32,
        "dataset_name": str(data_dir),
        "label_column": "intent",
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "learning_rate": 0.01,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
        **overrides,
    }
    import yaml

    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def data_sections(**kw):
    """(DataArguments, the task's option dataclass) from flat keys, as an experiment file would split them."""
    import dataclasses

    from querytune.config import DataArguments
    from querytune.tasks import arguments_of

    task_cls = arguments_of(kw.get("task", "intent"))
    data_keys = {f.name for f in dataclasses.fields(DataArguments)}
    data = DataArguments(**{k: v for k, v in kw.items() if k in data_keys})
    if task_cls is None:
        return data, None
    args = task_cls(**{k: v for k, v in kw.items() if k not in data_keys})
    if hasattr(args, "check"):
        args.check(data)
    return data, args


# --- a tiny e-commerce slot corpus: words, BIO tags and an intent per query
COLORS = ["red", "blue", "green", "black"]
BRANDS = ["nike", "adidas", "puma"]
SLOT_PRODUCTS = [["shoes"], ["walking", "shoes"], ["rain", "jacket"], ["wool", "socks"], ["boots"]]
SLOT_TEMPLATES = {
    "product_search": [
        ["{color}", "{brand}", "{product}", "size", "{size}"],
        ["cheap", "{color}", "{product}"],
        ["{brand}", "{product}", "for", "kids"],
    ],
    "order_status": [["where", "is", "my", "{brand}", "{product}", "order"], ["track", "my", "{product}", "order"]],
}
SLOT_WORDS = ("cheap", "size", "for", "kids", "where", "is", "my", "track", "order", "walk", "rain", "wool", "socks",
              "jacket", ",", *COLORS, *BRANDS)  # fmt: skip
TEXTS = ["red nike walking shoes size 10", "track my rain jacket order", "where is my puma boots order", "wool socks"]


def make_slot_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        intent = list(SLOT_TEMPLATES)[i % 2]
        tokens, tags = [], []
        for slot in rng.choice(SLOT_TEMPLATES[intent]):
            if slot == "{product}":
                words, kind = rng.choice(SLOT_PRODUCTS), "product"
            elif slot.startswith("{"):
                kind = slot[1:-1]
                words = [{"color": rng.choice(COLORS), "brand": rng.choice(BRANDS),
                          "size": str(rng.randint(1, 14))}[kind]]  # fmt: skip
            else:
                words, kind = [slot], None
            tokens += words
            tags += ["O"] * len(words) if kind is None else [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        rows.append({"text": " ".join(tokens), "tokens": tokens, "tags": tags, "intent": intent})
    return rows


@pytest.fixture(scope="session")
def slot_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slot_data")
    write_jsonl(root / "train.jsonl", make_slot_rows(48, 0))
    write_jsonl(root / "validation.jsonl", make_slot_rows(12, 1))
    write_jsonl(root / "test.jsonl", make_slot_rows(12, 2))
    return root


@pytest.fixture(scope="session")
def slot_bert(tmp_path_factory) -> Path:
    return build_tiny_checkpoint("bert", tmp_path_factory.mktemp("slot_bert") / "bert", extra_words=SLOT_WORDS)


# --- a tiny relevance corpus (Home Depot column names) and its checkpoint
COLOURS = ["red", "blue", "green", "black", "white", "steel", "oak", "brass"]
ITEMS = ["shoes", "jacket", "lamp", "sofa", "boots", "watch", "tent", "kettle", "bracket", "faucet"]
EXTRA_WORDS = (*COLOURS, "bracket", "faucet", "with", "and", "set", "of", "pack")


def ranking_rows(n_queries: int, seed: int) -> list[dict]:
    """Queries 'colour item'; each judges the exact product (3), one sharing the item (2) and a random one (1)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_queries):
        colour, item = rng.choice(COLOURS), rng.choice(ITEMS)
        other_colour = rng.choice([c for c in COLOURS if c != colour])
        other_item = rng.choice([i for i in ITEMS if i != item])
        query = f"{colour} {item}"
        for title, grade in ((f"{colour} {item} set", 3), (f"{other_colour} {item}", 2),
                             (f"{other_colour} {other_item} pack", 1)):  # fmt: skip
            rows.append({"search_term": query, "product_title": title, "relevance": grade, "product_uid": title})
    return rows


@pytest.fixture(scope="session")
def ranking_data(tmp_path_factory) -> Path:
    """One train file (split by query hash at load time), Home Depot column names."""
    root = tmp_path_factory.mktemp("ranking_data")
    write_jsonl(root / "train.jsonl", ranking_rows(60, 0))
    return root


@pytest.fixture(scope="session")
def ranking_bert(tmp_path_factory) -> Path:
    return build_tiny_checkpoint("bert", tmp_path_factory.mktemp("ranking_models") / "bert", EXTRA_WORDS)


COLUMNS = {"text_column": "search_term", "text_pair_column": "product_title", "label_column": "relevance",
           "document_id_column": "product_uid"}  # fmt: skip


def ranking_experiment(tmp_path: Path, model: Path, data: Path, task: str, **overrides) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    values = {"task": task, **COLUMNS, "max_steps": 3, "ranking_test_percentage": 25.0,
              "validation_split_percentage": 25.0, "catalogue_cache_dir": str(tmp_path / "cache"),
              "retrieval_top_k": 20, **overrides}  # fmt: skip
    return tiny_experiment(tmp_path, model, data, **values)


# --- the suite's own guard: a test must compare something
_CHECK_CALLS = ("raises", "warns", "fail", "assert", "approx")


def compares_something(function) -> bool:
    """Whether a test function's body holds an `assert`, a `pytest.raises` / `warns` / `fail`, or calls a helper named
    like an assertion (`_assert_same_run`): a test without one passes whatever the code does."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return True  # no source to read: not this guard's to judge
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if any(word in name.lower() for word in _CHECK_CALLS):
                return True
    return False


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Fail every collected test function that compares nothing (see CONTRIBUTING.md, "What a test compares").

    Under `pytest -n N --dist loadgroup`, a module's tests run on one worker (its module fixtures are built once),
    and every test that launches several processes runs on the same worker: they share accelerate's default port.
    Groups holding a slow or integration test come first, so that the last minutes are not one worker alone.
    """
    groups = {}
    for item in items:
        groups[item] = "distributed" if item.get_closest_marker("distributed") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(groups[item]))
        function = getattr(item, "function", None)
        if function is not None and not compares_something(function):

            def fail(name=item.name):
                pytest.fail(f"{name} asserts nothing: a test must compare against something that moves when the "
                            "code breaks (an assert, pytest.raises, or an assert_* helper)", pytrace=False)  # fmt: skip

            item.runtest = fail
    heavy = {groups[i] for i in items if i.get_closest_marker("slow") or i.get_closest_marker("integration")}
    items.sort(key=lambda i: groups[i] not in heavy)  # stable: a group's tests stay together, in their order


# --- with ../shared/data present (as in CI), an integration test that skips fails the run
_SKIPPED_INTEGRATION: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "integration" in report.keywords:
        _SKIPPED_INTEGRATION.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if SHARED_DATA.is_dir() and _SKIPPED_INTEGRATION and exitstatus == 0:
        print(f"\nintegration tests skipped although {SHARED_DATA} is present: {_SKIPPED_INTEGRATION}")
        session.exitstatus = 1


def assert_eval_reproduces(run_dir: Path, split: str = "test", tol: float = 1e-6) -> dict:
    """`querytune eval RUN --split SPLIT` in this process: every number it reports that the run also reported at the
    end of training (`{split prefix}_{name}` in all_results.json) must be the same; returns eval's result."""
    import contextlib
    import io

    from querytune.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(run_dir), "--split", split]) == 0
    result = json.loads(out.getvalue())
    prefix = "test" if split == "test" else "eval"
    trained = json.loads((Path(run_dir) / "all_results.json").read_text())
    shared = [k for k, v in result.items() if isinstance(v, int | float) and f"{prefix}_{k}" in trained
              and "per_second" not in k and "runtime" not in k]  # fmt: skip
    assert shared, f"eval reported nothing the run reported ({sorted(result)})"
    for key in shared:
        assert abs(result[key] - trained[f"{prefix}_{key}"]) <= tol, (key, result[key], trained[f"{prefix}_{key}"])
    return result
