#!/usr/bin/env bash
# README command 1: install, then run the demo tuning job on the embedded default model
# (SmolLM2-135M-Instruct, offline, CPU) and check the adapter image it writes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
rm -rf demo-output
tuner run tuner/demo/workspace.yaml --config tuner/demo/training-config.yaml \
  --work-dir demo-output/work --output oci:demo-output/layout:v1
python scripts/check_demo.py demo-output/layout:v1
