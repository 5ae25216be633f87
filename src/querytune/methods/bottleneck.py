"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020) as a PEFT method.

PEFT 0.21 ships no bottleneck adapter, and the AdapterHub ``adapters`` package does not work with transformers 5, so
this module adds one through PEFT's own extension point (``register_peft_method``). Importing this module is enough:
afterwards ``get_peft_model(model, BottleneckConfig(...))``, ``PeftConfig.from_pretrained(dir)`` and
``PeftModel.from_pretrained(base, dir)`` resolve ``"peft_type": "BOTTLENECK"`` like any built-in method.

Placement. Each adapter wraps the *output projection* of a sub-block (an ``nn.Linear``) and computes

    y = linear(x);  return y + up(act(down(y)))

so it sits after the projection and before the block's ``LayerNorm(dropout(.) + residual)``, as in the papers:

* ``houlsby``: after the attention output projection and after the feed-forward output projection of every layer;
* ``pfeiffer``: after the feed-forward output projection only.

Because the wrapped module is the Linear itself, the block's dropout is applied to ``y + adapter(y)`` (AdapterHub
applies the adapter after that dropout). In eval mode both are identical; in training the dropout merely also
regularises the adapter's contribution.

The up-projection starts at zero, so a freshly added adapter returns exactly the base model's outputs. Adapters are
non-linear, so they cannot be merged into the base weights: ``merge``/``merge_and_unload`` raise
``NotImplementedError``; ``unload`` (remove without merging) works.

Caveat: the ``PeftType.BOTTLENECK`` member and the PEFT registration only exist in a process that has imported this
module; load saved adapters after ``querytune.methods.register_bottleneck()`` (querytune's own loaders
call it).
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import get_peft_model
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method
from torch import nn

from querytune.methods.adapter import DEFAULT_TARGET_MODULES, VARIANTS
from querytune.methods.registry import or_default

__all__ = [
    "DEFAULT_EXTRA_MODULES_TO_SAVE",
    "DEFAULT_TARGET_MODULES",
    "NON_LINEARITIES",
    "VARIANTS",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckLinear",
    "BottleneckModel",
    "count_adapter_parameters",
    "default_target_modules",
]

PEFT_METHOD_NAME = "bottleneck"  # register_peft_method wants lower case; PeftType member is its upper case
PEFT_TYPE_NAME = PEFT_METHOD_NAME.upper()

# Adapters per transformer layer for each variant (used by the closed-form parameter count).
ADAPTERS_PER_LAYER: dict[str, int] = {"houlsby": 2, "pfeiffer": 1}

NON_LINEARITIES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,  # swish(x) = x * sigmoid(x) = SiLU
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}

# Extra modules to train and save per (model_type, task_type). DeBERTa-v2/v3 sequence classification puts a
# `ContextPooler` (Linear + activation) between the encoder and `classifier`; the public DeBERTa-v3 checkpoints ship
# no pooler weights (transformers reports `pooler.dense.*` as newly initialised), so it is random on every load. Left frozen it would stay random, and left unsaved a reloaded
# adapter would not reproduce its logits. BERT's pooler, by contrast, is pre-trained and stays frozen.
DEFAULT_EXTRA_MODULES_TO_SAVE: dict[tuple[str, str], list[str]] = {("deberta-v2", "SEQ_CLS"): ["pooler"]}


# --------------------------------------------------------------------------------------------------------------------
# PeftType registration
# --------------------------------------------------------------------------------------------------------------------
def _extend_enum(enum_cls: type[enum.Enum], name: str, value: Any) -> enum.Enum:
    """Add member ``name = value`` to an existing Enum class in place and return it (idempotent).

    Why this is needed: ``register_peft_method`` only accepts names that already are ``PeftType`` members, and
    ``PeftType`` is a plain ``(str, Enum)`` that cannot be subclassed or extended through a public API (``aenum``'s
    ``extend_enum`` would do it but is not a dependency here). On Python >= 3.11 we hand the value to the stdlib's own
    class-body machinery (``enum._proto_member.__set_name__``), exactly as if ``NAME = value`` had been written in the
    class body: it builds the member with the mixin's ``__new__`` and updates ``_member_names_``, ``_member_map_``,
    ``_value2member_map_`` and any descriptor redirects consistently for that Python version. Older Pythons lack
    ``_proto_member``; there we do the same bookkeeping by hand (as ``aenum.extend_enum`` does).
    """
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise ValueError(f"{enum_cls.__name__}.{name} already exists with value {existing.value!r} != {value!r}")
        return existing
    if value in enum_cls._value2member_map_:
        raise ValueError(f"value {value!r} is already bound to {enum_cls._value2member_map_[value]!r}")

    proto_member = getattr(enum, "_proto_member", None)
    if proto_member is not None:
        # __set_name__ starts with `delattr(enum_cls, name)`, so the placeholder must be a class attribute first
        # (EnumType.__setattr__ only refuses to overwrite existing members, and `name` is not one yet).
        placeholder = proto_member(value)
        setattr(enum_cls, name, placeholder)
        placeholder.__set_name__(enum_cls, name)
    else:  # pragma: no cover - Python < 3.11
        member_type = enum_cls._member_type_  # e.g. str for PeftType(str, Enum)
        member = object.__new__(enum_cls) if member_type is object else member_type.__new__(enum_cls, value)
        member._name_, member._value_, member.__objclass__ = name, value, enum_cls
        member.__init__(value)
        setattr(enum_cls, name, member)
        enum_cls._member_names_.append(name)
        enum_cls._member_map_[name] = member
        enum_cls._value2member_map_[value] = member
    return enum_cls[name]


def _peft_type() -> PeftType:
    """Return ``PeftType.BOTTLENECK``, creating the enum member on first use."""
    # PEFT keys its registries by PeftType while configs loaded from JSON carry the plain string; both resolve to the
    # same dict entry only because Enum hashes by *name* and str compares by *value*, so name must equal value.
    return _extend_enum(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_NAME)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------
def default_target_modules(model_type: str, variant: str) -> str:
    """Default ``target_modules`` regex for a transformers ``model_type`` and adapter variant (raises if unknown)."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown bottleneck adapter variant {variant!r}; expected one of {list(VARIANTS)}")
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"No default bottleneck-adapter placement for model_type={model_type!r}. Supported model types: "
            f"{sorted(DEFAULT_TARGET_MODULES)}. Pass `target_modules` explicitly: the nn.Linear output projections "
            "of the attention block (houlsby only) and of the feed-forward block, e.g. as a regex."
        )
    return DEFAULT_TARGET_MODULES[model_type][variant]


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter (Houlsby / Pfeiffer) for :class:`BottleneckModel`.

    Args:
        variant: ``"houlsby"`` (adapter after attention output and feed-forward output of each layer) or
            ``"pfeiffer"`` (after the feed-forward output only). Only used to pick default ``target_modules``.
        reduction_factor: bottleneck width = hidden size // reduction_factor (at least 1).
        bottleneck_size: explicit bottleneck width; when given it takes precedence over ``reduction_factor``.
        non_linearity: activation between down- and up-projection: relu, gelu, swish/silu or tanh.
        target_modules: names of the nn.Linear output projections to wrap. A string is a regex that must match the
            full module name; a list matches exact names or name suffixes (note that the suffix ``"output.dense"``
            also matches ``"attention.output.dense"``). ``None`` resolves from :data:`DEFAULT_TARGET_MODULES`
            using ``model.config.model_type`` and ``variant``.
        exclude_modules: modules not to adapt (same matching rules as ``target_modules``).
        modules_to_save: extra modules trained in full and saved with the adapter (PEFT adds ``classifier``/
            ``score`` for SEQ_CLS / TOKEN_CLS; DeBERTa-v2 SEQ_CLS also gets its ``pooler``, see
            :data:`DEFAULT_EXTRA_MODULES_TO_SAVE`).
        init_weights: ``True`` (default) initialises the up-projection to zero so the adapted model starts exactly
            equal to the base model; ``False`` initialises it randomly (for tests/debugging only).
    """

    variant: str = field(default="houlsby", metadata={"help": "'houlsby' (attention + FFN) or 'pfeiffer' (FFN)."})
    reduction_factor: int = field(default=16, metadata={"help": "Bottleneck = hidden_size // reduction_factor."})
    bottleneck_size: int | None = field(
        default=None, metadata={"help": "Explicit bottleneck width; takes precedence over reduction_factor."}
    )
    non_linearity: str = field(default="relu", metadata={"help": f"One of {sorted(NON_LINEARITIES)}."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Output-projection Linear modules to wrap (regex string or list); None = per-arch default."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to exclude from adaptation (regex string or list)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules (e.g. a classification head) to train fully and save."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Zero-init the up-projection so the initial model equals the base model."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = _peft_type()
        if self.variant not in VARIANTS:
            raise ValueError(f"Unknown bottleneck adapter variant {self.variant!r}; expected one of {list(VARIANTS)}")
        # bool is an int subclass; reject it so `reduction_factor=True` does not silently mean 1.
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int):
            raise ValueError(f"reduction_factor must be a positive int, got {self.reduction_factor!r}")
        if self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.bottleneck_size is not None and (
            isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int)
        ):
            raise ValueError(f"bottleneck_size must be a positive int or None, got {self.bottleneck_size!r}")
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be >= 1, got {self.bottleneck_size}")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in NON_LINEARITIES:
            raise ValueError(
                f"Unknown non_linearity {self.non_linearity!r}; expected one of {sorted(NON_LINEARITIES)}"
            )
        self.non_linearity = self.non_linearity.lower()
        # PEFT convention (LoRA, IA3): lists become sets for matching; strings stay regexes.
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    def bottleneck_for(self, hidden_size: int) -> int:
        """Bottleneck width for a layer of width ``hidden_size`` (``bottleneck_size`` wins over the factor)."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, hidden_size // self.reduction_factor)


def count_adapter_parameters(hidden_size: int, bottleneck: int, num_layers: int, variant: str) -> int:
    """Closed-form number of adapter parameters: per adapter 2*h*b + b + h (two weight matrices, two biases)."""
    if variant not in ADAPTERS_PER_LAYER:
        raise ValueError(f"Unknown bottleneck adapter variant {variant!r}; expected one of {list(VARIANTS)}")
    per_adapter = 2 * hidden_size * bottleneck + bottleneck + hidden_size
    return ADAPTERS_PER_LAYER[variant] * num_layers * per_adapter


# --------------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------------
_MERGE_ERROR = (
    "Bottleneck adapters are non-linear and cannot be merged into the base weights; use the unmerged PeftModel "
    "(or `unload()` to drop the adapters)."
)


class BottleneckLayer(BaseTunerLayer):
    """Adapter state attached to one wrapped module: per adapter name a down-, activation- and up-module."""

    # ModuleDicts keyed by adapter name holding trainable weights (BaseTunerLayer toggles their requires_grad).
    adapter_layer_names: tuple[str, ...] = ("bottleneck_down", "bottleneck_up")
    # Parameter-free per-adapter state; listed so delete_adapter / adapter discovery see it.
    other_param_names: tuple[str, ...] = ("bottleneck_act",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_act = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []  # always empty: merging is not possible
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"Bottleneck adapters can only wrap torch.nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features

    def update_layer(self, adapter_name: str, config: BottleneckConfig, **kwargs: Any) -> None:
        """Create (or re-create) the adapter ``adapter_name`` on this layer."""
        hidden, bottleneck = self.out_features, config.bottleneck_for(self.out_features)
        self.bottleneck_down[adapter_name] = nn.Linear(hidden, bottleneck)
        self.bottleneck_act[adapter_name] = NON_LINEARITIES[config.non_linearity]()
        self.bottleneck_up[adapter_name] = nn.Linear(bottleneck, hidden)
        self.reset_adapter_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_adapter_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Near-identity init: small normal down-projection, zero up-projection (=> adapter output exactly 0)."""
        down, up = self.bottleneck_down[adapter_name], self.bottleneck_up[adapter_name]
        if down.weight.is_meta:  # low_cpu_mem_usage loading: weights come from the checkpoint
            return
        # std 1e-2 as in Houlsby et al. / AdapterHub; keeps the initial adapter path tiny even if up is non-zero.
        nn.init.normal_(down.weight, std=1e-2)
        nn.init.zeros_(down.bias)
        if init_weights:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        else:
            nn.init.normal_(up.weight, std=1e-2)
            nn.init.normal_(up.bias, std=1e-2)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Not possible for a non-linear adapter."""
        raise NotImplementedError(_MERGE_ERROR)

    def unmerge(self) -> None:
        """Nothing is ever merged, so there is nothing to undo."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)


class BottleneckLinear(nn.Module, BottleneckLayer):
    """An nn.Linear wrapped with bottleneck adapters: ``y = linear(x); y + up(act(down(y)))``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, **kwargs: Any) -> None:
        super().__init__()
        BottleneckLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        # Several active adapters are stacked (each sees the previous one's output), like AdapterHub's `Stack`.
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down, act, up = self.bottleneck_down[name], self.bottleneck_act[name], self.bottleneck_up[name]
            # adapters may be kept in fp32 while the base runs in bf16/fp16 (PEFT's autocast_adapter_dtype)
            h = self._cast_input_dtype(result, down.weight.dtype)
            result = result + up(act(down(h))).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


# --------------------------------------------------------------------------------------------------------------------
# Tuner
# --------------------------------------------------------------------------------------------------------------------
class BottleneckModel(BaseTuner):
    """PEFT tuner that inserts bottleneck adapters into a transformers model (use via ``get_peft_model``).

    Supports everything BaseTuner provides: several named adapters (``add_adapter`` / ``set_adapter`` /
    ``delete_adapter``), ``disable_adapter()``, ``modules_to_save``, ``save_pretrained`` / ``from_pretrained`` and
    ``unload()``. ``merge_adapter`` / ``merge_and_unload`` raise ``NotImplementedError``.
    """

    prefix: str = f"{PEFT_METHOD_NAME}_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = DEFAULT_TARGET_MODULES  # per variant; resolved in _prepare_adapter_config

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        """Resolve default ``target_modules`` (and extra ``modules_to_save``) from the architecture."""
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(model_type, peft_config.variant)
        task_type = (
            peft_config.task_type.value if isinstance(peft_config.task_type, enum.Enum) else peft_config.task_type
        )
        extra = DEFAULT_EXTRA_MODULES_TO_SAVE.get((model_type, task_type), [])
        if extra:
            # PEFT's SEQ_CLS wrapper later calls `.extend` on this, so it must stay a list.
            modules_to_save = list(peft_config.modules_to_save or [])
            peft_config.modules_to_save = modules_to_save + [m for m in extra if m not in modules_to_save]
        return peft_config

    def _create_and_replace(
        self,
        peft_config: BottleneckConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, BottleneckLayer):  # another named adapter on an already wrapped module
            target.update_layer(adapter_name, peft_config)
            return
        if not isinstance(target, nn.Linear):
            raise TypeError(
                f"Bottleneck adapters can only wrap torch.nn.Linear output projections; target {current_key!r} is a "
                f"{type(target).__name__}. Check `target_modules`."
            )
        new_module = BottleneckLinear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added (inactive) adapter must not become trainable
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        # Called by merge_adapter and merge_and_unload before any module is touched, so raising here leaves the
        # model intact (unload(), i.e. merge=False, does not call it).
        raise NotImplementedError(_MERGE_ERROR)


# --------------------------------------------------------------------------------------------------------------------
# Registration with PEFT
# --------------------------------------------------------------------------------------------------------------------
def _register() -> None:
    """Register the method with PEFT; safe to call repeatedly and after ``importlib.reload`` of this module."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    peft_type = _peft_type()
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is not None:
        if (registered.__module__, registered.__qualname__) != (BottleneckConfig.__module__, "BottleneckConfig"):
            raise RuntimeError(
                f"PeftType.{PEFT_TYPE_NAME} is already registered by {registered.__module__}.{registered.__qualname__}"
            )
        if registered is BottleneckConfig and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is BottleneckModel:
            return  # already registered with these very classes
        # Re-import after importlib.reload: register_peft_method refuses duplicates, so drop the stale classes and
        # register the fresh ones (models built before the reload keep working with their old classes).
        for mapping in (
            PEFT_TYPE_TO_CONFIG_MAPPING,
            PEFT_TYPE_TO_TUNER_MAPPING,
            PEFT_TYPE_TO_PREFIX_MAPPING,
            PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        ):
            mapping.pop(peft_type, None)
    register_peft_method(name=PEFT_METHOD_NAME, config_cls=BottleneckConfig, model_cls=BottleneckModel)


_register()


# --------------------------------------------------------------------------------------------------------------------
# the `adapter` method's builder (its record and options: querytune.methods.adapter)
# --------------------------------------------------------------------------------------------------------------------
def build_adapter(model, args, ctx):
    from querytune.methods.builders import modules_to_save

    config = BottleneckConfig(
        task_type=ctx.task_type,
        variant=or_default(args.adapter_variant, "houlsby"),
        reduction_factor=or_default(args.adapter_reduction_factor, 16),
        bottleneck_size=args.adapter_bottleneck_size,
        non_linearity=or_default(args.adapter_non_linearity, "relu"),
        target_modules=args.adapter_target_modules,
        modules_to_save=modules_to_save(args, ctx),
    )
    return get_peft_model(model, config)
