"""SoCo's object-level BYOL loss (paper section 3.3, eq. 5-6) and the released code's variant.

For a pair of views (a, b), the term in one direction is

    mean over valid proposals i of  -2 cos(q(g(h_i^a)), g_xi(h_i^b))

(online prediction of view a against the target projection of view b). The pair contributes both
directions (a -> b and b -> a: the paper's L and L~), and the loss sums over the pairs:
(V1, V2), (V1, V3) for SoCo-FPN, plus (V1, V4) for SoCo*, and (V1, V2) only for SoCo-C4.

Each direction lies in [-2, 2], so with P pairs the loss lies in [-4P, 4P]: identical embeddings
give the minimum -4P (-8 for FPN, -12 for SoCo*, -4 for C4), orthogonal ones 0, opposite ones
+4P. The paper's eq. 5 writes the two pairs of one direction per proposal and eq. 6 averages
over K; summing eq. 5 over proposals then dividing by K is the same as our per-pair means.

Modes:
- ``"paper"``: the mean runs over every valid proposal of the batch (each proposal weighs the
  same; with no padding it equals eq. 6 averaged over images).
- ``"released"`` (hologerry/SoCo): per image, the mean cosine over its valid proposals, then the
  mean over the images of the batch (an image without a valid proposal contributes 0 and still
  counts, as the released code's ``sum / (count + 1e-6)``; we drop its 1e-6). Differs from the
  paper only when images have different numbers of valid proposals.

Cosines are computed in float32 whatever the autocast dtype. Padded slots are excluded with
``torch.where`` (not a multiplication), so garbage (even NaN) in them cannot leak in. Nothing here
synchronises with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("paper", "released")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float32: (R, D), (R, D) -> (R,)."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def _rows(num_rows: int, valid: torch.Tensor | None, device) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """(mask over rows or None = all valid, image index of each row or None, number of images).

    Rows are either every slot (num_rows == B*K, row-major; ``valid`` masks them) or only the valid
    slots in row-major order (num_rows == valid.sum(); what the model passes).
    """
    if valid is None:
        return None, None, 0
    B, K = valid.shape
    if num_rows == B * K:
        return valid.flatten(), torch.arange(B, device=device).repeat_interleave(K), B
    # Gathered rows: the image of row r is the number of images whose valid slots end at or before r.
    ends = valid.sum(1).cumsum(0)
    image = torch.searchsorted(ends, torch.arange(num_rows, device=device), right=True)
    return None, image, B


def direction_term(
    pred: torch.Tensor, proj: torch.Tensor, valid: torch.Tensor | None = None, mode: str = "paper"
) -> torch.Tensor:
    """-2 x mean cosine between the online predictions of one view and the target projections of another."""
    mask, image, num_images = _rows(pred.shape[0], valid, pred.device)
    if mask is not None:
        # Zero the padded rows before the cosine: masking only its output would still let a NaN
        # in a padded row through the backward pass (0 * NaN).
        pred = torch.where(mask[:, None], pred, torch.zeros_like(pred))
        proj = torch.where(mask[:, None], proj, torch.zeros_like(proj))
        count = mask.sum()
    else:
        count = torch.tensor(pred.shape[0], device=pred.device)
    cos = cosine(pred, proj)  # padded rows: exactly 0 (normalize of a zero vector is zero)
    if mode == "paper":
        return -2.0 * cos.sum() / count.clamp(min=1)
    if mode == "released":
        if image is None:
            raise ValueError("loss mode 'released' needs valid_per_image to group proposals by image")
        ones = torch.ones_like(cos) if mask is None else mask.to(cos.dtype)
        sums = cos.new_zeros(num_images).index_add_(0, image, cos)
        counts = cos.new_zeros(num_images).index_add_(0, image, ones)
        return -2.0 * (sums / counts.clamp(min=1)).mean()
    raise ValueError(f"model.loss must be one of {', '.join(MODES)}, got {mode!r}")


def soco_loss_terms(
    online_preds: list[torch.Tensor],
    target_projs: list[torch.Tensor],
    pairs: list[tuple[int, int]],
    valid_per_image: torch.Tensor | None = None,
    mode: str = "paper",
) -> dict[str, torch.Tensor]:
    """One term per pair, both directions summed; keys like ``"loss_12"`` (1-based view numbers)."""
    terms = {}
    for a, b in pairs:
        terms[f"loss_{a + 1}{b + 1}"] = direction_term(
            online_preds[a], target_projs[b], valid_per_image, mode
        ) + direction_term(online_preds[b], target_projs[a], valid_per_image, mode)
    return terms


def soco_loss(
    online_preds: list[torch.Tensor],
    target_projs: list[torch.Tensor],
    pairs: list[tuple[int, int]],
    valid_per_image: torch.Tensor | None = None,
    mode: str = "paper",
) -> torch.Tensor:
    """The symmetric SoCo loss, a scalar in [-4P, 4P] for P pairs (minimum -4P at identical embeddings).

    online_preds[v], target_projs[v]: (R, D) for view v, rows = the same proposals in every view
    (all B*K slots, masked by ``valid_per_image`` (B, K), or only the valid ones in row-major order).
    pairs: view index pairs, e.g. [(0, 1), (0, 2)]; each is used in both directions.
    ``valid_per_image`` is optional in "paper" mode when all rows are valid, required in "released".
    """
    return sum(soco_loss_terms(online_preds, target_projs, pairs, valid_per_image, mode).values())
