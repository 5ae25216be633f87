#!/bin/bash
# The GPU check (benchmarks/device_check.py) on a lent GPU, from the carried folder .gpu/ that
# benchmarks/device_pack.sh makes here (git-ignored; everything that travels must fit in 64 MiB):
#   .gpu/wheels/     py3.12 wheels the device image lacks or has older (transformers, peft, datasets, deepspeed, ...)
#   .gpu/minilm/     all-MiniLM-L6-v2: config + tokenizer, weights as fp16 safetensors, xz-compressed
#   .gpu/clinc150/   ../shared/data/clinc150/*.jsonl, xz-compressed
#   .gpu/homedepot/  ../shared/data/homedepot/train.csv, xz-compressed
# On the device:  bash benchmarks/device_check.sh "$OUT"        (one call, about 8 minutes on one H100)
# CPU dry run:    DRY=1 MODEL=tiny_model CLINC=dir HOMEDEPOT=dir bash benchmarks/device_check.sh OUTDIR
set -eo pipefail
OUT=${1:?give the output folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=${WORKDIR:-/tmp/qt-device}
mkdir -p "$W"
if [ -n "$DRY" ]; then
  args=(--model "${MODEL:?}" --clinc150 "${CLINC:?}" --homedepot "${HOMEDEPOT:?}" --dry)
else
  python -m pip install -q --no-index --no-deps --no-compile --target "$W/site" .gpu/wheels/*.whl
  export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}"
  mkdir -p "$W/minilm" "$W/clinc150" "$W/homedepot"
  cp .gpu/minilm/* "$W/minilm/" && xz -df "$W"/minilm/*.xz
  python - "$W/minilm" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
folder = Path(sys.argv[1])
weights = load_file(folder / "model16.safetensors")
save_file({k: v.float() for k, v in weights.items()}, folder / "model.safetensors")  # back to fp32, as shipped
(folder / "model16.safetensors").unlink()
PY
  cp .gpu/clinc150/* "$W/clinc150/" && xz -df "$W"/clinc150/*.xz
  cp .gpu/homedepot/* "$W/homedepot/" && xz -df "$W"/homedepot/*.xz
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  args=(--model "$W/minilm" --clinc150 "$W/clinc150" --homedepot "$W/homedepot")
fi
python -c "import torch, transformers, peft, accelerate; print('versions', torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)"
python benchmarks/device_check.py "${args[@]}" --runs "$W/runs" --out "$OUT/device_check.md" "${@:2}" 2>&1 | tee "$OUT/log.txt" | grep -v -i warn
