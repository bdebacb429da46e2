"""The ``byol`` command line: ``parser`` (arguments), ``main`` (commands), ``submit`` (Ray Jobs client)."""

from pipeline.cli.main import main, run

__all__ = ["main", "run"]
