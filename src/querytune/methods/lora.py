"""LoRA (and DoRA / rsLoRA) and AdaLoRA, through PEFT. AdaLoRA reads LoRA's options too and adds its rank budget;
its budget schedule runs from a Trainer callback (`querytune.methods.adalora_budget`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from querytune.methods.registry import MethodSpec, or_default, register_method

# Target modules for architectures missing from PEFT's own default map (MPNet names its projections q/k/v/o), and for
# BERT2BERT EncoderDecoderModel warm starts (task: rewrite; PEFT has no map for model_type "encoder-decoder").
EXTRA_LORA_TARGETS = {"mpnet": ["q", "k", "v", "o"], "encoder-decoder": ["query", "value"]}


@dataclass
class LoraArguments:
    """Options of `lora` (and `adalora`, which reads them too)."""

    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (default 8)."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha, usually 2 x r (default 16)."})
    lora_dropout: float | None = field(default=None, metadata={"help": "Dropout on the LoRA path (default 0.1)."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt (default: PEFT's per-architecture map)."}
    )
    lora_use_dora: bool | None = field(default=None, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    lora_use_rslora: bool | None = field(default=None, metadata={"help": "Rank-stabilised scaling alpha/sqrt(r)."})


@dataclass
class AdaLoraArguments:
    """Options of `adalora` beyond LoRA's."""

    adalora_init_r: int | None = field(default=None, metadata={"help": "AdaLoRA initial rank per matrix (12)."})
    adalora_target_r: int | None = field(default=None, metadata={"help": "AdaLoRA average final rank (4)."})
    adalora_tinit: float | None = field(
        default=None, metadata={"help": "Warm-up before pruning: steps, or a fraction of total steps (0.1)."}
    )
    adalora_tfinal: float | None = field(
        default=None, metadata={"help": "Final fine-tuning steps at the target budget, or a fraction (0.2)."}
    )
    adalora_delta_t: int | None = field(default=None, metadata={"help": "Steps between budget allocations (10)."})
    adalora_orth_reg_weight: float | None = field(default=None, metadata={"help": "Orthogonal regulariser (0.5)."})


def build_lora(model, args, ctx):
    import peft

    from querytune.methods.builders import modules_to_save

    config = peft.LoraConfig(
        task_type=ctx.task_type,
        r=or_default(args.lora_r, 8),
        lora_alpha=or_default(args.lora_alpha, 16),
        lora_dropout=or_default(args.lora_dropout, 0.1),
        target_modules=args.lora_target_modules or EXTRA_LORA_TARGETS.get(model.config.model_type),
        use_dora=or_default(args.lora_use_dora, False),
        use_rslora=or_default(args.lora_use_rslora, False),
        modules_to_save=modules_to_save(args, ctx),
    )
    return peft.get_peft_model(model, config)


def _steps(value: float, total: int) -> int:
    """AdaLoRA schedule points: a value < 1 is a fraction of the total steps."""
    return int(value * total) if value < 1 else int(value)


def build_adalora(model, args, ctx):
    import peft

    from querytune.methods.builders import modules_to_save

    total = ctx.num_training_steps
    if not total:
        raise ValueError("method 'adalora' needs the number of training steps for its budget schedule")
    tinit = _steps(or_default(args.adalora_tinit, 0.1), total)
    tfinal = _steps(or_default(args.adalora_tfinal, 0.2), total)
    if tinit + tfinal >= total:
        raise ValueError(
            f"adalora_tinit ({tinit}) + adalora_tfinal ({tfinal}) must be below the {total} training steps: "
            "the budget is pruned in between"
        )
    config = peft.AdaLoraConfig(
        task_type=ctx.task_type,
        init_r=or_default(args.adalora_init_r, 12),
        target_r=or_default(args.adalora_target_r, 4),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=or_default(args.adalora_delta_t, max(1, (total - tinit - tfinal) // 20)),
        total_step=total,
        orth_reg_weight=or_default(args.adalora_orth_reg_weight, 0.5),
        lora_alpha=or_default(args.lora_alpha, 16),
        lora_dropout=or_default(args.lora_dropout, 0.1),
        target_modules=args.lora_target_modules or EXTRA_LORA_TARGETS.get(model.config.model_type),
        modules_to_save=modules_to_save(args, ctx),
    )
    return peft.get_peft_model(model, config)


register_method(MethodSpec("lora", build_lora, "low-rank updates", LoraArguments, mergeable=True))
register_method(MethodSpec("adalora", build_adalora, "LoRA with a rank budget pruned during training",
                           (LoraArguments, AdaLoraArguments), mergeable=True,
                           callbacks="querytune.methods.adalora_budget:adalora_callbacks",
                           checkpoint_files=("adalora_budget.pt",)))  # fmt: skip
