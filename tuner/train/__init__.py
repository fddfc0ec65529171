"""LoRA and QLoRA training: base weights, the trainer, checkpoints, precision, progress, torchrun."""
