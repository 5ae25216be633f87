"""Loading a text generator (causal or seq2seq LM) and sampling several outputs per prompt: what `paraphrase` and
`backtranslate` share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from querytune.augment.base import Augmenter, Example, finish_rewrite, stable_hash


@dataclass
class Generator:
    """A loaded LM, its tokenizer and whether it is an encoder-decoder (its outputs are not a prompt continuation)."""

    name: str
    model: Any
    tokenizer: Any
    encoder_decoder: bool


def load_generator(name: str, what: str) -> Generator:
    """An LM by Hub id or local folder; `what` names its role in the error ("paraphrase model", ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from querytune.errors import ModelError
    from querytune.models import load_tokenizer, resolve_model_path

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        auto = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path).eval()
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load the {what} {name!r} (resolved to {path!r}): {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Generator(name, model, tokenizer, encoder_decoder)


def sample_texts(gen: Generator, prompts: list[str], n: int, seed: int, max_new_tokens: int,
                 **decoding: Any) -> list[list[str]]:  # fmt: skip
    """n decoded outputs per prompt (first line only), with torch seeded from the prompts: the same batch gives the
    same outputs in every process."""
    import torch

    tok = gen.tokenizer
    tok.padding_side = "right" if gen.encoder_decoder else "left"  # a causal LM continues its prompt
    limit = min(256, getattr(gen.model.config, "max_position_embeddings", None) or 256)
    enc = tok(prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    torch.manual_seed(stable_hash(seed, prompts) % 2**63)
    # a causal LM stops a sequence at its first line break: only the first line is kept anyway
    stop = {} if gen.encoder_decoder else {"eos_token_id": tok.eos_token_id,
                                           "stopping_criteria": [line_break_stop(tok, enc["input_ids"].shape[1])]}  # fmt: skip
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.inference_mode():
        if gen.encoder_decoder or n == 1:
            out = gen.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     num_return_sequences=n, pad_token_id=tok.pad_token_id, **stop, **decoding)  # fmt: skip
        else:
            # generate() would run every prompt n times through the model before sampling; run it once and give
            # each of its n samples a copy of its cache (about 40% less time for 3 samples of a few-shot prompt)
            from transformers import DynamicCache

            cache = DynamicCache()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            gen.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                      past_key_values=cache, use_cache=True)  # fmt: skip
            cache.batch_repeat_interleave(n)
            ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            out = gen.model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                     max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **stop,
                                     **decoding)  # fmt: skip
    if not gen.encoder_decoder:
        out = out[:, enc["input_ids"].shape[1] :]
        # an output that ran to max_new_tokens without ending its line or the text is a runaway: dropped
        ends = [i for i in (tok.eos_token_id, gen.model.generation_config.eos_token_id) if i is not None]
        ends = torch.tensor([i for e in ends for i in (e if isinstance(e, list) else [e])], dtype=torch.long)
        ended = torch.isin(out, torch.cat([_line_break_ids(tok), ends])).any(dim=1)
    else:
        ended = torch.ones(out.shape[0], dtype=torch.bool)
    texts = [t if done else "" for t, done in zip(tok.batch_decode(out, skip_special_tokens=True), ended.tolist(),
                                                     strict=True)]  # fmt: skip
    return [[t.strip().split("\n")[0].strip() for t in texts[i * n : (i + 1) * n]] for i in range(len(prompts))]


class TextRewriter(Augmenter):
    """An augmenter that rewrites whole queries with a model (`paraphrase`, `backtranslate`). Subclasses implement
    `rewrite`; outputs are cleaned, de-duplicated per query and, on slot corpora, re-tagged (`finish_rewrite`)."""

    uses_model = True

    def rewrite(self, queries: list[str], n: int, seed: int) -> list[list[str]]:
        """n raw outputs per query."""
        raise NotImplementedError

    def clean(self, text: str) -> str:
        return text.strip()

    def generate(self, examples: list[Example], k: list[int], seed: int) -> list[Example | None]:
        # one model call per distinct source row, with enough outputs for its highest candidate index
        need: dict[str, int] = {}
        for ex, j in zip(examples, k, strict=True):
            need[ex.text] = max(need.get(ex.text, 0), j + 1)
        n = max(need.values()) + 1  # one output of headroom for a copy of the query or an empty line
        order = list(need)
        outputs = dict(zip(order, self.rewrite(order, n, stable_hash(seed, self.name)), strict=True))
        made: list[Example | None] = []
        for ex, j in zip(examples, k, strict=True):
            distinct = list(dict.fromkeys(c for c in (self.clean(t) for t in outputs[ex.text])
                                          if c and c.lower() != ex.text.lower()))  # fmt: skip
            made.append(finish_rewrite(ex, distinct[j], self.name) if j < len(distinct) else None)
        return made


def line_break_stop(tokenizer, prompt_length: int):
    """A stopping criterion that ends each sequence once it has generated a token holding a line break (a tokenizer
    without such tokens never stops early)."""
    import torch
    from transformers import StoppingCriteria

    breaks = _line_break_ids(tokenizer)

    class LineBreak(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, prompt_length:]
            if not len(breaks) or new.shape[1] == 0:
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            return torch.isin(new, breaks.to(new.device)).any(dim=1)

    return LineBreak()


_BREAKS: dict[int, Any] = {}


def _line_break_ids(tokenizer):
    """The ids of the tokens whose text holds a line break (computed once per tokenizer)."""
    import torch

    key = id(tokenizer)
    if key not in _BREAKS:
        _BREAKS[key] = torch.tensor([i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])],
                                    dtype=torch.long)  # fmt: skip
    return _BREAKS[key]
