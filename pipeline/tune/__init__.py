"""Ray Tune studies of BYOL's EMA and learning-rate schedules, scored by val kNN (``byol tune``)."""

from pipeline.tune.space import TuneSection, load_study

__all__ = ["TuneSection", "load_study"]
