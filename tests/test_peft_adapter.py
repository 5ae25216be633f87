"""Tests for querytune.peft_adapter: bottleneck (Houlsby / Pfeiffer) adapters registered as a PEFT method.

All models are tiny and randomly initialised (hidden 32, 2 layers), so the whole file runs in well under a minute on
CPU. Dropout is switched off (eval mode or zero dropout) so every comparison is deterministic.
"""

from __future__ import annotations

import enum
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    DebertaV2Config,
    GPT2Config,
    GPT2ForSequenceClassification,
    MPNetConfig,
    RobertaConfig,
)

import querytune.methods.bottleneck as pa
from querytune.methods.bottleneck import (
    DEFAULT_TARGET_MODULES,
    BottleneckConfig,
    BottleneckLayer,
    BottleneckModel,
    count_adapter_parameters,
)

SRC_DIR = Path(__file__).resolve().parents[1] / "src"
HIDDEN, LAYERS, NUM_LABELS = 32, 2, 3
CONFIG_CLASSES = {"bert": BertConfig, "roberta": RobertaConfig, "mpnet": MPNetConfig, "deberta-v2": DebertaV2Config}
MODEL_CLASSES = {"SEQ_CLS": AutoModelForSequenceClassification, "TOKEN_CLS": AutoModelForTokenClassification}
ARCHS = sorted(CONFIG_CLASSES)
TASKS = sorted(MODEL_CLASSES)
VARIANTS = ["houlsby", "pfeiffer"]
# Fixed batch; token ids start at 3 so that no id collides with RoBERTa/MPNet padding ids. Row 1 has padding.
INPUT_IDS = torch.tensor([[5, 17, 42, 8, 99, 23, 11, 7], [6, 31, 64, 12, 9, 1, 1, 1]])
ATTENTION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]])


def tiny_config(arch: str, dropout: float | None = None):
    """A 2-layer, 32-wide config of the given architecture (optionally with all dropout set to `dropout`)."""
    kwargs = dict(
        vocab_size=100,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=NUM_LABELS,
    )
    if dropout is not None:
        kwargs.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return CONFIG_CLASSES[arch](**kwargs)


def tiny_model(arch: str, task: str, seed: int = 0, dropout: float | None = None):
    """Freshly initialised tiny model; the same seed always gives the same weights."""
    torch.manual_seed(seed)
    return MODEL_CLASSES[task].from_config(tiny_config(arch, dropout)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits


def head_prefixes(arch: str, task: str) -> tuple[str, ...]:
    """Parameter-name prefixes of the randomly initialised task head (what modules_to_save must train and save)."""
    return ("classifier.", "pooler.") if (arch, task) == ("deberta-v2", "SEQ_CLS") else ("classifier.",)


def perturb_trainable(model, seed: int = 1) -> None:
    """Give every trainable parameter (adapters and head copies) random values so comparisons are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def wrapped_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, BottleneckLayer)]


# --------------------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------------------
def test_peft_type_member_behaves_like_builtin_members() -> None:
    member = PeftType.BOTTLENECK
    assert PeftType("BOTTLENECK") is member and PeftType["BOTTLENECK"] is member
    assert "BOTTLENECK" in list(PeftType) and member == "BOTTLENECK" and isinstance(member, str)
    assert pickle.loads(pickle.dumps(member)) is member
    assert BottleneckConfig().peft_type is member
    # registering again (e.g. a second import path calling it) is a no-op, not a KeyError
    pa._register()
    pa._register()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    # JSON configs carry the plain string, which must hit the same registry entry
    assert PEFT_TYPE_TO_CONFIG_MAPPING["BOTTLENECK"] is BottleneckConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["BOTTLENECK"] is BottleneckModel


def test_extend_enum_is_idempotent_and_consistent() -> None:
    class Colour(str, enum.Enum):  # noqa: UP042  (as PEFT's PeftType is)
        RED = "RED"

    green = pa._extend_enum(Colour, "GREEN", "GREEN")
    assert pa._extend_enum(Colour, "GREEN", "GREEN") is green
    assert list(Colour) == [Colour.RED, green] and Colour("GREEN") is green and len(Colour) == 2
    with pytest.raises(ValueError, match="already bound"):
        pa._extend_enum(Colour, "ROUGE", "RED")
    with pytest.raises(AttributeError):
        Colour.GREEN = "x"


# --------------------------------------------------------------------------------------------------------------------
# Placement, identity at init, parameter count
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_placement_and_parameter_count(arch: str, task: str, variant: str) -> None:
    base = tiny_model(arch, task)
    expected_head = sum(p.numel() for n, p in base.named_parameters() if n.startswith(head_prefixes(arch, task)))
    reference = logits(base)

    model = get_peft_model(base, BottleneckConfig(task_type=task, variant=variant, reduction_factor=4))

    # exact identity: the zero up-projection adds exact zeros
    assert torch.equal(logits(model), reference)

    names = wrapped_names(model)
    ffn = [n for n in names if re.search(r"\.layer\.\d+\.output\.dense$", n)]
    attention = [n for n in names if n not in ffn]
    assert len(ffn) == LAYERS
    if variant == "houlsby":
        attn_suffix = "attention.attn.o" if arch == "mpnet" else "attention.output.dense"
        assert len(attention) == LAYERS and all(n.endswith(attn_suffix) for n in attention)
    else:
        assert attention == []

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bottleneck = HIDDEN // 4
    assert trainable == count_adapter_parameters(HIDDEN, bottleneck, LAYERS, variant) + expected_head


def test_bottleneck_size_wins_over_reduction_factor_and_nonlinearities() -> None:
    for act in ["relu", "gelu", "swish", "silu", "tanh"]:
        cfg = BottleneckConfig(task_type="SEQ_CLS", bottleneck_size=5, reduction_factor=2, non_linearity=act)
        model = get_peft_model(tiny_model("bert", "SEQ_CLS"), cfg)
        layer = model.base_model.model.bert.encoder.layer[0].output.dense
        assert layer.bottleneck_down["default"].out_features == 5
        adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "bottleneck_" in n)
        assert adapter == count_adapter_parameters(HIDDEN, 5, LAYERS, "houlsby")


def test_count_adapter_parameters_closed_form() -> None:
    # bert-base, reduction factor 16: 2 adapters x 12 layers x (2*768*48 + 48 + 768)
    assert count_adapter_parameters(768, 48, 12, "houlsby") == 24 * 74_544
    assert count_adapter_parameters(768, 48, 12, "pfeiffer") == 12 * 74_544
    with pytest.raises(ValueError, match="variant"):
        count_adapter_parameters(768, 48, 12, "lora")


# --------------------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload_reproduces_logits(arch: str, task: str, tmp_path: Path) -> None:
    variant = "houlsby" if task == "SEQ_CLS" else "pfeiffer"
    model = get_peft_model(tiny_model(arch, task), BottleneckConfig(task_type=task, variant=variant))
    perturb_trainable(model)
    expected = logits(model)
    assert not torch.allclose(expected, logits(tiny_model(arch, task)), atol=1e-3)
    model.save_pretrained(tmp_path)

    # the task head of a real checkpoint is random on every load: re-randomise it so the adapter must restore it
    fresh = tiny_model(arch, task)
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if name.startswith(head_prefixes(arch, task)):
                p.normal_()
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, BottleneckConfig) and config.variant == variant
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-6, rtol=0)


def test_low_cpu_mem_usage_loading(tmp_path: Path) -> None:
    model = get_peft_model(tiny_model("mpnet", "SEQ_CLS"), BottleneckConfig(task_type="SEQ_CLS"))
    perturb_trainable(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("mpnet", "SEQ_CLS"), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-6, rtol=0)


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    import torch
    import querytune.methods
    querytune.methods.register_bottleneck()  # the one documented call for users of plain PEFT
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    classes = {"SEQ_CLS": AutoModelForSequenceClassification, "TOKEN_CLS": AutoModelForTokenClassification}
    for case in json.loads(sys.argv[1]):
        config = PeftConfig.from_pretrained(case["adapter"])
        assert type(config).__name__ == "BottleneckConfig" and config.peft_type == "BOTTLENECK", config
        base = classes[case["task"]].from_pretrained(case["base"]).eval()
        model = PeftModel.from_pretrained(base, case["adapter"]).eval()
        batch = torch.load(case["batch"])
        with torch.no_grad():
            torch.save(model(**batch).logits, case["out"])
    import querytune.methods.bottleneck as pa
    importlib.reload(pa)  # re-registration must be idempotent
    import querytune.methods.bottleneck  # noqa: F401  (second import)
    assert type(PeftConfig.from_pretrained(case["adapter"])).__name__ == "BottleneckConfig"
    """
)


def test_reload_in_fresh_python_process(tmp_path: Path) -> None:
    batch = {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK}
    torch.save(batch, tmp_path / "batch.pt")
    cases, expected = [], {}
    for arch, task, variant in [("bert", "SEQ_CLS", "houlsby"), ("deberta-v2", "TOKEN_CLS", "pfeiffer")]:
        case_dir = tmp_path / f"{arch}-{task}"
        base = tiny_model(arch, task)
        base.save_pretrained(case_dir / "base")  # before get_peft_model, which modifies the model in place
        model = get_peft_model(base, BottleneckConfig(task_type=task, variant=variant, non_linearity="gelu"))
        perturb_trainable(model)
        model.save_pretrained(case_dir / "adapter")
        expected[arch] = logits(model)
        out = case_dir / "logits.pt"
        cases.append(
            dict(
                task=task,
                base=str(case_dir / "base"),
                adapter=str(case_dir / "adapter"),
                batch=str(tmp_path / "batch.pt"),
                out=str(out),
            )
        )

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC_DIR), os.environ.get("PYTHONPATH")]))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, json.dumps(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (arch, want), case in zip(expected.items(), cases, strict=True):
        torch.testing.assert_close(torch.load(case["out"]), want, atol=1e-6, rtol=0, msg=arch)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "task", "variant"), [("bert", "SEQ_CLS", "houlsby"), ("mpnet", "TOKEN_CLS", "pfeiffer")]
)
def test_few_optimizer_steps_lower_the_loss(arch: str, task: str, variant: str) -> None:
    model = get_peft_model(
        tiny_model(arch, task, dropout=0.0), BottleneckConfig(task_type=task, variant=variant, reduction_factor=4)
    )
    model.train()
    labels = torch.tensor([0, 2]) if task == "SEQ_CLS" else torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1]] * 2)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if "bottleneck_" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    losses = []
    for _ in range(10):
        loss = model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < 0.85 * losses[0] and losses[-1] == min(losses), losses
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)
    # both projections learn (down only from step 2 on, once up is non-zero)
    assert all(not torch.equal(p, adapters_before[n]) for n, p in model.named_parameters() if n in adapters_before)


# --------------------------------------------------------------------------------------------------------------------
# Several named adapters, disable, unload, merge
# --------------------------------------------------------------------------------------------------------------------
def test_two_named_adapters_switch_outputs(tmp_path: Path) -> None:
    base = tiny_model("roberta", "SEQ_CLS")
    reference = logits(base)
    model = get_peft_model(base, BottleneckConfig(task_type="SEQ_CLS", variant="houlsby"))
    perturb_trainable(model, seed=1)
    out_default = logits(model)

    model.add_adapter("other", BottleneckConfig(task_type="SEQ_CLS", variant="pfeiffer", bottleneck_size=4))
    assert torch.equal(logits(model), out_default)  # an added adapter is inactive
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(".other." in n for n in trainable)

    model.set_adapter("other")
    perturb_trainable(model, seed=2)  # only "other" (and its head copy) is trainable now
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    out_other = logits(model)
    assert not torch.allclose(out_other, out_default, atol=1e-3)

    model.set_adapter("default")
    assert torch.equal(logits(model), out_default)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), reference, atol=1e-6, rtol=0)
    assert torch.equal(logits(model), out_default)

    # both adapters survive save / load
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("roberta", "SEQ_CLS"), tmp_path)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(logits(reloaded), out_default, atol=1e-6, rtol=0)
    reloaded.set_adapter("other")
    torch.testing.assert_close(logits(reloaded), out_other, atol=1e-6, rtol=0)

    model.delete_adapter("other")
    assert all(".other." not in n for n, _ in model.named_parameters())


def test_merge_raises_and_unload_restores_base() -> None:
    model = get_peft_model(tiny_model("bert", "TOKEN_CLS"), BottleneckConfig(task_type="TOKEN_CLS"))
    perturb_trainable(model)
    out = logits(model)
    with pytest.raises(NotImplementedError, match="non-linear and cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    assert torch.equal(logits(model), out)  # the failed merge left the model untouched

    unloaded = model.unload()
    assert not wrapped_names(unloaded)
    assert isinstance(unloaded.bert.encoder.layer[0].output.dense, torch.nn.Linear)
    # the head copy was trained, the encoder is back to the base weights: compare the encoder output
    with torch.no_grad():
        hidden = unloaded.bert(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).last_hidden_state
        base_hidden = tiny_model("bert", "TOKEN_CLS").bert(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK)
    torch.testing.assert_close(hidden, base_hidden.last_hidden_state, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Errors and validation
# --------------------------------------------------------------------------------------------------------------------
def test_unsupported_architecture_raises_clear_error() -> None:
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, num_labels=2))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*bert.*deberta-v2.*mpnet.*roberta"):
        get_peft_model(gpt2, BottleneckConfig(task_type="SEQ_CLS"))


def test_non_linear_target_raises() -> None:
    cfg = BottleneckConfig(target_modules=["attention.output.LayerNorm"])
    with pytest.raises(TypeError, match="only wrap torch.nn.Linear"):
        get_peft_model(tiny_model("bert", "SEQ_CLS"), cfg)


def test_explicit_target_modules_list() -> None:
    model = get_peft_model(tiny_model("bert", "SEQ_CLS"), BottleneckConfig(target_modules=["attention.output.dense"]))
    assert len(wrapped_names(model)) == LAYERS
    assert all(n.endswith("attention.output.dense") for n in wrapped_names(model))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "parallel"}, "variant"),
        ({"non_linearity": "sigmoid"}, "non_linearity"),
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"reduction_factor": 2.5}, "reduction_factor"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"task_type": "NOT_A_TASK"}, "task type"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(**kwargs)


def test_default_map_covers_required_architectures() -> None:
    assert set(DEFAULT_TARGET_MODULES) == {"bert", "roberta", "mpnet", "deberta-v2"}
    assert all(set(v) == set(VARIANTS) for v in DEFAULT_TARGET_MODULES.values())
