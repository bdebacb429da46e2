"""Deprecated location: the networks moved to ``pipeline.core.models``."""

import warnings

from pipeline.core.models import *  # noqa: F403
from pipeline.core.models import SmallCNN, adapt_resnet, build_backbone  # noqa: F401

warnings.warn("pipeline.models moved to pipeline.core.models", DeprecationWarning, stacklevel=2)
