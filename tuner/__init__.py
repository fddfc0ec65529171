"""tuner: turns a Kaito-style Workspace tuning spec into a LoRA/QLoRA adapter image."""

__version__ = "0.1.0"
