"""The one error of the weights layer."""

from __future__ import annotations

from ..errors import UserError


class WeightsError(UserError):
    """Weights that cannot be used (missing, unreadable, not a SoCo checkpoint, nothing matching
    the model they are for); one line that names the file."""
