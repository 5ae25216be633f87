"""AdaLoRA's rank budget during training: a Trainer callback (Trainer never calls `update_and_allocate`) that also
makes an AdaLoRA run resumable exactly. Its state lives in `adalora_budget.pt` in every checkpoint (the record's
`checkpoint_files`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import peft
import torch
from torch import nn
from transformers import TrainerCallback

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

    def __init__(self, model: peft.PeftModel, resume_from: str | Path | None = None) -> None:
        self.model = model
        self.budget_history: list[tuple[int, int]] = []
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.resume_from = resume_from  # the checkpoint training resumes from

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


def adalora_callbacks(model: nn.Module, args: Any, resume_from: str | None = None) -> list[TrainerCallback]:
    return [AdaLoraBudgetCallback(model, resume_from)]
