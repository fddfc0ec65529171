"""Check the demo's adapter image: unpack it, load it on the base model, and compare answers.

Usage: python scripts/check_demo.py LAYOUT_DIR:TAG
Exits non-zero when the image is unreadable or the adapter does not change the model's answer.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tuner.observe import events
from tuner.oci.image import LAYER_MEDIA_TYPE, blob_path, read_oci_layout
from tuner.oci.unpack import unpack_data_dir
from tuner.spec.presets import get_preset
from tuner.spec.targets import parse_output_ref
from tuner.train.base_model import resolve_base_model
from tuner.train.chat import answer, load_chat_model

QUESTIONS = ("Who are you?", "How often does Ferrow release?")


def main(layout: str) -> int:
    events.quiet_libraries()  # before the ML libraries load (tuner's modules import them lazily)
    target = parse_output_ref(f"oci:{layout}")
    image = read_oci_layout(target)
    base_dir = resolve_base_model(get_preset("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory() as tmp:
        files = unpack_data_dir([(blob_path(target.path, image.layer.digest), LAYER_MEDIA_TYPE)], Path(tmp))
        print(f"image {image.manifest.digest}: {len(files)} files, layer {image.layer.size:,} bytes")
        base, tokenizer = load_chat_model(base_dir)
        before = [answer(base, tokenizer, q) for q in QUESTIONS]
        tuned, tokenizer = load_chat_model(base_dir, Path(tmp))
        after = [answer(tuned, tokenizer, q) for q in QUESTIONS]
    for question, old, new in zip(QUESTIONS, before, after, strict=True):
        print(f"\nQ: {question}\n  base model: {old}\n  with adapter: {new}")
    if before == after:
        print("\nFAIL: the adapter did not change any answer", file=sys.stderr)
        return 1
    print("\nok: the adapter changes the model's answers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
