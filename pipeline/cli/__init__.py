"""The ``byol`` command line: ``parser`` (arguments), ``main`` (commands), ``submit`` (Ray Jobs client)."""

from pipeline.cli.main import main

__all__ = ["main"]
