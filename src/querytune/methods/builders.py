"""The builders of the registered methods: turn a pretrained model into a trainable one.

Every method except `full` and `freeze` goes through PEFT. A builder is `(model, MethodArguments, MethodContext) ->
model`; its record in `querytune.methods.registry` names it. Defaults for unset (None) fields live here, next to
the code that uses them.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn
from transformers import PreTrainedModel, TrainerCallback

from querytune.methods.registry import MethodArguments, get_method

logger = logging.getLogger(__name__)


@dataclass
class MethodContext:
    """What a method builder needs to know beyond its own options."""

    task_type: peft.TaskType
    new_modules: list[str] = field(default_factory=list)  # initialised from scratch: always trained and saved
    num_training_steps: int | None = None  # AdaLoRA's budget schedule needs it
    tokenizer_name_or_path: str | None = None  # prompt tuning initialised from text needs it


# Target modules for architectures missing from PEFT's own default maps (MPNet names its projections q/k/v/o).
EXTRA_LORA_TARGETS = {"mpnet": ["q", "k", "v", "o"]}
EXTRA_IA3_TARGETS = {"mpnet": (["k", "v", "output.dense"], ["output.dense"])}
# BERT2BERT EncoderDecoderModel warm starts (task: rewrite): PEFT has no map for model_type "encoder-decoder".
EXTRA_LORA_TARGETS["encoder-decoder"] = ["query", "value"]
EXTRA_IA3_TARGETS["encoder-decoder"] = (["key", "value", "output.dense"], ["output.dense"])


def _or(value, default):
    return default if value is None else value


def _modules_to_save(args: MethodArguments, ctx: MethodContext) -> list[str] | None:
    modules = sorted(set(ctx.new_modules) | set(args.modules_to_save or []))
    return modules or None


def build_full(model: PreTrainedModel, args: MethodArguments, ctx: MethodContext) -> nn.Module:
    return model


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (the longest ModuleList named `layer`/`layers`/`h`)."""
    candidates = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers", "h")
    ]
    if not candidates:
        raise ValueError(f"method 'freeze': cannot find the layer stack of {type(model).__name__}")
    return max(candidates, key=len)


def build_freeze(model: PreTrainedModel, args: MethodArguments, ctx: MethodContext) -> nn.Module:
    layers = encoder_layers(model)
    n = _or(args.freeze_trainable_layers, 2)
    if not 0 <= n <= len(layers):
        raise ValueError(f"freeze_trainable_layers must be in [0, {len(layers)}], got {n}")
    prefix = model.base_model_prefix + "."
    for name, param in model.named_parameters():
        # Everything outside the encoder body (the head) and the pooler feeding it stays trainable.
        param.requires_grad = not name.startswith(prefix) or ".pooler." in name
    for layer in list(layers)[len(layers) - n :]:
        layer.requires_grad_(True)
    for name in _modules_to_save(args, ctx) or []:
        model.get_submodule(name).requires_grad_(True)
    return model


def build_lora(model: PreTrainedModel, args: MethodArguments, ctx: MethodContext) -> nn.Module:
    config = peft.LoraConfig(
        task_type=ctx.task_type,
        r=_or(args.lora_r, 8),
        lora_alpha=_or(args.lora_alpha, 16),
        lora_dropout=_or(args.lora_dropout, 0.1),
        target_modules=args.lora_target_modules or EXTRA_LORA_TARGETS.get(model.config.model_type),
        use_dora=_or(args.lora_use_dora, False),
        use_rslora=_or(args.lora_use_rslora, False),
        modules_to_save=_modules_to_save(args, ctx),
    )
    return peft.get_peft_model(model, config)


def _steps(value: float, total: int) -> int:
    """AdaLoRA schedule points: a value < 1 is a fraction of the total steps."""
    return int(value * total) if value < 1 else int(value)


def build_adalora(model: PreTrainedModel, args: MethodArguments, ctx: MethodContext) -> nn.Module:
    total = ctx.num_training_steps
    if not total:
        raise ValueError("method 'adalora' needs the number of training steps for its budget schedule")
    tinit, tfinal = _steps(_or(args.adalora_tinit, 0.1), total), _steps(_or(args.adalora_tfinal, 0.2), total)
    if tinit + tfinal >= total:
        raise ValueError(
            f"adalora_tinit ({tinit}) + adalora_tfinal ({tfinal}) must be below the {total} training steps: "
            "the budget is pruned in between"
        )
    config = peft.AdaLoraConfig(
        task_type=ctx.task_type,
        init_r=_or(args.adalora_init_r, 12),
        target_r=_or(args.adalora_target_r, 4),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=_or(args.adalora_delta_t, max(1, (total - tinit - tfinal) // 20)),
        total_step=total,
        orth_reg_weight=_or(args.adalora_orth_reg_weight, 0.5),
        lora_alpha=_or(args.lora_alpha, 16),
        lora_dropout=_or(args.lora_dropout, 0.1),
        target_modules=args.lora_target_modules or EXTRA_LORA_TARGETS.get(model.config.model_type),
        modules_to_save=_modules_to_save(args, ctx),
    )
    return peft.get_peft_model(model, config)


def build_ia3(model: PreTrainedModel, args: MethodArguments, ctx: MethodContext) -> nn.Module:
    targets, feedforward = args.ia3_target_modules, args.ia3_feedforward_modules
    if targets is None and model.config.model_type in EXTRA_IA3_TARGETS:
        targets, feedforward = EXTRA_IA3_TARGETS[model.config.model_type]
    config = peft.IA3Config(
        task_type=ctx.task_type,
        target_modules=targets,
        feedforward_modules=feedforward,
        modules_to_save=_modules_to_save(args, ctx),
    )
    return peft.get_peft_model(model, config)


def build_prefix(model: PreTrainedModel, args: MethodArguments, ctx: MethodContext) -> nn.Module:
    # PEFT only finds out at the first forward pass; fail before training starts instead.
    takes_cache = (inspect.signature(m.forward).parameters for m in (model, model.base_model))
    if not any("past_key_values" in params for params in takes_cache):
        raise ValueError(
            f"{model.config.model_type} attention takes no past_key_values, which prefix tuning needs; "
            "use lora, ia3, adapter or prompt"
        )
    config = peft.PrefixTuningConfig(
        task_type=ctx.task_type,
        num_virtual_tokens=_or(args.prefix_num_virtual_tokens, 20),
        prefix_projection=_or(args.prefix_projection, False),
        encoder_hidden_size=_or(args.prefix_encoder_hidden_size, model.config.hidden_size),
        modules_to_save=_modules_to_save(args, ctx),
    )
    return peft.get_peft_model(model, config)


def build_prompt(model: PreTrainedModel, args: MethodArguments, ctx: MethodContext) -> nn.Module:
    from_text = _or(args.prompt_init, "random") == "text"
    config = peft.PromptTuningConfig(
        task_type=ctx.task_type,
        num_virtual_tokens=get_method("prompt").num_virtual_tokens(args),
        prompt_tuning_init=peft.PromptTuningInit.TEXT if from_text else peft.PromptTuningInit.RANDOM,
        prompt_tuning_init_text=args.prompt_init_text if from_text else None,
        tokenizer_name_or_path=ctx.tokenizer_name_or_path if from_text else None,
        modules_to_save=_modules_to_save(args, ctx),
    )
    return peft.get_peft_model(model, config)


def build_adapter(model: PreTrainedModel, args: MethodArguments, ctx: MethodContext) -> nn.Module:
    from querytune.methods.bottleneck import BottleneckConfig

    config = BottleneckConfig(
        task_type=ctx.task_type,
        variant=_or(args.adapter_variant, "houlsby"),
        reduction_factor=_or(args.adapter_reduction_factor, 16),
        bottleneck_size=args.adapter_bottleneck_size,
        non_linearity=_or(args.adapter_non_linearity, "relu"),
        target_modules=args.adapter_target_modules,
        modules_to_save=_modules_to_save(args, ctx),
    )
    return peft.get_peft_model(model, config)


def apply_method(model: PreTrainedModel, args: MethodArguments, ctx: MethodContext) -> nn.Module:
    """Make `model` trainable with `args.method`; errors from PEFT are re-raised naming the method and model."""
    try:
        return get_method(args.method).build(model, args, ctx)
    except (ValueError, KeyError, TypeError, NotImplementedError) as err:
        raise ValueError(
            f"method {args.method!r} cannot be applied to {type(model).__name__} ({model.config.model_type}): {err}"
        ) from err


ADALORA_STATE = "adalora_budget.pt"  # in every checkpoint of an AdaLoRA run: what resuming needs beyond Trainer's


class AdaLoraBudgetCallback(TrainerCallback):
    """Trainer never calls AdaLoRA's `update_and_allocate`; without this the rank budget is never reallocated.

    It also makes an AdaLoRA run resumable exactly. PEFT saves an adapter cut down to its rank pattern (the kept
    singular values), but training goes on with the full-rank matrices: the pruned triplets still get gradients, the
    optimizer holds full-size moments, and a triplet pruned at one allocation can come back at the next. So the rank
    pattern is kept here, out of the PEFT config, between optimizer steps: checkpoints hold the full-rank matrices
    (which resume loads into the freshly built full-rank model), and `adalora_budget.pt` beside them holds the rank
    pattern and the budget allocator's importance averages. At the end of training the pattern goes back into the
    config, so the final adapter is the compact one plain PEFT loads.
    """

    checkpoint_files = (
        ADALORA_STATE,
    )  # a checkpoint without it cannot be resumed (see runs.last_complete_checkpoint)

    def __init__(self, model: peft.PeftModel) -> None:
        self.model = model
        self.budget_history: list[tuple[int, int]] = []
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.resume_from: str | Path | None = None  # the checkpoint training resumes from (set by train.run)

    @property
    def _config(self) -> peft.AdaLoraConfig:
        return self.model.peft_config["default"]

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Gradients are still present here (zero_grad comes after the scheduler step), as AdaLoRA requires.
        config = self._config
        config.rank_pattern = self.rank_pattern
        self.model.base_model.update_and_allocate(state.global_step)
        self.rank_pattern, config.rank_pattern = config.rank_pattern, None
        if state.global_step % max(1, config.deltaT) == 0:
            self.budget_history.append((state.global_step, current_adalora_rank(self.model, self.rank_pattern)))

    def _state(self) -> dict[str, Any]:
        allocator = self.model.base_model.rankallocator
        return {
            "rank_pattern": self.rank_pattern,
            "ipt": allocator.ipt,
            "exp_avg_ipt": allocator.exp_avg_ipt,
            "exp_avg_unc": allocator.exp_avg_unc,
            "budget_history": [list(x) for x in self.budget_history],
        }

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        tmp = folder / (ADALORA_STATE + ".tmp")
        torch.save(self._state(), tmp)
        os.replace(tmp, folder / ADALORA_STATE)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resume_from is None:
            return
        path = Path(self.resume_from) / ADALORA_STATE
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.resume_from} has no {ADALORA_STATE}: an AdaLoRA run resumes only from a checkpoint written "
                "by this version of querytune (the rank budget's state is not in Trainer's checkpoint)"
            )
        saved = torch.load(path, weights_only=True, map_location="cpu")
        device = next(self.model.parameters()).device
        allocator = self.model.base_model.rankallocator
        for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, name, {k: v.to(device) for k, v in saved[name].items()})
        self.rank_pattern = saved["rank_pattern"]
        self.budget_history = [tuple(x) for x in saved["budget_history"]]

    def on_train_end(self, args, state, control, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint:
            # Trainer reloaded the best checkpoint's full-rank matrices: use the rank pattern they were pruned with.
            path = Path(state.best_model_checkpoint) / ADALORA_STATE
            if path.is_file():
                self.rank_pattern = torch.load(path, weights_only=True, map_location="cpu")["rank_pattern"]
        self._config.rank_pattern = self.rank_pattern


def current_adalora_rank(model: peft.PeftModel, rank_pattern: dict[str, list[bool]] | None = None) -> int:
    """Total rank the budget schedule currently allows: the kept singular values of every adapted matrix."""
    from peft.tuners.adalora import SVDLinear

    config = model.peft_config["default"]
    rank_pattern = rank_pattern if rank_pattern is not None else config.rank_pattern
    if rank_pattern:
        return sum(int(sum(keep)) for keep in rank_pattern.values())
    return config.init_r * sum(1 for m in model.modules() if isinstance(m, SVDLinear))


def adalora_callbacks(model: nn.Module, args: MethodArguments) -> list[TrainerCallback]:
    return [AdaLoraBudgetCallback(model)]


def method_callbacks(model: nn.Module, args: MethodArguments) -> list[TrainerCallback]:
    """The Trainer callbacks the method needs (AdaLoRA's budget schedule)."""
    return get_method(args.method).trainer_callbacks(model, args)


def merge_peft_model(model) -> nn.Module:
    """Fold the adapter into the base weights and return a plain transformers model (mergeable methods only).

    The trained copies of `modules_to_save` (the head) are put in place first: PEFT's IA3 unload tries to copy a
    `.weight` from each wrapper and fails on heads that are not a single Linear, e.g. RoBERTa's.
    """
    from peft.utils import ModulesToSaveWrapper

    inner = model.base_model.model
    adapter = model.active_adapter
    for name, module in list(inner.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = inner.get_submodule(parent_name) if parent_name else inner
            setattr(parent, child, module.modules_to_save[adapter])
    return model.merge_and_unload()
