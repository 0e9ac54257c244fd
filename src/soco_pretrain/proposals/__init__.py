"""Stage 1: selective-search proposals, filtered and stored for training.

``generate`` runs the search over a folder of images into a store, ``merge`` joins shard
stores, ``load`` opens a store (memory-mapped, picklable) for the data loader and
``verify_store`` checks every file of a store against its manifest's sha256.
"""

from .filters import PRESETS, RULE_NAMES, SearchConfig, filter_boxes
from .generate import GenerateSummary, generate, merge
from .selective_search import selective_search
from .store import ProposalStore, load, verify_store

__all__ = [
    "PRESETS",
    "RULE_NAMES",
    "SearchConfig",
    "filter_boxes",
    "GenerateSummary",
    "generate",
    "merge",
    "selective_search",
    "ProposalStore",
    "load",
    "verify_store",
]
