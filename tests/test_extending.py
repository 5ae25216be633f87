"""CONTRIBUTING.md's walk-through, executed: a new task is one package plus `register_task`, a new method one
`register_method` record. Both are defined here, in the test, and train, save, reload and predict through the
unchanged runner, loader and command line; no other module is edited.

Also checks the layering the redesign promises: `import querytune` (and the config parser's registries) load no
heavy library, and no module imports another in a cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from querytune.inference import LoadedRun
from querytune.methods import MethodSpec, register_method
from querytune.methods.registry import unregister_method
from querytune.tasks import register_task, unregister_task

from .conftest import REPO, tiny_experiment


# --- a toy task: "does the query name a number?" (its labels come from the text; one option of its own)
@dataclass
class DigitArguments:
    """Options of the toy task: a flat key like any other (`--digit_min_count 2`)."""

    section: ClassVar[str] = "digits"
    digit_min_count: int = field(default=1, metadata={"help": "digits a query needs to be labelled 'number'."})


def _digit_task_class():
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from querytune.data import finish_splits, load_splits, sample
    from querytune.tasks.base import Task

    class DigitTask(Task):
        model_class = AutoModelForSequenceClassification
        peft_task_type = None
        default_metric = "accuracy"
        arguments = DigitArguments
        report_columns = [("accuracy", "accuracy %", 100.0)]

        def load_data(self) -> DatasetDict:
            found, _, _ = load_splits(self.config.data)
            self.labels = ["words", "number"]

            def label(text: str) -> int:
                return int(sum(c.isdigit() for c in text) >= self.args.digit_min_count)

            column = self.config.data.text_column
            splits = {role: Dataset.from_dict({"text": ds[column], "labels": [label(t) for t in ds[column]]})
                      for role, ds in found.items()}  # fmt: skip
            return DatasetDict(finish_splits(splits, self.config.data, self.config.training.seed, stratify=False))

        def model_kwargs(self) -> dict[str, Any]:
            return {"num_labels": 2, "id2label": dict(enumerate(self.labels))}

        def tokenize(self, splits, tokenizer):
            return splits.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True,
                              remove_columns=["text"])  # fmt: skip

        def collator(self, tokenizer):
            return DataCollatorWithPadding(tokenizer)

        def compute_metrics(self, prediction) -> dict[str, float]:
            return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

        @torch.inference_mode()
        def logits(self, run, texts, pairs=None, batch_size: int = 64) -> np.ndarray:
            enc = run.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
            return run.model(**enc).logits.numpy()

        def predict(self, run, texts, top_k: int = 3, batch_size: int = 64, **inputs):
            return [{"query": t, "label": self.labels[int(i)]} for t, i in
                    zip(texts, self.logits(run, texts).argmax(-1), strict=True)]  # fmt: skip

        def evaluate(self, run, split, out_dir, batch_size: int = 64):
            ds = sample(load_splits(self.config.data)[0][split], self.config.data.max_eval_samples, 0)
            gold = [int(sum(c.isdigit() for c in t) >= self.args.digit_min_count) for t in ds["text"]]
            return {"accuracy": float((self.logits(run, ds["text"]).argmax(-1) == np.array(gold)).mean())}

    return DigitTask


# --- a toy method: BitFit (Ben Zaken et al. 2022): only the bias terms and the new head train
def build_bitfit(model, args, ctx):
    for name, param in model.named_parameters():
        param.requires_grad = name.endswith(".bias") or any(name.startswith(m + ".") for m in ctx.new_modules)
    return model


@pytest.fixture
def toy_registrations():
    register_task("digits", _digit_task_class())
    register_method(MethodSpec("bitfit", build_bitfit, "bias terms + head", peft=False))
    yield
    unregister_task("digits")
    unregister_method("bitfit")


def test_a_toy_task_and_method_train_save_and_reload_unchanged(tmp_path, tiny_bert, tiny_data, toy_registrations):
    from transformers import AutoModelForSequenceClassification

    from querytune.cli import main
    from querytune.config import load_config
    from querytune.models import load_pretrained
    from querytune.train import run

    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, task="digits", method="bitfit", digit_min_count=2,
                          max_steps=4)  # fmt: skip
    config = load_config(exp)
    assert config.task_args == DigitArguments(digit_min_count=2)
    base, _ = load_pretrained(AutoModelForSequenceClassification, str(tiny_bert), num_labels=2)
    before = {n: p.detach().clone() for n, p in base.named_parameters() if not n.startswith("classifier.")}
    result = run(config)
    changed = {n for n, p in result.model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".bias") for n in changed), sorted(changed)[:5]

    texts = ["order 12345", "red shoes", "store near 60"]
    expected = result.model.eval()(**result.tokenizer(texts, padding=True, return_tensors="pt")).logits.detach()
    loaded = LoadedRun(result.output_dir)
    assert np.abs(loaded.task.logits(loaded, texts) - expected.numpy()).max() < 1e-5
    saved = (result.output_dir / "querytune_config.yaml").read_text()
    assert "digit_min_count: 2" in saved and "method: bitfit" in saved
    assert main(["predict", str(result.output_dir), *texts]) == 0


def test_unknown_task_and_method_name_the_registries(tmp_path, tiny_bert, tiny_data):
    from querytune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="task must be one of"):
        load_config(tiny_experiment(tmp_path, tiny_bert, tiny_data, task="digits"))
    with pytest.raises(ConfigError, match="method must be one of"):
        load_config(tiny_experiment(tmp_path, tiny_bert, tiny_data, method="bitfit"))


def test_import_querytune_and_its_registries_load_no_heavy_library():
    code = ("import sys, querytune, querytune.tasks, querytune.methods.registry, querytune.errors;"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []


def _module_imports(path: Path, package_root: Path) -> set[str]:
    """querytune modules one source file imports, at module level or inside functions (a lazy import is still a
    dependency: a cycle through one only moves the failure to run time)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("querytune"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("querytune"))
    return found


def test_no_import_cycles():
    root = REPO / "src"
    modules = {}
    for path in (root / "querytune").rglob("*.py"):
        if "metrics" in path.parts and path.parent.name != "metrics":
            continue
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {m for m in _module_imports(path, root) if m in modules and m != name}
             for name, path in modules.items()}  # fmt: skip

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for name in graph if (c := cycle_from(name))]
    assert not cycles, f"import cycle: {' -> '.join(cycles[0])}"


# --- a toy method with an option of its own: BitFit that may also train the LayerNorms
@dataclass
class BitFitArguments:
    bitfit_layernorm: bool | None = field(default=None, metadata={"help": "bitfit: train LayerNorms too."})


def build_bitfit_ln(model, args, ctx):
    for name, param in model.named_parameters():
        param.requires_grad = (name.endswith(".bias") or (bool(args.bitfit_layernorm) and "LayerNorm" in name)
                               or any(name.startswith(m + ".") for m in ctx.new_modules))  # fmt: skip
    return model


@pytest.fixture
def toy_method_with_options():
    register_method(MethodSpec("bitfit", build_bitfit_ln, "bias terms (+ LayerNorms) + head", BitFitArguments,
                               peft=False))  # fmt: skip
    yield
    unregister_method("bitfit")


def test_a_toy_method_with_an_option_of_its_own(tmp_path, tiny_bert, tiny_data, toy_method_with_options):
    """The method's file is all it takes: its option is a key, checked like any other, saved, and read back."""
    from querytune.config import ConfigError, load_config
    from querytune.train import run

    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="bitfit", bitfit_layernorm=True, max_steps=3)
    config = load_config(exp)
    assert config.method.bitfit_layernorm is True and config.method.lora_r is None
    with pytest.raises(ConfigError, match="bitfit_layernorm is set but method is 'lora'"):
        load_config(exp, ["--method", "lora", "--bitfit_layernorm", "false"])
    with pytest.raises(ConfigError, match="bad value for key 'bitfit_layernorm'"):
        load_config(exp, ["--bitfit_layernorm", "maybe"])
    result = run(config)
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any("LayerNorm" in n for n in trained) and not any(n.endswith("query.weight") for n in trained)
    saved = load_config(result.output_dir / "querytune_config.yaml")
    assert saved.method.bitfit_layernorm is True, "the option is saved with the run and read back"
    assert "bitfit_layernorm: true" in (result.output_dir / "querytune_config.yaml").read_text()


def test_contributing_lists_every_module():
    """CONTRIBUTING.md's layout table names every module of src/querytune (and nothing that is not there)."""
    import re

    text = (REPO / "CONTRIBUTING.md").read_text()
    listed = set()
    for folder, modules in re.findall(r"^\| `(querytune/[^`]*)` \| ([^|]+) \|", text, flags=re.MULTILINE):
        listed |= {f"{folder}{m}" for m in re.findall(r"`([^`]+\.py)`", modules)}
    root = REPO / "src"
    present = {str(p.relative_to(root)) for p in (root / "querytune").rglob("*.py") if p.name != "__init__.py"}
    assert sorted(present - listed) == [], "modules missing from CONTRIBUTING.md's layout"
    assert sorted(listed - present) == [], "CONTRIBUTING.md lists modules that do not exist"


def test_the_suite_fails_a_test_that_compares_nothing():
    """conftest's guard: a test body without an assert, pytest.raises or assert_* helper is failed at collection."""
    from .conftest import compares_something

    def empty(tmp_path):
        tmp_path.mkdir(exist_ok=True)

    def checks(tmp_path):
        assert tmp_path

    def raises():
        with pytest.raises(ValueError):
            int("x")

    def helper(tmp_path):
        _assert_same_run(tmp_path, tmp_path, 1)  # noqa: F821  (never called: only read)

    assert not compares_something(empty)
    assert compares_something(checks) and compares_something(raises) and compares_something(helper)
