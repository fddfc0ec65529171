"""LoRA vs QLoRA on the embedded default (SmolLM2-135M-Instruct), same data, same steps.

Runs the demo job once per method in a scratch folder and prints tokens/s, train seconds and
peak RSS of each, with QLoRA's ratios against LoRA from the same invocation.

Usage: HF_HUB_OFFLINE=1 python scripts/bench_methods.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tuner" / "demo"


def run_method(method: str, steps: int, scratch: Path) -> dict:
    workspace = yaml.safe_load((DEMO / "workspace.yaml").read_text())
    workspace["tuning"]["method"] = method
    workspace["tuning"]["input"]["volumeSource"]["hostPath"]["path"] = str(DEMO / "data")
    ws_path = scratch / f"{method}.yaml"
    ws_path.write_text(yaml.safe_dump(workspace))
    config = yaml.safe_load((DEMO / "training-config.yaml").read_text())
    body = yaml.safe_load(config["data"]["training_config.yaml"])
    body["training_config"]["TrainingArguments"]["max_steps"] = steps
    config["data"]["training_config.yaml"] = yaml.safe_dump(body)
    config_path = scratch / f"{method}-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    work = scratch / method
    command = [sys.executable, "-m", "tuner.cli", "run", str(ws_path), "--config", str(config_path),
               "--work-dir", str(work), "--output", f"oci:{scratch / 'layout'}:{method}"]
    timed = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    summary = json.loads((work / "result.json").read_text())
    return {"method": method, "tokens_per_s": summary["train"]["tokens_per_second"],
            "train_seconds": round(summary["train"]["seconds"], 1), "steps": summary["train"]["steps"],
            "final_loss": summary["train"]["final_loss"],
            "peak_rss_mb": int(timed.stderr.strip().splitlines()[-1]) // 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run_method(m, args.steps, Path(tmp)) for m in ("lora", "qlora")}
    for result in results.values():
        print(json.dumps(result))
    lora, qlora = results["lora"], results["qlora"]
    print(f"qlora / lora: tokens/s x{qlora['tokens_per_s'] / lora['tokens_per_s']:.2f}, "
          f"peak RSS x{qlora['peak_rss_mb'] / lora['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
