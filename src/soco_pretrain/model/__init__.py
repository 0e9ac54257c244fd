"""SoCo pretraining network (stage 3): encoder, projector/predictor, online/target model, loss."""

from .encoder import C4_ROI_SIZE, FPN_STRIDES, SoCoEncoder, pool_boxes
from .heads import MLP
from .loss import soco_loss, soco_loss_terms
from .soco import SoCoModel, convert_sync_bn, num_views, view_pairs

__all__ = [
    "C4_ROI_SIZE",
    "FPN_STRIDES",
    "MLP",
    "SoCoEncoder",
    "SoCoModel",
    "convert_sync_bn",
    "num_views",
    "pool_boxes",
    "soco_loss",
    "soco_loss_terms",
    "view_pairs",
]
