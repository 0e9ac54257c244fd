"""Moved to soco_pretrain.engine.metrics; this alias goes once every import names the engine."""
import sys

from ..engine import metrics as _moved

sys.modules[__name__] = _moved
