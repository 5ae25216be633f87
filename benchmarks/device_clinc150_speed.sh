#!/bin/bash
# Run benchmarks/clinc150_speed.py on a lent GPU machine, from a carried folder .gpu/ (git-ignored):
#   .gpu/wheels/    py3.12 wheels the device image lacks or has older: transformers 5.23, peft 0.21.2, datasets 5.2,
#                   evaluate, huggingface_hub 2.4 and their small deps (pip download --python-version 3.12 --no-deps ...)
#   .gpu/minilm/    all-MiniLM-L6-v2 config + tokenizer, weights saved as fp16 and xz-compressed (the carry limit is 64 MiB)
#   .gpu/clinc150/  ../shared/data/clinc150/*.jsonl, xz-compressed
# Usage: bash benchmarks/device_clinc150_speed.sh "$OUT"   (RECIPES="gpu-..." to choose recipes)
set -eo pipefail
OUT=${1:?}; shift
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=${WORKDIR:-/tmp/qt}; mkdir -p $W/minilm $W/clinc150
if [ -z "$DRY" ]; then python -m pip install -q --no-deps .gpu/wheels/*.whl 2>&1 | tail -3; python -m pip check 2>&1 | grep -i -E "truststore|httpx|hub|transformers|datasets|peft|evaluate|typer" | head || true; fi
python -c "import torch,transformers,peft,datasets,evaluate;print('versions',torch.__version__,transformers.__version__,peft.__version__,datasets.__version__,torch.cuda.is_available() and torch.cuda.get_device_name())"
cp .gpu/minilm/* $W/minilm/; xz -df $W/minilm/*.xz
python -c "
from safetensors.torch import load_file, save_file
d = load_file('$W/minilm/model16.safetensors'); save_file({k: v.float() for k, v in d.items()}, '$W/minilm/model.safetensors')"
rm $W/minilm/model16.safetensors
cp .gpu/clinc150/* $W/clinc150/; xz -df $W/clinc150/*.xz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python benchmarks/clinc150_speed.py --recipes ${RECIPES:-gpu-bf16-b32-lr2e-4-e5 gpu-bf16-b128-lr4e-4-e6 gpu-bf16-b256-lr8e-4-e8} \
  --data $W/clinc150 --runs $W/runs --out $OUT/clinc150_speed_gpu.md --force_load \
  --device_note "${NOTE:-one NVIDIA H200, MiniLM weights stored as fp16 and cast back to fp32}" \
  --extra --model_name_or_path $W/minilm "$@" 2>&1 | tee $OUT/log.txt | grep -v -E "Warning|warn|^\s*$" | tail -60
cp $W/runs/*.json $OUT/ 2>/dev/null || true
