"""Moved to soco_pretrain.engine.distributed; this alias goes once every import names the engine."""
import sys

from ..engine import distributed as _moved

sys.modules[__name__] = _moved
