"""Every method × architecture: what trains, what stays frozen, and save -> reload -> identical logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from querytune.config import MethodArguments, load_config
from querytune.inference import LoadedRun
from querytune.methods import get_method, method_names
from querytune.methods.builders import MethodContext, apply_method
from querytune.models import load_pretrained
from querytune.train import run

from .conftest import ARCHITECTURES, tiny_experiment

METHODS = method_names()  # every registered method
TEXTS = ["where is my order 12", "cheap red shoes size 9", "return my laptop", "store near 60"]

# Prefix tuning builds past_key_values per layer; these architectures' attention does not take them.
UNSUPPORTED = {("prefix", "mpnet"), ("prefix", "deberta-v2")}


def _build(model_dir, method: str, **options):
    model, new = load_pretrained(AutoModelForSequenceClassification, str(model_dir), num_labels=4)
    import peft

    ctx = MethodContext(task_type=peft.TaskType.SEQ_CLS, new_modules=new, num_training_steps=10)
    return apply_method(model, MethodArguments(method=method, **options), ctx)


def _batch(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    enc["labels"] = torch.tensor([0, 1, 2, 3])
    return enc


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
def test_frozen_weights_stay_and_method_weights_move(tiny_models, arch, method):
    if (method, arch) in UNSUPPORTED:
        with pytest.raises(ValueError, match=method):
            _build(tiny_models[arch], method)
            model = _build(tiny_models[arch], method)
            model(**_batch(tiny_models[arch]))
        return
    torch.manual_seed(0)
    model = _build(tiny_models[arch], method, **({"freeze_trainable_layers": 1} if method == "freeze" else {}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tiny_models[arch])
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable, f"frozen weights moved: {sorted(changed - trainable)[:5]}"
    head = {n for n in changed if "classifier" in n}
    assert head, "the classification head did not train"
    if get_method(method).peft:
        body = changed - head
        assert body, f"{method}: no method weight changed"
    if method == "freeze":
        assert not any(".layer.0." in n for n in changed), "the bottom layer should be frozen"
        assert any(".layer.1." in n for n in changed), "the top layer should train"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
def test_save_reload_identical_logits(tmp_path, tiny_models, tiny_data, arch, method):
    if (method, arch) in UNSUPPORTED:
        pytest.skip(f"{method} is not supported on {arch} (checked in the other test)")
    extra = {"adalora_tinit": 0, "adalora_tfinal": 0} if method == "adalora" else {}
    config = load_config(tiny_experiment(tmp_path, tiny_models[arch], tiny_data, method=method, **extra))
    result = run(config)
    model = result.model.eval()
    enc = result.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits.numpy()
    reloaded = LoadedRun(result.output_dir, merge=False)
    got = reloaded.logits(TEXTS)
    assert got.shape == expected.shape
    assert abs(got - expected).max() < 1e-5
    if get_method(method).mergeable:
        merged = LoadedRun(result.output_dir, merge=True)
        assert abs(merged.logits(TEXTS) - expected).max() < 1e-4


def test_adalora_budget_schedule_really_runs(tmp_path, tiny_bert, tiny_data):
    """Trainer never calls update_and_allocate; our callback must, or the rank never shrinks (NOTES.md)."""
    from querytune.methods.adalora_budget import AdaLoraBudgetCallback

    exp = tiny_experiment(tmp_path, tiny_bert, tiny_data, method="adalora", max_steps=24, adalora_init_r=6,
                          adalora_target_r=2, adalora_tinit=4, adalora_tfinal=6, adalora_delta_t=2,
                          per_device_train_batch_size=4)  # fmt: skip
    result = run(load_config(exp))
    callback = next(c for c in result.trainer.callback_handler.callbacks if isinstance(c, AdaLoraBudgetCallback))
    ranks = [r for _, r in callback.budget_history]
    matrices = sum(1 for n, _ in result.model.named_modules() if n.endswith(("query", "value")))
    assert ranks[0] == 6 * matrices, "no pruning before tinit"
    assert ranks[-1] <= 2 * matrices < ranks[0], f"budget did not shrink to the target: {ranks}"
    assert ranks == sorted(ranks, reverse=True)
    assert result.model.peft_config["default"].rank_pattern, "final rank pattern is saved with the adapter"


def test_unsupported_pair_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match=r"method 'prefix' cannot be applied to MPNetForSequenceClassification"):
        _build(tiny_models["mpnet"], "prefix")
