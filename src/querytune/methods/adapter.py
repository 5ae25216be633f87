"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020): the method's options, builder and record. The
adapter itself, a PEFT method that PEFT does not ship, is `querytune.methods.bottleneck` (imported when a run is
built or loaded)."""

from __future__ import annotations

from dataclasses import dataclass, field

from querytune.methods.registry import MethodSpec, register_method

VARIANTS: tuple[str, ...] = ("houlsby", "pfeiffer")

# Default placement per `model.config.model_type` and variant, as regexes that PEFT full-matches against module
# names. Regexes (not suffix lists) are needed because PEFT's suffix matching of "output.dense" would also hit
# "attention.output.dense", i.e. a Pfeiffer config would silently become a Houlsby one. Module names checked against
# transformers 5.23 (sequence and token classification heads share the encoder names):
#   bert / roberta / deberta-v2: encoder.layer.N.attention.output.dense  and  encoder.layer.N.output.dense
#   mpnet:                       encoder.layer.N.attention.attn.o        and  encoder.layer.N.output.dense
_FFN_OUT = r"(.*\.)?layer\.\d+\.output\.dense"
DEFAULT_TARGET_MODULES: dict[str, dict[str, str]] = {
    "bert": {"houlsby": r"(.*\.)?layer\.\d+\.(attention\.output\.dense|output\.dense)", "pfeiffer": _FFN_OUT},
    "roberta": {"houlsby": r"(.*\.)?layer\.\d+\.(attention\.output\.dense|output\.dense)", "pfeiffer": _FFN_OUT},
    "deberta-v2": {"houlsby": r"(.*\.)?layer\.\d+\.(attention\.output\.dense|output\.dense)", "pfeiffer": _FFN_OUT},
    "mpnet": {"houlsby": r"(.*\.)?layer\.\d+\.(attention\.attn\.o|output\.dense)", "pfeiffer": _FFN_OUT},
}


@dataclass
class AdapterArguments:
    """Options of `adapter`."""

    adapter_variant: str | None = field(default=None, metadata={"help": "'houlsby' (default) or 'pfeiffer'."})
    adapter_reduction_factor: int | None = field(default=None, metadata={"help": "hidden / bottleneck (16)."})
    adapter_bottleneck_size: int | None = field(default=None, metadata={"help": "Explicit bottleneck width."})
    adapter_non_linearity: str | None = field(default=None, metadata={"help": "relu (default), gelu, silu, tanh."})
    adapter_target_modules: list[str] | None = field(default=None, metadata={"help": "Override the default map."})


# an adapter wraps an encoder block's output projections: it needs an encoder; without adapter_target_modules it
# knows the placement in these architectures only
register_method(MethodSpec("adapter", "querytune.methods.bottleneck:build_adapter", "Houlsby / Pfeiffer bottleneck adapters", AdapterArguments,
                           needs=frozenset({"encoder"}), architectures=tuple(DEFAULT_TARGET_MODULES),
                           peft_registration="querytune.methods:register_bottleneck"))  # fmt: skip
