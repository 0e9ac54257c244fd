"""Moved to soco_pretrain.engine.checkpoint; this alias goes once every import names the engine."""
import sys

from ..engine import checkpoint as _moved

sys.modules[__name__] = _moved
