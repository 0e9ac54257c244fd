"""Stage 2: views, box geometry, photometric augmentation, dataset and loader.

``boxes`` is pure numpy box geometry; ``views`` builds V1..V4 with their boxes; ``augment`` is
BYOL's photometric augmentation (per image on CPU, or batched on the training device);
``dataset`` joins images with a proposal store into training samples; ``loader`` batches them;
``decode`` decodes and renders the views on the training device (``data.decode="device"``).
"""

from .augment import BatchAugment, augment_cpu
from .boxes import assign_levels, from_store, jitter_boxes, sample_crop
from .dataset import DatasetError, SoCoDataset
from .decode import has_encoded, render_batch
from .loader import SkipLog, augment_batch, make_loader, set_epoch, soco_collate
from .views import ViewSet, build_views, plan_views, render_views, view_names

__all__ = [
    "BatchAugment",
    "augment_cpu",
    "assign_levels",
    "from_store",
    "jitter_boxes",
    "sample_crop",
    "DatasetError",
    "SoCoDataset",
    "has_encoded",
    "render_batch",
    "SkipLog",
    "augment_batch",
    "make_loader",
    "set_epoch",
    "soco_collate",
    "ViewSet",
    "build_views",
    "plan_views",
    "render_views",
    "view_names",
]
