"""The `tuner` command line."""

from tuner.cli.commands import main

__all__ = ["main"]
