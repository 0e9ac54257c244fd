"""Projector and predictor: BYOL's two-layer MLP (paper section 4.1).

"Both the projection network and prediction network are 2-layer MLPs which consist of a linear
layer with output size 4096 followed by batch normalization, rectified linear units, and a final
linear layer with output dimension 256." Projector input: 1024 (FPN box head) or res5's channels
(C4: 2048 for ResNet-50); predictor input: 256. Module names follow the released code (linear1,
bn1, relu1, linear2); initialisation is PyTorch's default, as there (the paper is silent).
"""

from __future__ import annotations

import torch
from torch import nn

from .masked import masked_batch_norm


class MLP(nn.Module):
    """Linear(in, hidden) - BatchNorm1d - ReLU - Linear(hidden, out)."""

    def __init__(self, in_dim: int, hidden: int = 4096, out: int = 256, bn_momentum: float = 0.1):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, hidden)
        self.bn1 = nn.BatchNorm1d(hidden, momentum=bn_momentum)
        self.relu1 = nn.ReLU(inplace=True)
        self.linear2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (R, in); ``mask`` (R,) bool: BatchNorm statistics from those rows only (padded proposal
        slots ride along with static shapes, see masked.py); None: every row."""
        h = self.linear1(x)
        h = self.bn1(h) if mask is None else masked_batch_norm(self.bn1, h, mask)
        return self.linear2(self.relu1(h))
