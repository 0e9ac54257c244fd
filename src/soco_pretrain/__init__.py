"""soco-pretrain: object-level self-supervised pretraining for detection (SoCo, NeurIPS 2021)."""

__version__ = "0.1.0"
