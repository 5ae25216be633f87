"""Joint intent detection and slot filling on one encoder, as in JointBERT (Chen et al. 2019, arXiv:1902.10909).

An intent head reads the first token ([CLS] / <s>), a slot head tags every token, and the loss is the sum of both
cross-entropies. `AutoModelForIntentAndSlots.from_pretrained` works like a transformers Auto class: it reads the
checkpoint's config and builds `<Encoder>ForIntentAndSlots` (e.g. `BertForIntentAndSlots`) as a subclass of that
architecture's own `PreTrainedModel` base, so pretrained encoder weights load under their usual prefix, and
`save_pretrained` / `from_pretrained` / PEFT treat it like any transformers model.

The config carries `num_labels` / `id2label` (slot tags, as for token classification) and `intent_labels`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class IntentSlotsOutput(ModelOutput):
    """Loss (intent CE + slot CE), intent logits [batch, intents] and slot logits [batch, tokens, tags]."""

    loss: torch.FloatTensor | None = None
    intent_logits: torch.FloatTensor | None = None
    slot_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class IntentHead(nn.Module):
    """Dense + tanh + linear on the first token: BERT's pooler followed by JointBERT's intent classifier.

    It is new (not the checkpoint's pooler) so that every encoder gets the same head; DeBERTa and the
    sentence-transformers checkpoints have no pre-trained pooler.
    """

    def __init__(self, hidden_size: int, num_intents: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_intents)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(first_token)))))


class JointIntentSlotsMixin:
    """The heads and forward pass shared by every `<Encoder>ForIntentAndSlots` class."""

    encoder_class: type[PreTrainedModel]
    # The loss is a per-batch mean; Trainer must not rescale it (see NOTES.md).
    accepts_loss_kwargs = False

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        intents = getattr(config, "intent_labels", None)
        if not intents:
            raise ValueError("a joint intent + slots model needs config.intent_labels (the intent names)")
        # Prompt tuning prepends virtual tokens to the input; the heads must skip them to find [CLS] and the words.
        config.prompt_tokens = int(getattr(config, "prompt_tokens", 0) or 0)
        takes_pooling_flag = "add_pooling_layer" in inspect.signature(self.encoder_class.__init__).parameters
        encoder = (
            self.encoder_class(config, add_pooling_layer=False) if takes_pooling_flag else self.encoder_class(config)
        )
        setattr(self, self.base_model_prefix, encoder)
        dropout = getattr(config, "classifier_dropout", None)
        dropout = dropout if dropout is not None else getattr(config, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(dropout)
        self.intent_classifier = IntentHead(config.hidden_size, len(intents), dropout)
        self.slot_classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def joint_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        intent_labels: torch.Tensor | None = None,
        past_key_values: Any = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> IntentSlotsOutput | tuple:
        encoder = getattr(self, self.base_model_prefix)
        accepted = inspect.signature(encoder.forward).parameters
        optional = {"token_type_ids": token_type_ids, "position_ids": position_ids, "past_key_values": past_key_values,
                    "output_attentions": output_attentions, "output_hidden_states": output_hidden_states}  # fmt: skip
        kwargs = {k: v for k, v in optional.items() if v is not None}
        if "past_key_values" in kwargs and "past_key_values" not in accepted:
            raise ValueError(f"{self.config.model_type} attention takes no past_key_values (prefix tuning)")
        if "token_type_ids" in kwargs and "token_type_ids" not in accepted:
            kwargs.pop("token_type_ids")  # MPNet has no segment embeddings; a generic tokenizer may still send them
        outputs = encoder(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, return_dict=True, **kwargs
        )
        sequence = outputs[0][:, self.config.prompt_tokens :]
        intent_logits = self.intent_classifier(sequence[:, 0])
        slot_logits = self.slot_classifier(self.dropout(sequence))
        loss = None
        if labels is not None or intent_labels is not None:
            ce = nn.CrossEntropyLoss()  # ignore_index -100: special tokens and continuation pieces
            loss = torch.zeros((), device=sequence.device)
            if intent_labels is not None:
                loss = loss + ce(intent_logits.view(-1, intent_logits.size(-1)), intent_labels.view(-1))
            if labels is not None:
                loss = loss + ce(slot_logits.reshape(-1, slot_logits.size(-1)), labels.reshape(-1))
        out = IntentSlotsOutput(
            loss=loss,
            intent_logits=intent_logits,
            slot_logits=slot_logits,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )
        return out if return_dict is not False else out.to_tuple()


def _forward_for(encoder_class: type[PreTrainedModel]):
    """The class's `forward`, whose signature lists `past_key_values` only when the encoder takes it.

    PEFT reads the signature: prefix tuning passes the prefix through `forward` only when it is listed, and
    querytune's prefix method refuses architectures whose forward does not list it, before training starts.
    """

    def forward(self, *args, **kwargs):
        return self.joint_forward(*args, **kwargs)

    signature = inspect.signature(JointIntentSlotsMixin.joint_forward)
    if "past_key_values" not in inspect.signature(encoder_class.forward).parameters:
        signature = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != "past_key_values"]
        )
    forward.__signature__ = signature
    forward.__doc__ = JointIntentSlotsMixin.joint_forward.__doc__
    return forward


_CLASSES: dict[type, type[PreTrainedModel]] = {}


def joint_model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """`<Encoder>ForIntentAndSlots` for a config's architecture (one class per architecture, cached)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        encoder_class = MODEL_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"no encoder class for model type {config.model_type!r}") from None
    if encoder_class not in _CLASSES:
        bases = [b for b in encoder_class.__mro__[1:] if issubclass(b, PreTrainedModel) and b is not PreTrainedModel]
        if not bases:
            raise ValueError(f"{encoder_class.__name__} has no PreTrainedModel base class to build a joint model on")
        name = encoder_class.__name__.removesuffix("Model") + "ForIntentAndSlots"
        attrs = {"encoder_class": encoder_class, "forward": _forward_for(encoder_class), "__module__": __name__}
        _CLASSES[encoder_class] = type(name, (JointIntentSlotsMixin, bases[0]), attrs)
    return _CLASSES[encoder_class]


class AutoModelForIntentAndSlots:
    """Auto-class-like loader of joint intent + slots models from any encoder checkpoint or a saved joint model."""

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        revision: str = "main",
        trust_remote_code: bool = False,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        label2id: dict[str, int] | None = None,
        intent_labels: list[str] | None = None,
        prompt_tokens: int | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel | tuple[PreTrainedModel, dict]:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        cls._update(config, num_labels, id2label, label2id, intent_labels, prompt_tokens)
        return joint_model_class(config).from_pretrained(path, config=config, revision=revision, **kwargs)

    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs: Any) -> PreTrainedModel:
        cls._update(config, kwargs.pop("num_labels", None), kwargs.pop("id2label", None),
                    kwargs.pop("label2id", None), kwargs.pop("intent_labels", None),
                    kwargs.pop("prompt_tokens", None))  # fmt: skip
        return joint_model_class(config)(config, **kwargs)

    @staticmethod
    def _update(config, num_labels, id2label, label2id, intent_labels, prompt_tokens) -> None:
        if num_labels is not None:
            config.num_labels = num_labels
        if id2label is not None:
            config.id2label = {int(k): v for k, v in id2label.items()}
        if label2id is not None:
            config.label2id = dict(label2id)
        if intent_labels is not None:
            config.intent_labels = list(intent_labels)
        if prompt_tokens is not None:
            config.prompt_tokens = int(prompt_tokens)
